"""Single flight: one generation of a missing key at a time, across the
threads of a process (``KeyLocks``) and the processes sharing a store
directory (one ``filelock`` file per key, ``single_flight``).

Guarantees:
- Never hangs: every wait has a deadline; ``single_flight`` yields False
  once the deadline passed (the caller then generates without the lock:
  duplicated work, never a wrong value) and never waits longer in all.
- The table of thread locks holds only keys someone wants right now
  (refcounted), so it does not grow with the keys ever asked for.
- A disk tier that is not written takes no file lock: no other process
  could read what it generates, and a lock file would be a write to a
  directory it must leave untouched.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator

import filelock

from .disk import DiskTier

__all__ = ["KeyLocks", "single_flight", "remove_idle_locks"]


class KeyLocks:
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


@contextmanager
def single_flight(locks: KeyLocks, disk: DiskTier | None, key: str, timeout: float) -> Iterator[bool]:
    """Hold ``key`` against other threads (``locks``), then other processes
    (``disk``'s lock file of the key). Yields False when either wait passed
    ``timeout`` seconds; never waits longer than that in all."""
    deadline = time.monotonic() + timeout
    with locks.hold(key, timeout) as held:
        if not held or disk is None or not disk.writable:
            yield held
            return
        lock = filelock.FileLock(disk.lock_path(key), timeout=max(0.0, deadline - time.monotonic()))
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


def remove_idle_locks(disk: DiskTier) -> None:
    """Delete each lock file of ``disk`` that can be taken at once, while
    holding it. A process that was already waiting on one then holds the lock
    of a deleted file while a newcomer creates a fresh one, so both may
    generate that key: duplicated work, never a wrong value."""
    for path in disk.lock_paths():
        try:
            with filelock.FileLock(path, timeout=0):
                path.unlink(missing_ok=True)
        except (filelock.Timeout, OSError):
            continue  # held by someone, or not ours to delete
