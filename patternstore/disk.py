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
- Trusted or unused: a directory that anyone but this user (and root) can
  change, through its own owner and mode or those of the path to it, is
  refused at open (``safedir.open_directory``; ``DiskUnavailable``, the
  store then serves from memory with one warning). Inside it nothing is
  followed through a link, no special file is opened, and no value file is
  read unless its size is the one its row records (``safedir``,
  ``rawdisk``): what is not a file the store wrote is ``CorruptValue``.
- Failures degrade, never raise: a directory that cannot be created, opened
  or read raises ``DiskUnavailable`` from the constructor (the store goes on
  in memory), naming the cause with errno and path as the OS gave them
  (``DamagedStore`` for a database that is not one: ``rebuild``); a store
  directory that cannot be written (read-only mount, full disk, SQLite's
  write lock held past ``timeout``) is read as it is (``read_only``), with
  one warning; a failed write returns False, warns once, and stops further
  writes; a failed read is a miss.
- Never hangs: SQLite waits at most ``timeout`` seconds for another writer,
  at open too (``rawdisk.BoundedCache``), then the operation fails as above;
  nothing in the directory that is not a regular file is ever opened.
- A directory deleted or replaced under an open tier is noticed before the
  next write (the device and inode of the directory and of its database are
  compared with those opened): the tier opens the directory the path names
  now, creating it mode 0700 whatever the umask, or stops writing with one
  warning. A write is never reported stored into a database that no other
  process can open.
- The directory is created with mode 0700; a directory on a network
  filesystem, where SQLite's locking is unreliable, gets one warning.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import stat
import threading
import time
import warnings
import weakref
from pathlib import Path
from typing import BinaryIO

import diskcache
from diskcache.core import MODE_BINARY, MODE_RAW

from .codec import CorruptValue, decode_packed
from .pattern import PackedPattern
from .diskerrors import (
    DISK_ERRORS, DamagedStore, DiskUnavailable, PatternStoreWarning, UntrustedDirectory, damaged, why,
)
from .rawdisk import BoundedCache, RawOnlyDisk, ReadOnlyCache, read_row
from .safedir import (
    NETWORK_FILESYSTEMS, Untrusted, close_all, filesystem_type, make_directory, open_directory, read_exactly,
    remove_entry, walk_values,
)

DEFAULT_SIZE_LIMIT = 8 << 30  # bytes; the limit a new directory gets
DATABASE_FILES = (diskcache.core.DBNAME, f"{diskcache.core.DBNAME}-wal", f"{diskcache.core.DBNAME}-shm")

