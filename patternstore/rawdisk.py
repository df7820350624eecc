"""What the disk tier reads and writes in a diskcache directory, and how it
reads one without writing: ``RawOnlyDisk`` (diskcache's serializer narrowed
to raw bytes, its files reached through ``safedir``), ``read_row`` (the one
query of a value), ``BoundedCache`` (diskcache's cache, its set-up bounded)
and ``ReadOnlyCache`` (the tier's reads on SQLite, opened so that nothing in
the directory is created or changed).

Guarantees:
- Nothing read is ever unpickled. diskcache stores a ``bytes`` value raw (in
  SQLite below 32 KiB, else in a file) and pickles every other type; anyone
  who can write the directory can plant a pickle that runs code when loaded.
  ``RawOnlyDisk.fetch`` returns only raw bytes and refuses every other
  storage mode with ``CorruptValue`` before touching the data;
  ``RawOnlyDisk.get`` never unpickles a key either.
- Files are never reached through a link (``safedir``): ``RawOnlyDisk``
  writes, reads and deletes its value files from the directory's file
  descriptor the tier checked and attached (``root``). A value file is read
  only when its size is the one its row records and at most the directory's
  size limit; a row's own value only when it is under ``min_file_size``, the
  most a row holds (``read_row`` asks SQLite for its length first).
- Opening waits at most ``timeout`` for SQLite's write lock
  (``BoundedCache``: diskcache's own set-up retries for 60 s whatever its
  timeout), then fails with ``database is locked``.
- A write hands diskcache either ``bytes`` or, for a value file, a view of
  the caller's buffer (``store`` of a ``memoryview``): the value is written
  from where it already is, never copied first.
- ``ReadOnlyCache`` writes nothing, creates nothing and never rewrites a
  setting. SQLite's ``mode=ro`` still creates the ``-wal`` and ``-shm`` files
  of a WAL database at rest (measured: SQLite 3.40) and leaves them, so a
  database at rest (no ``-wal`` file: every writer closed) is opened
  ``immutable=1``, which reads the database file alone and takes no lock;
  while a writer has it open (``-wal`` and ``-shm`` present) it is opened
  ``mode=ro``, which reads the writer's WAL too. Limit: a writer that starts
  while an ``immutable`` reader reads may make that reader see the database
  mid-checkpoint; SQLite then reports an error (a miss or an empty listing,
  never a wrong pattern: every value is checksummed and key-checked).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import diskcache
from diskcache.core import MODE_BINARY, MODE_RAW

from .codec import CorruptValue
from .safedir import create_value, open_value, unlink_value

__all__ = ["RawOnlyDisk", "BoundedCache", "ReadOnlyCache", "read_row"]

# The one read of a value: its row, with the row's own value only when it is
# short enough to be one the store wrote (SQLite knows a blob's length
# without reading it).
_ROW = ("SELECT mode, filename, size, CASE WHEN length(value) < ? THEN value END, length(value) FROM Cache"
        " WHERE key = ? AND raw = 1 AND (expire_time IS NULL OR expire_time > ?)")


class _Chunks:
    """A file-like reader over a buffer, for diskcache's ``read=True`` store:
    each ``read`` is a slice of the buffer, not a copy of it."""

    def __init__(self, view: memoryview) -> None:
        self._view, self._at = view, 0

    def read(self, size: int) -> memoryview:
        chunk = self._view[self._at : self._at + size]
        self._at += len(chunk)
        return chunk


class RawOnlyDisk(diskcache.Disk):
    """diskcache's serializer, narrowed to raw ``bytes`` values and ``str`` keys."""

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> tuple:
        if type(value) is memoryview:
            if len(value) < self.min_file_size:  # a row's blob: a copy of under 32 KiB
                return super().store(bytes(value), False, key=key)
            return super().store(_Chunks(value.cast("B")), True, key=key)
        if type(value) is not bytes:
            raise TypeError(f"the disk tier stores bytes only, got {type(value).__name__}")
        return super().store(value, read, key=key)

    root: int  # the directory's file descriptor, attached by the tier that checked it (safedir)

    def get(self, key: Any, raw: bool) -> Any:
        # A non-raw key is a pickle; hand back its bytes uninterpreted (the
        # tier's ``keys`` keeps str keys only).
        return super().get(key, raw) if raw else bytes(key)

    def _write(self, full_path: str, iterator: Any, mode: str, encoding: str | None = None) -> int:
        # diskcache's file writer, from ``root`` without following a link; a
        # subdirectory another process removed meanwhile is made again.
        name = os.path.relpath(full_path, self._directory)
        for attempt in range(10):
            try:
                writer = create_value(self.root, name)
            except FileNotFoundError:
                if attempt == 9:
                    raise
                continue
            with writer:
                size = 0
                for chunk in iterator:
                    size += len(chunk)
                    writer.write(chunk)
                return size

    def remove(self, file_path: str) -> None:
        unlink_value(self.root, file_path)

    def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> Any:
        # The tier reads through ``value`` only; diskcache's own read paths
        # get a row's raw bytes and nothing else (never a pickle, never a file).
        if mode == MODE_RAW and isinstance(value, (bytes, memoryview)):
            return bytes(value)
        raise CorruptValue(f"stored with diskcache mode {mode}, or in a file; refused unread")

    def value(self, row: tuple, limit: int) -> bytes | BinaryIO:
        """The value of a ``read_row`` row: the row's bytes, or its file
        opened unbuffered (at most ``limit`` bytes, its recorded size).
        ``CorruptValue`` for anything the store does not write: another
        storage mode (a pickle), a row value too long for a row, a planted
        link or special file, a file of another size; ``OSError`` when the
        file is missing or unreadable."""
        mode, filename, size, blob, length = row
        if mode == MODE_RAW and type(blob) is bytes:
            return blob
        if mode == MODE_RAW and length is not None and blob is None:
            raise CorruptValue(f"a row value of {length} bytes, at least the {self.min_file_size} a file "
                               "would hold; refused unread")
        if mode == MODE_BINARY and type(size) is int:
            return open_value(self.root, filename, size, limit)
        raise CorruptValue(f"stored with diskcache mode {mode}, not as raw bytes; refused unread")


