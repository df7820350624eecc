"""``PatternStore``: patterns by spec, from memory, disk, or generated once.

    get(spec, device)
      memory tier (dict lookup under one lock) ---------------- hit -> Pattern
      disk tier (raw bytes -> codec.decode) ---------------------- hit -> keep in memory
      single flight: per-key thread lock, then per-key file lock,
        look in memory and on disk again, generate(spec), encode, write, keep

Guarantees (each kept by the code next to it):
- Never a wrong pattern: a disk value is used only when ``codec.decode``
  accepts it (checksum, format version, key); anything else is counted in
  ``corrupt``, dropped and regenerated. Cached arrays that a caller changed in
  place are detected on the next hit and rebuilt (``MemoryTier``).
- Never executes what it reads (``DiskTier`` refuses non-raw values unread).
- Single flight: concurrent gets of one missing key, from threads or from
  processes sharing the directory, generate it once. Every wait has a
  deadline of ``lock_timeout`` seconds; past it the caller generates the
  pattern itself (counted in ``lock_timeouts``), so a get never hangs.
- Degrades, never fails: a directory that cannot be created or opened, or a
  disk that refuses writes, leaves the store serving from memory, with one
  warning (``PatternStoreWarning``).
- Every get counts exactly one of ``memory_hits``, ``disk_hits``, ``misses``.
- Works whatever mode the caller is in (``torch.inference_mode``,
  ``torch.export``/fake tensors): a miss or disk hit runs inside
  ``pattern.real_tensors``, so the store's tensors are real, version-counted
  CPU tensors and no fake tensor's data is touched; a memory hit makes no
  tensor at all.
- A store pickles (and deep-copies) as its directory and options, and
  unpickles as the receiving process's store for that directory
  (``store_for``): no lock or tensor is pickled.
- A directory that cannot be written is still read (``read_only``); misses
  are then generated and kept in memory only, with one warning.
"""

from __future__ import annotations

import math
import os
import threading
import time
import warnings
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple

import filelock
import platformdirs

from .codec import CorruptValue, OutdatedValue, decode_packed, encode
from .disk import DiskTier, DiskUnavailable, PatternStoreWarning
from .generate import generate
from .memory import MemoryTier, exact_device
from .pattern import PackedPattern, Pattern, real_tensors
from .specs import DilatedSpec, SparseSpec, Spec, check_int

__all__ = ["PatternStore", "PatternStoreWarning", "default_store", "default_directory", "store_for"]

_SPEC_TYPES = (DilatedSpec, SparseSpec)


def default_directory() -> Path:
    """``$PATTERNSTORE_DIR`` if set, else the user cache directory + patternstore."""
    configured = os.environ.get("PATTERNSTORE_DIR")
    if configured:
        return Path(configured).expanduser()
    return Path(platformdirs.user_cache_dir("patternstore", appauthor=False))


class _KeyLocks:
    """One ``threading.Lock`` per key while anyone wants it (refcounted, so
    the table holds only keys being generated right now)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slots: dict[str, list] = {}  # key -> [Lock, number of holders and waiters]

    @contextmanager
    def hold(self, key: str, timeout: float) -> Iterator[bool]:
        """Yields True with the key's lock held, False after ``timeout`` seconds."""
        with self._lock:
            slot = self._slots.setdefault(key, [threading.Lock(), 0])
            slot[1] += 1
        acquired = slot[0].acquire(timeout=timeout)
        try:
            yield acquired
        finally:
            if acquired:
                slot[0].release()
            with self._lock:
                slot[1] -= 1
                if slot[1] == 0:
                    del self._slots[key]


