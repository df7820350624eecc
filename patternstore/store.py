"""``PatternStore``: patterns by spec, from memory, disk, or generated once.

    get(spec, device)
      memory tier (dict lookup under one lock) ---------------- hit -> Pattern
      disk tier (DiskTier.read_packed: one read into the buffer kept) -- hit -> keep in memory
      single flight (patternstore.flight): per-key thread lock, then per-key
        file lock, look in memory and on disk again, generate(spec),
        encode_packed (one copy), write, keep that buffer

Guarantees (each kept by the code next to it):
- Never a wrong pattern: a disk value is used only when ``codec.decode_packed``
  accepts it (checksum, format version, key); anything else is counted in
  ``corrupt``, dropped and regenerated. Cached arrays that a caller changed in
  place are detected on the next hit and rebuilt (``MemoryTier``).
- Never executes what it reads (``DiskTier`` refuses non-raw values unread).
- Single flight: concurrent gets of one missing key, from threads or from
  processes sharing the directory, generate it once. Every wait has a
  deadline of ``lock_timeout`` seconds; past it the caller generates the
  pattern itself (counted in ``lock_timeouts``), so a get never hangs.
- Degrades, never fails: a directory that cannot be created, opened or
  read (mode 0000, another user's private store), a damaged database, or a
  disk that refuses writes, leaves the store serving from memory, with one
  warning (``PatternStoreWarning``) naming the cause (errno and path as the
  OS gave them). A directory deleted or replaced while open is re-opened
  (re-created 0700) before the next write, or writes stop with one warning.
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
  ``read_only=True`` asks for that: nothing in the directory is created or
  changed, and a directory without a store is not created (the store then
  serves from memory, with one warning).
- Opening never rewrites the directory's persisted size limit unless
  ``disk_size_limit`` is given.

What protects the directory: its file modes, checked. The checksum is
unkeyed and catches accidents only, so whoever can write the directory could
store another valid pattern under a key (never code: nothing is unpickled,
every value's key and spec are checked). The store therefore uses a
directory only when nobody but its user (and root) can change it or the path
to it (``patternstore.safedir``: owner, group and other write, the sticky
bit of parents such as /tmp); any other directory, a group-shared one
included, is refused with one warning and the store serves from memory.
It creates its directory ``0700``. Inside, nothing is followed through a
link and nothing but a regular file of the recorded size is read.
``patternstore verify --full`` compares every entry with a fresh
generation; a bundle from elsewhere is verified that way on import
(``patternstore import``).
"""

from __future__ import annotations

import math
import os
import threading
import warnings
import weakref
from pathlib import Path

import platformdirs

from .codec import CorruptValue, OutdatedValue, encode_packed
from .disk import DiskTier
from .diskerrors import DiskUnavailable, PatternStoreWarning
from .flight import KeyLocks, remove_idle_locks, single_flight
from .generate import generate
from .memory import MemoryTier, exact_device
from .pattern import Pattern, real_tensors
from .fields import check_int
from .specs import DilatedSpec, SparseSpec, Spec

__all__ = ["PatternStore", "default_store", "default_directory", "store_for"]

_SPEC_TYPES = (DilatedSpec, SparseSpec)


