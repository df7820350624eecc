"""``DiskTier``: the process-shared directory of pattern envelopes.

A ``diskcache.Cache`` whose keys are ``spec.key`` strings and whose values are
``codec`` values (format 2: a header and the raw arrays). The read protocol
lives in one place, ``read_packed``: a value under 32 KiB comes from its
SQLite row, a larger one is a file that ``source`` hands over open and
unbuffered, and either is read once straight into the aligned buffer the
memory tier then holds (``codec.decode_packed``). Guarantees (each kept by
the code next to it):

- Nothing read from the directory is ever unpickled (``rawdisk.RawOnlyDisk``);
  ``codec.decode_packed`` then checks the bytes themselves.
- A value is written whole or not at all: diskcache writes the value file
  first and then inserts its row in one SQLite transaction, so a process
  killed mid-write leaves at most an orphan file, never a row pointing at
  half a value. ``orphans`` lists such files once they are an hour old (a
  write in progress never is) and ``remove`` deletes them (``patternstore
  verify --repair``). (Anything else, such as a disk fault, is caught by the
  envelope checksum.)
- Reads never write (eviction policy below), so readers in many processes
  never contend for SQLite's write lock.
- Opened with ``read_only=True``, the tier creates and changes nothing in
  the directory, not even SQLite's side files (``rawdisk.ReadOnlyCache``); a
  directory without a store is then ``DiskUnavailable``, never created.
- Opening never rewrites a persisted setting unless asked: without a
  ``size_limit`` an existing directory keeps its own limit (a new one gets
  ``DEFAULT_SIZE_LIMIT``).
- Failures degrade, never raise: a directory that cannot be created or
  opened raises ``DiskUnavailable`` from the constructor (the store goes on in
  memory); a store directory that cannot be written (read-only mount, full
  disk, another user's files) is opened read-only (``read_only``): it is
  read as it is, with one warning, and nothing is written; a failed write
  (full disk, read-only directory, SQLite error) returns False, warns once,
  and stops further writes; a failed read is a miss.
- Never hangs: SQLite waits at most ``timeout`` seconds for another writer,
  then the operation fails as above.
- The directory is created with mode 0700; a directory on a network
  filesystem, where SQLite's locking is unreliable, gets one warning.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
import warnings
from pathlib import Path
from typing import BinaryIO

import diskcache

from .codec import CorruptValue, decode_packed
from .pattern import PackedPattern
from .rawdisk import RawOnlyDisk, ReadOnlyCache

DEFAULT_SIZE_LIMIT = 8 << 30  # bytes; the limit a new directory gets

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


class DiskTier:
    """Pattern envelopes in ``directory``, shared by every process that opens it."""

    # 'least-recently-stored', not 'least-recently-used': LRU makes every get
    # an UPDATE of the row's access time, i.e. a write transaction per read,
    # which serializes readers across processes on SQLite's write lock and
    # churns the WAL. The memory tier already keeps hot patterns; the disk
    # tier only needs a bound, and dropping the oldest write is a fine one.
    EVICTION_POLICY = "least-recently-stored"

    def __init__(self, directory: str | os.PathLike, size_limit: int | None = None, timeout: float = 60.0,
                 *, read_only: bool = False) -> None:
        """``size_limit``: bytes the directory may take (None: what the
        directory has, ``DEFAULT_SIZE_LIMIT`` for a new one). ``timeout``:
        seconds SQLite waits for another writer before the operation fails
        (diskcache's retry loops are never used: they could wait forever on
        a stuck lock). ``read_only``: open an existing store without writing
        anything."""
        self.directory = Path(directory).expanduser().absolute()
        self.timeout = timeout
        self.writable = not read_only
        self.read_only = read_only  # opened read-only: asked for, or the directory could not be written
        self.write_error: BaseException | None = None  # why writes stopped, if they did
        self._warned: set[str] = set()
        if read_only:
            self._opened = self._open_existing()
        else:
            self._open_writable(size_limit)
        self._pid = os.getpid()
        fstype = filesystem_type(self.directory)
        if fstype in NETWORK_FILESYSTEMS:
            self._warn_once(
                "network",
                f"pattern store directory {self.directory} is on a network filesystem ({fstype}); "
                "SQLite locking is unreliable there. Set PATTERNSTORE_DIR to a local directory.",
            )

    def _open_existing(self) -> ReadOnlyCache:
        if not self.directory.is_dir():
            why = "not a directory" if self.directory.exists() else "no such directory"
            raise DiskUnavailable(f"no pattern store in {self.directory}: {why}")
        if not (self.directory / diskcache.core.DBNAME).is_file():
            raise DiskUnavailable(f"no pattern store in {self.directory}: it holds no {diskcache.core.DBNAME}")
        try:
            return ReadOnlyCache(self.directory, self.timeout)
        except DISK_ERRORS as error:
            raise DiskUnavailable(f"cannot read pattern store {self.directory}: {error}") from error

    def _open_writable(self, size_limit: int | None) -> None:
        if size_limit is None and not (self.directory / diskcache.core.DBNAME).is_file():
            size_limit = DEFAULT_SIZE_LIMIT
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

    def _open(self, size_limit: int | None) -> diskcache.Cache | ReadOnlyCache:
        if self.read_only:
            return ReadOnlyCache(self.directory, self.timeout)
        asked = {} if size_limit is None else {"size_limit": size_limit}  # else the directory's own
        return diskcache.Cache(
            str(self.directory),
            timeout=self.timeout,
            disk=RawOnlyDisk,
            eviction_policy=self.EVICTION_POLICY,
            statistics=False,  # hit counting would make reads write, too
            **asked,
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

    def read_packed(self, key: str) -> tuple[PackedPattern | None, CorruptValue | None]:
        """(the value of ``key`` decoded, or None; the refusal of a stored
        value, or None). The value is read once, into the buffer the memory
        tier then holds as it is (``codec.decode_packed``); a file that
        vanishes or fails mid-read is a miss (one warning)."""
        try:
            source = self.source(key)
            if source is None:
                return None, None
            try:
                return decode_packed(source, key), None
            finally:
                if hasattr(source, "close"):
                    source.close()
        except CorruptValue as refusal:
            return None, refusal
        except OSError as error:
            self.read_failed(error)
            return None, None

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

    def write(self, key: str, value: bytes | memoryview) -> bool:
        """Store ``value`` under ``key`` (the write time becomes its tag); a
        ``memoryview`` (``codec.encode_packed``'s) is written from where it is.
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
