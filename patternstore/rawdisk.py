"""What the disk tier reads and writes in a diskcache directory, and how it
reads one without writing: ``RawOnlyDisk`` (diskcache's serializer narrowed
to raw bytes) and ``ReadOnlyCache`` (the tier's reads on SQLite, opened so
that nothing in the directory is created or changed).

Guarantees:
- Nothing read is ever unpickled. diskcache stores a ``bytes`` value raw (in
  SQLite below 32 KiB, else in a file) and pickles every other type; anyone
  who can write the directory can plant a pickle that runs code when loaded.
  ``RawOnlyDisk.fetch`` returns only raw bytes and refuses every other
  storage mode with ``CorruptValue`` before touching the data;
  ``RawOnlyDisk.get`` never unpickles a key either.
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
from typing import Any, Iterator

import diskcache
from diskcache.core import MODE_BINARY, MODE_RAW

from .codec import CorruptValue

__all__ = ["RawOnlyDisk", "ReadOnlyCache"]


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

    def get(self, key: Any, raw: bool) -> Any:
        # A non-raw key is a pickle; hand back its bytes uninterpreted (the
        # tier's ``keys`` keeps str keys only).
        return super().get(key, raw) if raw else bytes(key)

    def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> Any:
        if mode == MODE_RAW and isinstance(value, (bytes, memoryview)):
            return bytes(value)  # a blob under 32 KiB, inside the database row
        if mode == MODE_BINARY and filename and not os.path.isabs(filename) and ".." not in filename:
            # A missing file raises OSError, which Cache.get turns into a miss.
            # Unbuffered: a reader's readinto goes straight into its buffer.
            handle = open(os.path.join(self._directory, filename), "rb", buffering=0)
            if read:
                return handle
            with handle:
                return handle.read()
        # MODE_PICKLE, MODE_TEXT, numbers, or a filename pointing elsewhere:
        # not something this tier wrote. Refused without reading it.
        raise CorruptValue(f"stored with diskcache mode {mode}, not as raw bytes; refused unread")


class ReadOnlyCache:
    """The reads ``DiskTier`` makes, on a database SQLite opens without
    writing (module docstring). For a store opened read-only on purpose
    (the command line's read-only commands) and for a directory this process
    cannot write (a read-only mount, a shared cache of another user, a full
    disk that refused diskcache's setup writes). Same rows, same raw-only
    fetch as the writable tier."""

    def __init__(self, directory: Path, timeout: float) -> None:
        self._directory, self._timeout = directory, timeout
        self._disk = RawOnlyDisk(str(directory))
        self._local = threading.local()
        rows = dict(self._sql("SELECT key, value FROM Settings").fetchall())
        self.size_limit = int(rows.get("size_limit", 0))
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

    def get(self, key: str, default: Any = None, read: bool = False, tag: bool = False) -> Any:
        rows = self._sql(
            "SELECT tag, mode, filename, value FROM Cache WHERE key = ? AND raw = 1"
            " AND (expire_time IS NULL OR expire_time > ?)", (key, time.time()),
        ).fetchall()
        found: Any = default
        stored_tag = None
        if rows:
            ((stored_tag, mode, filename, value),) = rows
            try:
                found = self._disk.fetch(mode, filename, value, read)
            except OSError:
                found, stored_tag = default, None  # deleted meanwhile
        return (found, stored_tag) if tag else found

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