def default_directory() -> Path:
    """``$PATTERNSTORE_DIR`` if set, else the user cache directory + patternstore."""
    configured = os.environ.get("PATTERNSTORE_DIR")
    if configured:
        return Path(configured).expanduser()
    return Path(platformdirs.user_cache_dir("patternstore", appauthor=False))


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
    oldest writes past it; None: the directory's own limit, 8 GiB for a new
    one); ``lock_timeout`` bounds every wait for another thread or process
    generating the same key; ``read_only``: read an existing store without
    writing anything to its directory.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        max_entries: int = 256,
        max_bytes: int = 1 << 30,
        disk_size_limit: int | None = None,
        lock_timeout: float = 60.0,
        read_only: bool = False,
    ) -> None:
        if isinstance(lock_timeout, bool) or not isinstance(lock_timeout, (int, float)):
            raise TypeError(f"lock_timeout must be a number of seconds > 0, got {type(lock_timeout).__name__}")
        if not (lock_timeout > 0 and math.isfinite(lock_timeout)):
            raise ValueError(f"lock_timeout must be a finite number of seconds > 0, got {lock_timeout}")
        if disk_size_limit is not None:
            check_int("disk_size_limit", disk_size_limit)
        if not isinstance(read_only, bool):
            raise TypeError(f"read_only must be True or False, got {type(read_only).__name__}")
        self.lock_timeout = float(lock_timeout)
        # What pickling records (``__reduce__``): the directory as asked for
        # (None: this process's default) and the options.
        self._path = None if path is None else Path(path).expanduser().absolute()
        self._options = {"max_entries": max_entries, "max_bytes": max_bytes, "disk_size_limit": disk_size_limit,
                         "lock_timeout": self.lock_timeout, "read_only": read_only}
        self._memory = MemoryTier(max_entries, max_bytes)
        self._flights = KeyLocks()
        self._lock = threading.Lock()  # guards the counters below
        self._disk_hits = self._misses = self._generations = self._corrupt = self._outdated = 0
        self._lock_timeouts = 0
        _live_stores.add(self)
        directory = default_directory() if path is None else Path(path)
        self._disk_unavailable: DiskUnavailable | None = None
        try:
            self.disk: DiskTier | None = DiskTier(directory, disk_size_limit, self.lock_timeout, read_only=read_only)
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
        self._flights = KeyLocks()
        self._memory.reset_lock()
        if self.disk is not None:
            self.disk.reset_lock()

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
        key, disk = spec.key, self.disk
        packed, refused = disk.read_packed(key) if disk is not None else (None, None)
        if packed is None:
            with single_flight(self._flights, disk, key, self.lock_timeout) as held:
                if held:
                    # Whoever held the lock before us may have made it.
                    pattern = self._memory.get(key, device)
                    if pattern is not None:
                        self._count_refused(refused)
                        return pattern
                    if disk is not None:
                        packed, refused_again = disk.read_packed(key)
                        refused = refused or refused_again
                        if refused_again is not None:
                            disk.delete(key)  # under the lock: nobody is rewriting it
                if packed is None:
                    packed, value = encode_packed(generate(spec))  # the one copy of the arrays
                    self._count(misses=1, generations=1, lock_timeouts=not held)
                    self._count_refused(refused)
                    if disk is not None:
                        disk.write(key, value)
                    return self._memory.put(packed, device)
        self._count(disk_hits=1)
        self._count_refused(refused)
        return self._memory.put(packed, device)

    def _count_refused(self, refusal: CorruptValue | None) -> None:
        if refusal is not None:
            self._count(**{"outdated" if isinstance(refusal, OutdatedValue) else "corrupt": 1})

    def _count(self, **amounts: int) -> None:
        with self._lock:
            for name, amount in amounts.items():
                setattr(self, f"_{name}", getattr(self, f"_{name}") + int(amount))

    # ------------------------------------------------------------ changes
    def put(self, pattern: Pattern) -> None:
        """Store ``pattern`` in both tiers. Its arrays are copied (once), so the
        caller may keep using them. The store trusts that they are the spec's
        pattern (as ``generate`` made them, here or on another machine)."""
        if not isinstance(pattern, Pattern):
            raise TypeError(f"put takes a Pattern, got {type(pattern).__name__}")
        packed, value = encode_packed(pattern)  # the one copy; checks the arrays are storable first
        if self.disk is not None:
            self.disk.write(pattern.key, value)
        self._memory.put(packed)

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
        if self.disk is not None and self.disk.writable:
            self.disk.clear()
            remove_idle_locks(self.disk)

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

    # ------------------------------------------------------------ the disk tier's keys
    def stored_keys(self) -> list[str]:
        """Keys on disk, oldest write first (none without a disk tier)."""
        return [] if self.disk is None else self.disk.keys()

    def stored(self, key: str) -> bool:
        """Whether the disk holds ``key`` (the memory tier is not asked)."""
        return self.disk is not None and self.disk.contains(key)


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