def read_row(sql: Any, disk: RawOnlyDisk, key: str) -> tuple | None:
    """The row of ``key`` for ``RawOnlyDisk.value``, or None. ``sql`` is the
    cache's statement runner (both cache classes have ``_sql``)."""
    rows = sql(_ROW, (disk.min_file_size, key, time.time())).fetchall()
    return rows[0] if rows else None


class BoundedCache(diskcache.Cache):
    """``diskcache.Cache`` whose set-up (which writes its settings) waits at
    most ``timeout`` seconds in all for another process's write lock;
    diskcache retries those statements for 60 s whatever its timeout."""

    def __init__(self, directory: str, timeout: float, **settings: Any) -> None:
        self._deadline: float | None = time.monotonic() + timeout
        super().__init__(directory, timeout=timeout, **settings)
        self._deadline = None

    @property
    def _sql_retry(self) -> Any:
        sql = self._sql
        deadline = self._deadline if self._deadline is not None else time.monotonic() + self._timeout

        def execute(statement: str, *args: Any) -> sqlite3.Cursor:
            while True:
                try:
                    return sql(statement, *args)
                except sqlite3.OperationalError as error:
                    if str(error) != "database is locked" or time.monotonic() > deadline:
                        raise
                    time.sleep(0.001)

        return execute


class ReadOnlyCache:
    """The reads ``DiskTier`` makes, on a database SQLite opens without
    writing (module docstring). For a store opened read-only on purpose
    (the command line's read-only commands) and for a directory this process
    cannot write (a read-only mount, a root-owned site cache, a full disk
    that refused diskcache's setup writes, SQLite's write lock held past the
    timeout). Same rows, same raw-only reads as the writable tier."""

    def __init__(self, directory: Path, timeout: float, root: int) -> None:
        self._directory, self._timeout = directory, timeout
        self.disk = RawOnlyDisk(str(directory))
        self.disk.root = root
        self._local = threading.local()
        rows = dict(self._sql("SELECT key, value FROM Settings").fetchall())
        self.size_limit = int(rows.get("size_limit", 0))
        self.disk.min_file_size = int(rows.get("disk_min_file_size", diskcache.DEFAULT_SETTINGS["disk_min_file_size"]))
        self._page_size = int(self._sql("PRAGMA page_size").fetchone()[0])
        self._stored_size = int(rows.get("size", 0))

    def _connect(self) -> sqlite3.Connection:
        database = self._directory / diskcache.core.DBNAME
        live = all(Path(f"{database}{suffix}").exists() for suffix in ("-wal", "-shm"))
        modes = ("mode=ro", "immutable=1") if live else ("immutable=1",)
        failure: sqlite3.Error | None = None
        for mode in modes:  # mode=ro fails where the -shm file cannot be opened: immutable then
            connection = sqlite3.connect(f"file:{urllib.parse.quote(str(database))}?{mode}", uri=True,
                                         timeout=self._timeout, isolation_level=None)
            try:
                connection.execute("SELECT 1 FROM Cache LIMIT 1").fetchall()
                return connection
            except sqlite3.OperationalError as error:
                connection.close()
                failure = error
        raise failure

    def _sql(self, statement: str, parameters: tuple = ()) -> sqlite3.Cursor:
        if getattr(self._local, "pid", None) != os.getpid():
            self._local.pid, self._local.connection = os.getpid(), None
        if self._local.connection is None:
            self._local.connection = self._connect()
        return self._local.connection.execute(statement, parameters)

    def __contains__(self, key: str) -> bool:
        query = "SELECT 1 FROM Cache WHERE key = ? AND raw = 1 AND (expire_time IS NULL OR expire_time > ?)"
        return bool(self._sql(query, (key, time.time())).fetchall())

    def iterkeys(self) -> Iterator[Any]:
        return iter([key for (key,) in self._sql("SELECT key FROM Cache WHERE raw = 1 ORDER BY key").fetchall()])

    def volume(self) -> int:
        return self._page_size * int(self._sql("PRAGMA page_count").fetchone()[0]) + self._stored_size

    def close(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None and getattr(self._local, "pid", None) == os.getpid():
            connection.close()
        self._local.connection = None
