"""``DiskTier``: the process-shared directory of pattern envelopes.

A ``diskcache.Cache`` whose keys are ``spec.key`` strings and whose values are
``codec.encode`` bytes (format 2: a header and the raw arrays). A value over
32 KiB is a file, which ``source`` hands over open and unbuffered, so the
reader reads it once straight into its own buffer. Guarantees (each kept by the code next to it):

- Nothing read from the directory is ever unpickled. diskcache stores a
  ``bytes`` value raw (in SQLite below 32 KiB, else in a file) and pickles
  every other type; anyone who can write the directory can plant a pickle
  that runs code when loaded. ``_RawOnlyDisk.fetch`` returns only raw bytes
  and refuses every other storage mode with ``CorruptValue`` before touching
  the data; ``_RawOnlyDisk.get`` never unpickles a key either. ``codec.decode``
  then checks the bytes themselves.
- A value is written whole or not at all: diskcache writes the value file
  first and then inserts its row in one SQLite transaction, so a process
  killed mid-write leaves at most an orphan file, never a row pointing at
  half a value. ``orphans`` lists such files once they are an hour old (a
  write in progress never is) and ``remove`` deletes them (``patternstore
  verify --repair``). (Anything else, such as a disk fault, is caught by the
  envelope checksum.)
- Reads never write (eviction policy below), so readers in many processes
  never contend for SQLite's write lock.
- Failures degrade, never raise: a directory that cannot be created or
  opened raises ``DiskUnavailable`` from the constructor (the store goes on in
  memory); a store directory that cannot be written (read-only mount, full
  disk, another user's files) is opened read-only (``read_only``): it is
  read as it is, with one warning, and nothing is written; a failed write (full disk, read-only directory, SQLite error)
  returns False, warns once, and stops further writes; a failed read is a miss.
- Never hangs: SQLite waits at most ``timeout`` seconds for another writer,
  then the operation fails as above.
- The directory is created with mode 0700; a directory on a network
  filesystem, where SQLite's locking is unreliable, gets one warning.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
import urllib.parse
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import diskcache
from diskcache.core import MODE_BINARY, MODE_RAW

from .codec import CorruptValue

# Filesystems on which SQLite's file locking is not to be trusted.
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smbfs", "smb3", "9p", "afs", "ncpfs", "lustre", "gpfs", "beegfs",
    "ceph", "glusterfs", "fuse.sshfs", "fuse.ceph", "fuse.glusterfs", "fuse.s3fs", "fuse.gcsfuse",
    "fuse.rclone", "davfs", "fuse.davfs2",
})

# Errors a disk operation can raise when the directory or the disk is at
# fault; each becomes a warning and a miss, never an exception to the caller.
DISK_ERRORS = (OSError, sqlite3.Error, diskcache.Timeout)


# Caches inherited from a parent process: never closed by this one.
_INHERITED: list[diskcache.Cache] = []


class PatternStoreWarning(UserWarning):
    """The store works on, with less than it was asked for (see the message)."""


class DiskUnavailable(RuntimeError):
    """The directory cannot be used at all; the store keeps patterns in memory."""


class _RawOnlyDisk(diskcache.Disk):
    """diskcache's serializer, narrowed to raw ``bytes`` values and ``str`` keys."""

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> tuple:
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


def filesystem_type(path: Path, mounts_file: str = "/proc/mounts") -> str | None:
    """The fstype of the mount holding ``path``, or None where unknown
    (no /proc/mounts: not Linux)."""
    try:
        with open(mounts_file, encoding="utf-8") as mounts:
            lines = mounts.read().splitlines()
    except OSError:
        return None
    target, best, fstype = str(path.resolve()), -1, None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        # /proc/mounts writes space, tab, newline and backslash as \ooo.
        mount = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) > best:
            best, fstype = len(mount), fields[2]
    return fstype


