"""``MemoryTier``: the in-process LRU of patterns, with per-device copies.

Guarantees (each is kept by the code it is written next to):
- Bounded: at most ``max_entries`` entries and ``max_bytes`` array bytes,
  device copies included. A pattern that alone exceeds ``max_bytes`` is
  served but not kept.
- LRU: a hit makes the entry the most recent; the least recent entries go
  first, one at a time, and every such eviction is counted.
- Re-putting a key that is already held never evicts another entry: keys are
  content addresses, so the held arrays are already the pattern (unless they
  were tampered with, in which case the fresh ones replace them, same size).
- One lock guards all state; every operation is O(1) (an ``OrderedDict``
  lookup, ``move_to_end`` or ``popitem``; evictions amortized) except
  ``clear``. No I/O and no copy (memcpy or device transfer) happens while it
  is held.
- The tier owns its arrays: ``put`` copies them into one fresh buffer per
  pattern, so nothing the caller keeps aliases them. The one exception is a
  ``PackedPattern``, which the caller (the store, with a value it has just
  decoded) hands over: nobody else references its buffer.
- Tamper detection: torch has no read-only tensor, but every in-place op
  bumps ``_version``, and views share their base's counter. The held arrays
  are views of that one buffer, so a hit compares one ``_version`` with the
  value recorded at intake. An entry whose CPU arrays moved is dropped (the
  store then rebuilds it from the disk envelope or regenerates it); a device
  copy that moved is copied again from the CPU arrays. Both are counted in
  ``tampered``. Writes that bypass the counter (``.numpy()`` views,
  ``.data``, raw pointers) are not seen.
- Held arrays are real tensors with version counting whatever mode the
  caller runs under (``inference_mode``, fake tensors): every tensor the tier
  makes is made inside ``pattern.real_tensors``.
- Device copies are cached per exact device (``cuda:1`` is not ``cuda:0``;
  ``"cuda"`` means the current device at the time of the call), evicted with
  their entry and counted in its bytes. A steady-state hit on a device does no
  host-to-device copy.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from types import MappingProxyType
from typing import Iterator

import torch

from .pattern import PackedPattern, Pattern, real_tensors
from .fields import check_int

_INDEXED = ("cuda", "xpu", "mtia")  # device types whose bare name means "the current one"
_exact: dict = {None: None}  # device argument -> exact device, for arguments whose meaning cannot change


def exact_device(device: torch.device | str | None) -> torch.device | None:
    """``device`` with its index filled in, or ``None`` for the CPU (the tier
    holds CPU arrays itself). ``"cuda"`` becomes ``cuda:<current index>``,
    looked up on every call (the current device can change); anything else
    is resolved once and memoized, so the usual ``tensor.device`` costs a
    dict lookup."""
    exact = _exact.get(device, _exact)
    if exact is not _exact:
        return exact
    resolved = torch.device(device)
    if resolved.type in _INDEXED and resolved.index is None:
        return torch.device(resolved.type, getattr(torch, resolved.type).current_device())
    exact = None if resolved.type == "cpu" else resolved
    if len(_exact) < 256:
        _exact[device] = exact
    return exact


class _Held:
    """A packed pattern the tier owns. Its arrays are views of one buffer and
    share its version counter, so one ``_version`` read notices an in-place
    write to any array of the pattern."""

    __slots__ = ("packed", "buffer", "pattern", "version", "nbytes")

    def __init__(self, packed: PackedPattern) -> None:
        self.packed = packed
        self.buffer = packed.buffer  # read on every hit: one attribute lookup, not two
        # A read-only mapping: callers cannot swap an array out of a held pattern.
        self.pattern = Pattern(packed.spec, MappingProxyType(packed.views()))
        self.version = packed.buffer._version
        self.nbytes = self.pattern.nbytes  # array bytes (alignment padding not counted)

    def to(self, device: torch.device) -> "_Held":
        return _Held(self.packed.to(device))

    def tampered(self) -> bool:
        return self.buffer._version != self.version


class _Entry:
    __slots__ = ("base", "copies", "nbytes")

    def __init__(self, base: _Held) -> None:
        self.base = base
        self.copies: dict[torch.device, _Held] = {}
        self.nbytes = base.nbytes  # base plus every device copy


class MemoryTier:
    """LRU of patterns keyed by ``spec.key``, bounded by entries and bytes."""

    def __init__(self, max_entries: int = 256, max_bytes: int = 1 << 30) -> None:
        self.max_entries = check_int("max_entries", max_entries, minimum=0)
        self.max_bytes = check_int("max_bytes", max_bytes, minimum=0)
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # oldest first
        self._bytes = 0
        self.hits = 0
        self.evictions = 0
        self.tampered = 0

    def reset_lock(self) -> None:
        """A fresh lock, for a forked child (the parent's may be held by a
        thread that does not exist there)."""
        self._lock = threading.Lock()

    # ------------------------------------------------------------ lookups
    def get(self, key: str, device: torch.device | None = None) -> Pattern | None:
        """The held pattern (on ``device``, an ``exact_device`` result) or None.

        A hit costs one dict lookup, a version check and ``move_to_end`` under
        the lock; a missing device copy is made outside the lock."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            base = entry.base
            if base.buffer._version != base.version:  # base.tampered(), inlined: the hot path
                self._drop(key, entry)
                self.tampered += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            if device is None:
                return base.pattern  # the hot path: no call
            served = self._held_on(entry, device)
            if served is not None:
                return served
        # The copy is made without the lock: other threads keep hitting.
        # (A tampered copy is replaced, and counted, by _add_copy.)
        with real_tensors():
            return self._add_copy(key, base, device, base.to(device))

    def _add_copy(self, key: str, base: _Held, device: torch.device, moved: _Held) -> Pattern:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.base is not base:
                return moved.pattern  # evicted or replaced meanwhile: serve, do not keep
            present = entry.copies.get(device)
            if present is not None:
                if not present.tampered():
                    return present.pattern  # another thread copied first: keep one copy
                del entry.copies[device]
                entry.nbytes -= present.nbytes
                self._bytes -= present.nbytes
                self.tampered += 1
            if entry.nbytes + moved.nbytes > self.max_bytes:
                return moved.pattern  # the entry could never fit with it: serve only
            entry.copies[device] = moved
            entry.nbytes += moved.nbytes
            self._bytes += moved.nbytes
            self._entries.move_to_end(key)
            self._shrink()  # never reaches this entry: it is the newest and fits
            return moved.pattern

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    # ------------------------------------------------------------ changes
    def put(self, pattern: Pattern | PackedPattern, device: torch.device | None = None) -> Pattern:
        """Hold a copy of ``pattern`` and return it as held (on ``device``, an
        ``exact_device`` result). A pattern larger than ``max_bytes`` (or any,
        when ``max_entries`` is 0) is returned, copied, without being kept.

        A ``PackedPattern`` (CPU) is handed over, not copied: the caller (the
        store, with a value it has just decoded) keeps no reference to it."""
        with real_tensors():
            return self._put(pattern, device)

    def _put(self, pattern: Pattern | PackedPattern, device: torch.device | None) -> Pattern:
        key = pattern.spec.key
        # Packed before the lock is taken (a memcpy, or a device-to-host copy
        # for a pattern on a device): the lock never waits on a copy.
        held = _Held(pattern if isinstance(pattern, PackedPattern) else PackedPattern.copy_of(pattern))
        if held.nbytes > self.max_bytes or self.max_entries == 0:
            return held.pattern if device is None else held.to(device).pattern  # served, not kept
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.base.tampered():
                self._drop(key, entry)
                self.tampered += 1
                entry = None
            if entry is not None:
                # Same key, same content: keep the held arrays, refresh recency, evict nobody.
                self._entries.move_to_end(key)
            else:
                entry = self._entries[key] = _Entry(held)
                self._bytes += held.nbytes
                self._shrink()  # stops before the new entry: it is the newest and fits
            base = entry.base
            served = self._held_on(entry, device)
        return served if served is not None else self._add_copy(key, base, device, base.to(device))

    @staticmethod
    def _held_on(entry: _Entry, device: torch.device | None) -> Pattern | None:
        """The entry's pattern on ``device`` when it holds an intact copy there
        (call with the lock held)."""
        if device is None:
            return entry.base.pattern
        copy = entry.copies.get(device)
        return copy.pattern if copy is not None and not copy.tampered() else None

    def evict(self, key: str) -> bool:
        """Drop ``key`` (not counted as an eviction: the caller asked)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return False
            self._drop(key, entry)
            return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def _shrink(self) -> None:
        """Evict least recent entries until both bounds hold (lock held)."""
        entries = self._entries
        while len(entries) > self.max_entries or self._bytes > self.max_bytes:
            _, entry = entries.popitem(last=False)
            self._bytes -= entry.nbytes
            self.evictions += 1

    def _drop(self, key: str, entry: _Entry) -> None:
        del self._entries[key]
        self._bytes -= entry.nbytes

    # ------------------------------------------------------------ reading
    def keys(self) -> list[str]:
        """Held keys, least recently used first (the eviction order)."""
        with self._lock:
            return list(self._entries)

    def devices(self, key: str) -> list[torch.device]:
        """Devices holding a cached copy of ``key``."""
        with self._lock:
            entry = self._entries.get(key)
            return [] if entry is None else list(entry.copies)

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    @property
    def nbytes(self) -> int:
        return self._bytes

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "memory_hits": self.hits,
                "evictions": self.evictions,
                "tampered": self.tampered,
                "entries": len(self._entries),
                "bytes": self._bytes,
            }