_live_stores: "weakref.WeakSet[PatternStore]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A lock held by another thread at fork() stays held forever in the
    # child, where that thread does not exist: give every store fresh locks.
    global _default_lock, _registry_lock
    _default_lock = threading.Lock()
    _registry_lock = threading.Lock()
    for store in list(_live_stores):
        store._reset_locks()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class PatternStore:
    """Patterns by spec: a memory LRU over a process-shared disk directory.

    ``path``: the directory (None: ``default_directory()``). ``max_entries``
    and ``max_bytes`` bound the memory tier (array bytes, device copies
    included); ``disk_size_limit`` bounds the directory (diskcache culls the
    oldest writes past it); ``lock_timeout`` bounds every wait for another
    thread or process generating the same key.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        max_entries: int = 256,
        max_bytes: int = 1 << 30,
        disk_size_limit: int = 8 << 30,
        lock_timeout: float = 60.0,
    ) -> None:
        if isinstance(lock_timeout, bool) or not isinstance(lock_timeout, (int, float)):
            raise TypeError(f"lock_timeout must be a number of seconds > 0, got {type(lock_timeout).__name__}")
        if not (lock_timeout > 0 and math.isfinite(lock_timeout)):
            raise ValueError(f"lock_timeout must be a finite number of seconds > 0, got {lock_timeout}")
        check_int("disk_size_limit", disk_size_limit)
        self.lock_timeout = float(lock_timeout)
        # What pickling records (``__reduce__``): the directory as asked for
        # (None: this process's default) and the options.
        self._path = None if path is None else Path(path).expanduser().absolute()
        self._options = {"max_entries": max_entries, "max_bytes": max_bytes,
                         "disk_size_limit": disk_size_limit, "lock_timeout": self.lock_timeout}
        self._memory = MemoryTier(max_entries, max_bytes)
        self._flights = _KeyLocks()
        self._lock = threading.Lock()  # guards the counters below
        self._disk_hits = self._misses = self._generations = self._corrupt = self._outdated = 0
        self._lock_timeouts = 0
        _live_stores.add(self)
        directory = default_directory() if path is None else Path(path)
        self._disk_unavailable: DiskUnavailable | None = None
        try:
            self.disk: DiskTier | None = DiskTier(directory, disk_size_limit, timeout=self.lock_timeout)
        except DiskUnavailable as error:
            self.disk, self._disk_unavailable = None, error
            warnings.warn(f"{error}; patterns are kept in memory only", PatternStoreWarning, stacklevel=2)
        with _registry_lock:
            _registry.setdefault(_registry_key(self._path), self)

    def __reduce__(self) -> tuple:
        """Pickled as its directory and options; unpickled (or deep-copied) as
        that process's store for that directory (``store_for``), so no lock,
        connection or cached tensor is ever pickled."""
        return (_store_for_pickle, (self._path, self._options))

    @property
    def disk_error(self) -> BaseException | None:
        """Why the disk tier is missing (``DiskUnavailable``) or read-only (the
        error that stopped writes); None while it reads and writes."""
        if self.disk is None:
            return self._disk_unavailable
        return self.disk.write_error

    @property
    def read_only(self) -> bool:
        """True when a disk tier exists but is not written: opened read-only
        (a directory this process cannot write) or a write failed. Its
        entries are still read; misses are kept in memory only."""
        return self.disk is not None and not self.disk.writable

    def _reset_locks(self) -> None:
        self._lock = threading.Lock()
        self._flights = _KeyLocks()
        self._memory.reset_lock()

    @property
    def directory(self) -> Path | None:
        """The disk tier's directory, or None when the store is memory-only."""
        return None if self.disk is None else self.disk.directory

    @property
    def memory(self) -> MemoryTier:
        return self._memory

    # ------------------------------------------------------------ get
    def get(self, spec: Spec, device=None) -> Pattern:
        """The pattern of ``spec``, its arrays on ``device`` (default: CPU).

        Device copies are made once and cached per exact device. Never write
        to the returned arrays: they are shared with every other caller."""
        if device is not None:
            device = exact_device(device)
        try:
            key = spec.key  # computed once, at the spec's construction: no re-hash here
        except AttributeError:
            raise TypeError(f"spec must be a DilatedSpec or SparseSpec, got {type(spec).__name__}") from None
        pattern = self._memory.get(key, device)
        if pattern is None:
            pattern = self._fetch(spec, device)
        return pattern

    def _fetch(self, spec: Spec, device) -> Pattern:
        """Disk, else single-flight generation (a memory miss)."""
        if not isinstance(spec, _SPEC_TYPES):
            raise TypeError(f"spec must be a DilatedSpec or SparseSpec, got {type(spec).__name__}")
        with real_tensors():  # whatever mode the caller is in (see real_tensors)
            return self._fetch_real(spec, device)

    def _fetch_real(self, spec: Spec, device) -> Pattern:
        key = spec.key
        pattern, refused = self._read(key)
        if pattern is None:
            with self._single_flight(key) as held:
                if held:
                    # Whoever held the lock before us may have made it.
                    pattern = self._memory.get(key, device)
                    if pattern is not None:
                        self._count_refused(refused)
                        return pattern
                    pattern, refused_again = self._read(key)
                    refused = refused or refused_again
                    if refused_again is not None and self.disk is not None:
                        self.disk.delete(key)  # under the lock: nobody is rewriting it
                if pattern is None:
                    pattern = generate(spec)
                    self._count(misses=1, generations=1, lock_timeouts=not held)
                    self._count_refused(refused)
                    if self.disk is not None:
                        self.disk.write(key, encode(pattern))
                    return self._memory.put(pattern, device)
        self._count(disk_hits=1)
        self._count_refused(refused)
        return self._memory.put(pattern, device)

    def _read(self, key: str) -> tuple[PackedPattern | None, CorruptValue | None]:
        """(decoded disk value or None, the refusal of a stored value or None).
        The value is read once into the buffer the memory tier then holds as
        it is (``codec.decode_packed``)."""
        if self.disk is None:
            return None, None
        try:
            source = self.disk.source(key)
            if source is None:
                return None, None
            try:
                return decode_packed(source, key), None
            finally:
                if hasattr(source, "close"):
                    source.close()
        except CorruptValue as refusal:
            return None, refusal
        except OSError as error:  # the value file vanished or failed mid-read
            self.disk.read_failed(error)
            return None, None

    def _count_refused(self, refusal: CorruptValue | None) -> None:
        if refusal is not None:
            self._count(**{"outdated" if isinstance(refusal, OutdatedValue) else "corrupt": 1})

    @contextmanager
    def _single_flight(self, key: str) -> Iterator[bool]:
        """Hold ``key`` against other threads, then other processes. Yields
        False when either wait passed ``lock_timeout`` (the caller then
        generates without the lock); never waits longer than that in all.
        A store that does not write its disk tier (read-only) takes no file
        lock: no other process could read what it generates, and a lock file
        would be a write to a directory it must leave untouched."""
        deadline = time.monotonic() + self.lock_timeout
        with self._flights.hold(key, self.lock_timeout) as held:
            if not held or self.disk is None or not self.disk.writable:
                yield held
                return
            lock = filelock.FileLock(self.disk.lock_path(key), timeout=max(0.0, deadline - time.monotonic()))
            try:
                lock.acquire()
            except filelock.Timeout:
                yield False
                return
            except OSError:
                # No lock file possible (e.g. read-only locks directory): the
                # thread lock still holds; other processes may duplicate work.
                yield True
                return
            try:
                yield True
            finally:
                lock.release()

    def _count(self, **amounts: int) -> None:
        with self._lock:
            for name, amount in amounts.items():
                setattr(self, f"_{name}", getattr(self, f"_{name}") + int(amount))

    # ------------------------------------------------------------ changes
    def put(self, pattern: Pattern) -> None:
        """Store ``pattern`` in both tiers. Its arrays are copied, so the
        caller may keep using them. The store trusts that they are the spec's
        pattern (as ``generate`` made them, here or on another machine)."""
        if not isinstance(pattern, Pattern):
            raise TypeError(f"put takes a Pattern, got {type(pattern).__name__}")
        with real_tensors():
            value = encode(pattern)  # checks the arrays are storable before anything is kept
        self._memory.put(pattern)
        if self.disk is not None:
            self.disk.write(pattern.key, value)

    def contains(self, spec_or_key: Spec | str) -> bool:
        key = _key_of(spec_or_key)
        return key in self._memory or (self.disk is not None and self.disk.contains(key))

    def evict(self, spec_or_key: Spec | str) -> bool:
        """Remove from both tiers; True if either held it."""
        key = _key_of(spec_or_key)
        in_memory = self._memory.evict(key)
        on_disk = self.disk is not None and self.disk.delete(key)
        return in_memory or on_disk

    def clear(self) -> None:
        """Remove every pattern from both tiers (counters are kept), and the
        lock files that no process holds."""
        self._memory.clear()
        if self.disk is not None:
            self.disk.clear()
            self._remove_idle_locks()

    def _remove_idle_locks(self) -> None:
        """Delete each lock file that can be taken at once, while holding it.
        A process that was already waiting on one then holds the lock of a
        deleted file while a newcomer creates a fresh one, so both may
        generate that key: duplicated work, never a wrong value."""
        for path in self.disk.lock_paths():
            try:
                with filelock.FileLock(path, timeout=0):
                    path.unlink(missing_ok=True)
            except (filelock.Timeout, OSError):
                continue  # held by someone, or not ours to delete

    def stats(self) -> dict[str, int | float]:
        """Counters since construction, and what the memory tier holds now.

        memory_hits, disk_hits, misses: one per get; generations: calls of
        ``generate``; evictions: memory entries dropped for the bounds;
        corrupt: disk values refused; tampered: cached arrays found changed
        in place; lock_timeouts: gets that generated without waiting longer;
        outdated: disk values of another format (e.g. format 1), refused
        and regenerated; hit_rate: (memory_hits + disk_hits) / gets;
        entries, bytes: memory tier now."""
        memory = self._memory.stats()
        with self._lock:
            counts = {
                "memory_hits": memory["memory_hits"],
                "disk_hits": self._disk_hits,
                "misses": self._misses,
                "generations": self._generations,
                "evictions": memory["evictions"],
                "corrupt": self._corrupt,
                "outdated": self._outdated,
                "tampered": memory["tampered"],
                "lock_timeouts": self._lock_timeouts,
            }
        gets = counts["memory_hits"] + counts["disk_hits"] + counts["misses"]
        counts["hit_rate"] = (counts["memory_hits"] + counts["disk_hits"]) / gets if gets else 0.0
        counts["entries"] = memory["entries"]
        counts["bytes"] = memory["bytes"]
        return counts

    def __repr__(self) -> str:
        where = self.directory if self.directory is not None else "memory only"
        return f"PatternStore({where}, entries={len(self._memory)}, bytes={self._memory.nbytes})"

    # ================================================================ maintenance
    # What ``patternstore.maintenance`` (and so the command line) needs of the
    # disk tier, as store API. Nothing here touches the memory tier or
    # generates; a file that vanishes meanwhile (another process clearing or
    # repairing the directory) reads as gone, never as an error. Nothing here
    # writes except ``remove_orphans``.
    class StoredEntry(NamedTuple):
        """One entry as read from disk: ``value`` (the stored bytes; None
        when it vanished or was refused unread), ``pattern`` (None unless the
        value decoded under its key), ``problem`` (why not; None when fine or
        vanished), ``stored_at`` (unix time of its write, None if unknown)."""

        key: str
        value: bytes | None
        pattern: Pattern | None
        problem: str | None
        stored_at: float | None

    def stored_keys(self) -> list[str]:
        """Keys on disk, oldest write first (none without a disk tier)."""
        return [] if self.disk is None else self.disk.keys()

    def stored(self, key: str) -> bool:
        """Whether the disk holds ``key`` (the memory tier is not asked)."""
        return self.disk is not None and self.disk.contains(key)

    def entries(self) -> Iterator["PatternStore.StoredEntry"]:
        """Every disk entry, checked (``read_entry``), in key order."""
        for key in sorted(self.stored_keys()):
            yield self.read_entry(key)

    def read_entry(self, key: str) -> "PatternStore.StoredEntry":
        """The disk entry of ``key``, decoded and checked (checksum, format,
        key) exactly as a get would; never generates, never kept in memory."""
        if self.disk is None:
            return self.StoredEntry(key, None, None, None, None)
        stored_at = self.disk.stored_at(key)
        try:
            value = self.disk.read(key)
        except CorruptValue as error:  # not stored as raw bytes: refused unread
            return self.StoredEntry(key, None, None, str(error), stored_at)
        if value is None:
            return self.StoredEntry(key, None, None, None, stored_at)
        try:
            return self.StoredEntry(key, value, decode_packed(value, key).unpack(), None, stored_at)
        except CorruptValue as error:
            return self.StoredEntry(key, value, None, str(error), stored_at)

    def orphans(self, min_age: float = 3600.0) -> list[Path]:
        """Value files no entry refers to, last written over ``min_age`` s ago
        (a writer killed between its file and its row)."""
        if self.disk is None:
            return []
        try:
            return self.disk.orphans(min_age)
        except FileNotFoundError:  # a directory removed while it was listed: cleared meanwhile
            return []

    def remove_orphans(self, paths: list[Path]) -> list[Path]:
        """Delete orphan files (``orphans``); those that could not be deleted.
        A file already gone counts as deleted."""
        if self.disk is None or self.read_only:
            return list(paths)
        return self.disk.remove(paths)