class _ReadOnlyCache:
    """The reads ``DiskTier`` makes, on a database SQLite opens read-only
    (``mode=ro``; ``immutable=1`` where even that needs a file it cannot
    create, i.e. a WAL database without its ``-shm`` file in a read-only
    directory). For a directory this process cannot write: a read-only mount,
    a shared cache of another user, a full disk that refused diskcache's
    setup writes. Same rows, same raw-only fetch as the writable tier."""

    def __init__(self, directory: Path, timeout: float) -> None:
        self._directory, self._timeout = directory, timeout
        self._disk = _RawOnlyDisk(str(directory))
        self._local = threading.local()
        self._uri_mode = "mode=ro"
        try:
            self._sql("SELECT 1 FROM Cache LIMIT 1").fetchall()
        except sqlite3.OperationalError:
            self.close()
            self._uri_mode = "immutable=1"
            self._sql("SELECT 1 FROM Cache LIMIT 1").fetchall()
        rows = dict(self._sql("SELECT key, value FROM Settings").fetchall())
        self.size_limit = int(rows.get("size_limit", 0))
        self._page_size = int(self._sql("PRAGMA page_size").fetchone()[0])
        self._stored_size = int(rows.get("size", 0))

    def _sql(self, statement: str, parameters: tuple = ()) -> sqlite3.Cursor:
        if getattr(self._local, "pid", None) != os.getpid():
            self._local.pid, self._local.connection = os.getpid(), None
        if self._local.connection is None:
            path = urllib.parse.quote(str(self._directory / diskcache.core.DBNAME))
            self._local.connection = sqlite3.connect(
                f"file:{path}?{self._uri_mode}", uri=True, timeout=self._timeout, isolation_level=None,
            )
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