# Caches inherited from a parent process: never closed by this one.
_INHERITED: list[diskcache.Cache] = []


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
        seconds SQLite waits for another writer before the operation fails,
        at open as well (diskcache's retry loops are never used: they could
        wait forever on a stuck lock). ``read_only``: open an existing store
        without writing anything."""
        self.directory = Path(directory).expanduser().absolute()
        self.timeout = timeout
        self.writable = not read_only
        self.read_only = read_only  # opened read-only: asked for, or the directory could not be written
        self.write_error: BaseException | None = None  # why writes stopped, if they did
        self._warned: set[str] = set()
        self._size_limit = size_limit
        self._reopening = threading.Lock()
        # Every directory fd this tier opened: a re-opened directory's old fd
        # may still be in use by another thread, so all close with the tier.
        self._roots: list[int] = []
        weakref.finalize(self, close_all, self._roots)
        if read_only:
            self._opened = self._open_existing()
        else:
            self._open_writable()
        self._pid = os.getpid()
        fstype = filesystem_type(self.directory)
        if fstype in NETWORK_FILESYSTEMS:
            self._warn_once(
                "network",
                f"pattern store directory {self.directory} is on a network filesystem ({fstype}); "
                "SQLite locking is unreliable there. Set PATTERNSTORE_DIR to a local directory.",
            )

    # ------------------------------------------------------------ opening
    def _open_root(self, *, create: bool) -> int:
        """The checked directory's fd (``safedir.open_directory``), and its
        database files checked: regular files or absent."""
        try:
            root = open_directory(self.directory, create=create)
        except Untrusted as error:
            raise UntrustedDirectory(f"refusing pattern store directory {self.directory}: {error}; only a "
                                     "directory that nobody but you (and root) can write is used") from None
        except OSError as error:
            if create:
                raise DiskUnavailable(f"cannot use {self.directory}: {why(error)}") from error
            what = {errno.ENOENT: "no such directory: ", errno.ENOTDIR: "not a directory: "}.get(error.errno, "")
            raise DiskUnavailable(f"no pattern store in {self.directory}: {what}{why(error)}") from error
        self._roots.append(root)
        self._identity = _identity(os.fstat(root))
        for name in DATABASE_FILES:
            try:
                info = os.stat(name, dir_fd=root, follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError as error:  # named by its full path, as the OS names it
                full = OSError(error.errno, error.strerror, str(self.directory / name))
                raise DiskUnavailable(f"cannot use {self.directory}: {full}") from error
            if not stat.S_ISREG(info.st_mode):
                raise DamagedStore(f"pattern store database {self.directory / name} is not a regular file "
                                   "(a link or a special file, never opened); 'patternstore verify --repair' "
                                   "rebuilds the store", self.directory)
        return root

    def _has_database(self, root: int) -> bool:
        try:
            os.stat(diskcache.core.DBNAME, dir_fd=root, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def _open_existing(self) -> ReadOnlyCache:
        root = self._open_root(create=False)
        if not self._has_database(root):
            raise DiskUnavailable(f"no pattern store in {self.directory}: it holds no {diskcache.core.DBNAME}")
        try:
            opened = ReadOnlyCache(self.directory, self.timeout, root)
        except DISK_ERRORS as error:
            self._refuse(error, "cannot read pattern store")
        self._root = root
        return opened

    def _refuse(self, error: BaseException, what: str) -> None:
        if damaged(error):
            raise DamagedStore(f"pattern store database {self.directory / diskcache.core.DBNAME} is damaged "
                               f"({why(error)}); 'patternstore verify --repair' rebuilds the store, keeping "
                               "the value files that verify", self.directory) from error
        raise DiskUnavailable(f"{what} {self.directory}: {why(error)}") from error

    def _open_writable(self) -> None:
        """Open (or create) the directory for writing; where it cannot be
        written, read it as it is, with one warning."""
        root = self._open_root(create=True)
        self._root = root
        existed = self._has_database(root)
        size_limit = DEFAULT_SIZE_LIMIT if self._size_limit is None and not existed else self._size_limit
        try:
            make_directory(root, "locks")
            self._opened = self._open(size_limit)
            if _identity(os.stat(self.directory)) != self._identity:
                raise FileNotFoundError(f"{self.directory} was replaced while it was opened")
        except DISK_ERRORS as error:
            if damaged(error) or not existed:
                self._refuse(error, "cannot use")
            # A store this process cannot write (read-only mount, the write
            # lock held past the timeout): read it as it is (docs/design.md
            # section 3.5).
            self.read_only, self.writable, self.write_error = True, False, error
            try:
                self._opened = self._open(size_limit)
            except DISK_ERRORS as read_error:
                raise DiskUnavailable(f"cannot use {self.directory}: {why(error)}; read-only: "
                                      f"{why(read_error)}") from error
            locked = isinstance(error, sqlite3.OperationalError) and str(error) == "database is locked"
            cause = (f"another process held SQLite's write lock for over lock_timeout={self.timeout:g}s"
                     if locked else why(error))
            self._warn_once("write", f"cannot write pattern store {self.directory} ({cause}); reading it "
                                     "read-only, patterns it lacks are kept in memory only")
        self._database = self._database_identity()

    def _open(self, size_limit: int | None) -> diskcache.Cache | ReadOnlyCache:
        if self.read_only:
            return ReadOnlyCache(self.directory, self.timeout, self._root)
        asked = {} if size_limit is None else {"size_limit": size_limit}  # else the directory's own
        cache = BoundedCache(
            str(self.directory),
            self.timeout,
            disk=RawOnlyDisk,
            eviction_policy=self.EVICTION_POLICY,
            statistics=False,  # hit counting would make reads write, too
            **asked,
        )
        cache.disk.root = self._root
        return cache

    def _database_identity(self) -> tuple[int, int] | None:
        try:
            return _identity(os.stat(diskcache.core.DBNAME, dir_fd=self._root, follow_symlinks=False))
        except OSError:
            return None

    def _still_there(self) -> bool:
        """The path names the directory and database this tier opened."""
        try:
            here = _identity(os.stat(self.directory))
        except OSError:
            return False
        return here == self._identity and self._database_identity() == self._database

    def _ensure_directory(self) -> bool:
        """Before a write: the directory the path names now, re-opened (and
        re-created mode 0700) when it was deleted or replaced; False, with
        one warning, when it cannot be."""
        if self._still_there():
            return True
        with self._reopening:
            if self._still_there():  # another thread re-opened it
                return True
            if self._pid != os.getpid():  # a forked child never closes what it inherited
                _INHERITED.append(self._opened)
            try:
                self._open_writable()
            except DiskUnavailable as error:
                self.writable, self.write_error = False, error
                self._warn_once("write", f"pattern store directory {self.directory} was deleted or replaced and "
                                         f"cannot be opened again ({error}); patterns are kept in memory only "
                                         "from now on")
                return False
            self._pid = os.getpid()
            if not self.writable:  # opened read-only (warned)
                return False
            self._warn_once("reopened", f"pattern store directory {self.directory} was deleted or replaced while "
                                        "open; writing to the one there now (created mode 0700 if missing)")
            return True

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

    def reset_lock(self) -> None:
        """A fresh re-open lock (after fork(): another thread may have held it)."""
        self._reopening = threading.Lock()

    def _warn_once(self, topic: str, message: str) -> None:
        if topic not in self._warned:
            self._warned.add(topic)
            warnings.warn(message, PatternStoreWarning, stacklevel=4)

    # ------------------------------------------------------------ values
    def read(self, key: str) -> bytes | None:
        """The stored bytes of ``key``, or None when absent or unreadable.

        Raises ``CorruptValue`` when the entry is not one the store writes
        (a planted pickle, link or special file; a file of another size):
        it is refused without being read."""
        source = self.source(key)
        if source is None or isinstance(source, bytes):
            return source
        try:
            with source:
                return read_exactly(source)
        except OSError as error:
            self.read_failed(error)
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
            cache = self._cache
            row = read_row(cache._sql, cache.disk, key)
            return None if row is None else cache.disk.value(row, cache.size_limit)
        except FileNotFoundError:
            return None  # deleted meanwhile
        except DISK_ERRORS as error:
            self.read_failed(error)
            return None

    def read_failed(self, error: BaseException) -> None:
        """Note a failed read (here, or of a file ``source`` opened): one
        warning; the caller treats the value as missing."""
        self._warn_once("read", f"cannot read pattern store {self.directory}: {why(error)}; regenerating")

    def write(self, key: str, value: bytes | memoryview) -> bool:
        """Store ``value`` under ``key`` (the write time becomes its tag); a
        ``memoryview`` (``codec.encode_packed``'s) is written from where it is.
        False when the disk refused it; after the first failure (warned once)
        no further write is tried."""
        if not self.writable or not self._ensure_directory():
            return False
        try:
            return bool(self._cache.set(key, value, tag=time.time()))
        except DISK_ERRORS as error:
            self.writable, self.write_error = False, error
            self._warn_once(
                "write",
                f"cannot write pattern store {self.directory}: {why(error)}; "
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

    def check_database(self) -> str | None:
        """SQLite's own check of the database (``PRAGMA quick_check``, a
        pass over every page): None when sound, else what it found."""
        try:
            rows = self._cache._sql("PRAGMA quick_check").fetchall()
        except sqlite3.DatabaseError as error:
            return why(error)
        found = [row[0] for row in rows]
        return None if found == ["ok"] else "; ".join(map(str, found[:3]))

    # ------------------------------------------------------------ reading
    def keys(self) -> list[str]:
        """Stored keys, oldest write first (str keys only)."""
        try:
            return [key for key in self._cache.iterkeys() if type(key) is str]
        except DISK_ERRORS:
            return []

    def stored_at(self, key: str) -> float | None:
        """Unix time of the last write of ``key``, or None (also for an entry
        stored in a mode the store never writes, e.g. a planted pickle)."""
        try:
            rows = self._cache._sql("SELECT tag FROM Cache WHERE key = ? AND raw = 1 AND mode IN (?, ?) AND "
                                    "(expire_time IS NULL OR expire_time > ?)",
                                    (key, MODE_RAW, MODE_BINARY, time.time())).fetchall()
        except DISK_ERRORS:
            return None
        tag = rows[0][0] if rows else None
        return float(tag) if isinstance(tag, (int, float)) else None

    def volume(self) -> int:
        """Bytes the directory takes on disk (database and value files)."""
        try:
            return self._cache.volume()
        except DISK_ERRORS:
            return 0

    def orphans(self, min_age: float = 3600.0) -> list[Path]:
        """Value files that no entry refers to and that were last written more
        than ``min_age`` seconds ago, and, whatever their age, links and
        special files where value files or their subdirectories belong
        (planted: the store makes none). A writer inserts its row right after
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
        return [
            self.directory / name for name, info in walk_values(self._root)
            if not stat.S_ISREG(info.st_mode) or (info.st_mtime < cutoff and name not in referenced)
        ]

    def remove(self, paths: list[Path]) -> list[Path]:
        """Delete ``paths`` (``orphans`` results), never through a link (a
        planted link itself is deleted); the ones that could not be."""
        left = []
        for path in paths:
            try:
                name = path.relative_to(self.directory).as_posix()
            except ValueError:  # not in this directory: never touched
                left.append(path)
                continue
            if not remove_entry(self._root, name):
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
        """The file that serializes generation of ``key`` across processes.
        Asked right before a generation that will be written: a directory
        deleted or replaced meanwhile is re-opened first (``write``)."""
        self._ensure_directory()
        return self.directory / "locks" / f"{key}.lock"

    def lock_paths(self) -> list[Path]:
        """Every lock file present, in key order (none when ``locks`` is not
        a real directory: never listed through a link)."""
        try:
            info = os.stat("locks", dir_fd=self._root, follow_symlinks=False)
        except OSError:
            return []
        if not stat.S_ISDIR(info.st_mode):
            return []
        return sorted(path for path in (self.directory / "locks").glob("*.lock") if path.is_file()
                      and not path.is_symlink())


def _identity(info: os.stat_result) -> tuple[int, int]:
    return info.st_dev, info.st_ino
