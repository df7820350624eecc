"""The one bounded cache of the attention package, and ``clear_caches``.

Everything ``attention`` keeps between calls (per-module plans, layout
sources, Hugging Face modules, decode tables, BlockMasks, residue layouts) is
a ``BoundedCache`` or a ``functools.lru_cache``; the process-wide ones are
registered here, so ``clear_caches()`` empties all of them at once (a test
that changes the store under a module, a long-lived server that changes its
settings).

Guarantees and limits:
- A ``BoundedCache`` holds at most ``limit`` entries and evicts the least
  recently used. It takes no lock, because it is read on eager hot paths:
  threads may share one, and a race costs a recomputation, never a wrong
  value (``put`` keeps the first value stored under a key, like
  ``dict.setdefault``, so racing threads agree on one object).
- Values are never copied; whoever stores a value must not mutate it.
- ``clear_caches`` empties the registered caches; values already handed out
  stay valid. Caches inside a module instance (its plans) go with the module
  and are not process-wide: they are not registered.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Generic, Hashable, Optional, TypeVar

__all__ = ["BoundedCache", "clear_caches", "process_cache", "register_cached_function"]

V = TypeVar("V")

_PROCESS_CACHES: list["BoundedCache[Any]"] = []
_CACHED_FUNCTIONS: list[Callable[..., Any]] = []


class BoundedCache(Generic[V]):
    """A least-recently-used mapping of at most ``limit`` entries."""

    def __init__(self, limit: int) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be an int >= 1, got {limit!r}")
        self.limit = limit
        self._entries: OrderedDict[Hashable, V] = OrderedDict()

    def get(self, key: Hashable) -> Optional[V]:
        """The value under ``key`` (now the most recent), or None."""
        hit = self._entries.get(key)
        if hit is not None:
            try:
                self._entries.move_to_end(key)
            except KeyError:  # another thread evicted it meanwhile; the value is still good
                pass
        return hit

    def put(self, key: Hashable, value: V) -> V:
        """Store ``value`` unless ``key`` already holds one; return the kept
        value (now the most recent), and evict the oldest entries past ``limit``."""
        kept = self._entries.setdefault(key, value)
        try:
            self._entries.move_to_end(key)
        except KeyError:  # another thread evicted it meanwhile
            pass
        while len(self._entries) > self.limit:
            try:
                self._entries.popitem(last=False)
            except KeyError:
                break
        return kept

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries


def process_cache(limit: int) -> BoundedCache[Any]:
    """A ``BoundedCache`` that lives as long as the process and that
    ``clear_caches`` empties."""
    cache: BoundedCache[Any] = BoundedCache(limit)
    _PROCESS_CACHES.append(cache)
    return cache


def register_cached_function(function: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: a ``functools.lru_cache``-wrapped function whose cache
    ``clear_caches`` empties (apply it above ``@functools.lru_cache``)."""
    if not hasattr(function, "cache_clear"):
        raise TypeError(f"{getattr(function, '__name__', function)!r} has no cache_clear: wrap it in functools.lru_cache first")
    _CACHED_FUNCTIONS.append(function)
    return function


def clear_caches() -> None:
    """Empty every process-wide cache of the ``attention`` package."""
    for cache in _PROCESS_CACHES:
        cache.clear()
    for function in _CACHED_FUNCTIONS:
        function.cache_clear()