class DiskTier:
    """Pattern envelopes in ``directory``, shared by every process that opens it."""

    # 'least-recently-stored', not 'least-recently-used': LRU makes every get
    # an UPDATE of the row's access time, i.e. a write transaction per read,
    # which serializes readers across processes on SQLite's write lock and
    # churns the WAL. The memory tier already keeps hot patterns; the disk
    # tier only needs a bound, and dropping the oldest write is a fine one.
    EVICTION_POLICY = "least-recently-stored"

    def __init__(self, directory: str | os.PathLike, size_limit: int = 8 << 30, timeout: float = 60.0) -> None:
        """``timeout``: seconds SQLite waits for another writer before the
        operation fails (diskcache's retry loops are never used: they could
        wait forever on a stuck lock)."""
        self.directory = Path(directory).expanduser().absolute()
        self.timeout = timeout
        self.writable = True
        self.read_only = False  # opened read-only: the directory could not be written
        self.write_error: BaseException | None = None  # why writes stopped, if they did
        self._warned: set[str] = set()
        try:
            if not self.directory.is_dir():
                self.directory.mkdir(mode=0o700, parents=True)
                self.directory.chmod(0o700)  # exactly 0700, whatever the umask
            (self.directory / "locks").mkdir(mode=0o700, exist_ok=True)
            self._opened = self._open(size_limit)
        except DISK_ERRORS as error:
            if not (self.directory / diskcache.core.DBNAME).is_file():
                raise DiskUnavailable(f"cannot use {self.directory}: {error}") from error
            # A store someone else wrote, which this process cannot write:
            # read it as it is (docs/design.md section 3.3).
            self.read_only, self.writable, self.write_error = True, False, error
            try:
                self._opened = self._open(size_limit)
            except DISK_ERRORS as read_error:
                raise DiskUnavailable(f"cannot use {self.directory}: {error}; read-only: {read_error}") from error
            self._warn_once(
                "write",
                f"cannot write pattern store {self.directory} ({error}); reading it read-only, "
                "patterns it lacks are kept in memory only",
            )
        self._pid = os.getpid()
        fstype = filesystem_type(self.directory)
        if fstype in NETWORK_FILESYSTEMS:
            self._warn_once(
                "network",
                f"pattern store directory {self.directory} is on a network filesystem ({fstype}); "
                "SQLite locking is unreliable there. Set PATTERNSTORE_DIR to a local directory.",
            )

    def _open(self, size_limit: int) -> diskcache.Cache | _ReadOnlyCache:
        if self.read_only:
            return _ReadOnlyCache(self.directory, self.timeout)
        return diskcache.Cache(
            str(self.directory),
            timeout=self.timeout,
            disk=_RawOnlyDisk,
            size_limit=size_limit,
            eviction_policy=self.EVICTION_POLICY,
            statistics=False,  # hit counting would make reads write, too
        )

    @property
    def _cache(self) -> diskcache.Cache:
        """The diskcache of this process. SQLite forbids using, or even
        closing, a connection inherited through fork(): a forked child opens
        its own and keeps the inherited one referenced, unclosed, for good."""
        if self._pid != os.getpid():
            fresh = self._open(self._opened.size_limit)
            _INHERITED.append(self._opened)
            self._opened, self._pid = fresh, os.getpid()
        return self._opened

    def _warn_once(self, topic: str, message: str) -> None:
        if topic not in self._warned:
            self._warned.add(topic)
            warnings.warn(message, PatternStoreWarning, stacklevel=4)

    # ------------------------------------------------------------ values
    def read(self, key: str) -> bytes | None:
        """The stored bytes of ``key``, or None when absent or unreadable.

        Raises ``CorruptValue`` when the entry was not stored as raw bytes
        (e.g. a planted pickle): it is refused without being read."""
        try:
            return self._cache.get(key, default=None)
        except DISK_ERRORS as error:
            self._warn_once("read", f"cannot read pattern store {self.directory}: {error}; regenerating")
            return None

    def source(self, key: str) -> bytes | BinaryIO | None:
        """The stored value of ``key`` for ``codec.decode``: ``bytes`` when
        SQLite holds it (values under 32 KiB), else the value file opened
        unbuffered, for the caller to read once into its own buffer and close;
        None when absent or unreadable. Raises ``CorruptValue`` like ``read``."""
        try:
            return self._cache.get(key, default=None, read=True)
        except DISK_ERRORS as error:
            self.read_failed(error)
            return None

    def read_failed(self, error: BaseException) -> None:
        """Note a failed read (here, or of a file ``source`` opened): one
        warning; the caller treats the value as missing."""
        self._warn_once("read", f"cannot read pattern store {self.directory}: {error}; regenerating")

    def write(self, key: str, value: bytes) -> bool:
        """Store ``value`` under ``key`` (the write time becomes its tag).
        False when the disk refused it; after the first failure (warned once)
        no further write is tried."""
        if not self.writable:
            return False
        try:
            return bool(self._cache.set(key, value, tag=time.time()))
        except DISK_ERRORS as error:
            self.writable, self.write_error = False, error
            self._warn_once(
                "write",
                f"cannot write pattern store {self.directory}: {error}; "
                "patterns are kept in memory only from now on",
            )
            return False

    def delete(self, key: str) -> bool:
        if self.read_only:
            return False
        try:
            return bool(self._cache.delete(key))
        except DISK_ERRORS:
            return False

    def contains(self, key: str) -> bool:
        try:
            return key in self._cache
        except DISK_ERRORS:
            return False

    def clear(self) -> int:
        """Remove every entry; the number removed."""
        if self.read_only:
            return 0
        try:
            return self._cache.clear()
        except DISK_ERRORS:
            return 0

    # ------------------------------------------------------------ reading
    def keys(self) -> list[str]:
        """Stored keys, oldest write first (str keys only)."""
        try:
            return [key for key in self._cache.iterkeys() if type(key) is str]
        except DISK_ERRORS:
            return []

    def stored_at(self, key: str) -> float | None:
        """Unix time of the last write of ``key``, or None."""
        try:
            value, tag = self._cache.get(key, default=None, read=True, tag=True)
        except (CorruptValue, *DISK_ERRORS):
            return None
        if hasattr(value, "close"):
            value.close()
        return float(tag) if isinstance(tag, (int, float)) else None

    def volume(self) -> int:
        """Bytes the directory takes on disk (database and value files)."""
        try:
            return self._cache.volume()
        except DISK_ERRORS:
            return 0

    def orphans(self, min_age: float = 3600.0) -> list[Path]:
        """Value files that no entry refers to and that were last written more
        than ``min_age`` seconds ago. A writer inserts its row right after
        writing its file (waiting at most ``timeout`` for SQLite), so a file
        that old without a row was left by a process that died in between."""
        try:
            # diskcache has no public listing of its value files; its table has
            # (``_sql`` is the query method both cache classes have).
            rows = self._cache._sql("SELECT filename FROM Cache WHERE filename IS NOT NULL").fetchall()
        except DISK_ERRORS:
            return []
        referenced = {filename for (filename,) in rows}
        cutoff = time.time() - min_age
        found = []
        for path in sorted(self.directory.rglob("*.val")):
            try:
                old = path.stat().st_mtime < cutoff
            except OSError:
                continue  # removed meanwhile
            if old and path.relative_to(self.directory).as_posix() not in referenced:
                found.append(path)
        return found

    def remove(self, paths: list[Path]) -> list[Path]:
        """Delete ``paths`` (``orphans`` results); the ones that could not be."""
        left = []
        for path in paths:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                left.append(path)
        return left

    @property
    def size_limit(self) -> int:
        return self._cache.size_limit

    def close(self) -> None:
        """Close this process's SQLite connections (each thread's). The tier
        reopens them on its next use, so this only releases resources, e.g.
        before the directory is copied or handed to another program."""
        self._cache.close()

    def lock_path(self, key: str) -> Path:
        """The file that serializes generation of ``key`` across processes."""
        return self.directory / "locks" / f"{key}.lock"

    def lock_paths(self) -> list[Path]:
        """Every lock file present, in key order."""
        return sorted((self.directory / "locks").glob("*.lock"))