def _key_of(spec_or_key: Spec | str) -> str:
    if isinstance(spec_or_key, str):
        return spec_or_key
    if isinstance(spec_or_key, _SPEC_TYPES):
        return spec_or_key.key
    raise TypeError(f"expected a spec or a key string, got {type(spec_or_key).__name__}")


_default: tuple[int, PatternStore] | None = None
_default_lock = threading.Lock()

# The process's stores by resolved directory (None: the default store), held
# weakly: a store lives as long as something uses it. Every store registers
# itself at construction unless its directory already has one.
_registry: "weakref.WeakValueDictionary[tuple[int, str | None], PatternStore]" = weakref.WeakValueDictionary()
_registry_lock = threading.Lock()


def _registry_key(path: Path | None) -> tuple[int, str | None]:
    # The pid: a forked child builds its own stores rather than share its parent's.
    return os.getpid(), None if path is None else os.path.realpath(path)


def default_store() -> PatternStore:
    """The process's store on ``default_directory()`` (a forked child gets its own)."""
    global _default
    with _default_lock:
        if _default is None or _default[0] != os.getpid():
            _default = (os.getpid(), PatternStore())
        return _default[1]


def store_for(directory: str | os.PathLike | None = None, **options) -> PatternStore:
    """This process's store for ``directory``: the one already open there
    (whatever its options) or a new ``PatternStore(directory, **options)``.
    ``store_for(None)`` is ``default_store()``. Unpickled stores come from here
    (``PatternStore.__reduce__``), so a module pickled with its store finds
    the same directory in any process (docs/design.md section 4)."""
    if directory is None:
        return default_store()
    key = _registry_key(Path(directory).expanduser().absolute())
    with _registry_lock:
        store = _registry.get(key)
    if store is not None:
        return store
    fresh = PatternStore(directory, **options)
    with _registry_lock:
        return _registry.setdefault(key, fresh)


def _store_for_pickle(directory: Path | None, options: dict) -> PatternStore:
    return store_for(directory, **options)
