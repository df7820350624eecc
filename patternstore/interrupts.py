"""Signals honoured by the command line and its worker processes.

Guarantees:
- ``sigterm_raises()``: while active (in the main thread), SIGTERM raises
  ``Terminated`` there, so a command unwinds as it does on Ctrl-C (workers
  stopped, exit status 143) instead of dying with its workers left running.
- ``worker_start(parent)`` (run first in each worker process): the worker
  ignores SIGINT, which a terminal sends to the whole process group (its
  parent decides what an interrupt stops), and dies when its parent dies,
  however the parent died (Linux ``PR_SET_PDEATHSIG``, SIGKILL; a parent
  already gone ends the worker at once). With every worker gone the
  parent's multiprocessing resource tracker reads the end of its pipe and
  exits too.
- ``stop_pool(pool)``: queued work is cancelled and every running worker
  ends within ``grace`` seconds (SIGTERM, then SIGKILL). What a worker was
  writing to the store is left as a killed writer leaves it, which the store
  survives (docs/design.md section 3.3).

Limits: ``PR_SET_PDEATHSIG`` fires when the thread that started the worker
ends (a pool started from a thread must end before the thread does, as
``precompute``'s does) and exists on Linux only; elsewhere a worker whose
parent was killed (SIGKILL, not SIGTERM or Ctrl-C) finishes its current spec
and then stays blocked on its queue. ``ProcessPoolExecutor`` has no public way
to end running workers before Python 3.14 (``terminate_workers``): its
``_processes`` map is read here, as that method does.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:  # the command line imports this module at start-up: no pool machinery then
    from concurrent.futures import ProcessPoolExecutor

__all__ = ["Terminated", "sigterm_raises", "worker_start", "stop_pool"]

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class Terminated(BaseException):
    """SIGTERM arrived (a ``BaseException``, like ``KeyboardInterrupt``: cleanup runs, nothing catches it by accident)."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM raises ``Terminated`` in the main thread while active (a no-op
    in other threads, where signal handlers cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def worker_start(parent: int) -> None:
    """Make this worker process ignore SIGINT and die with ``parent``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(1)


def stop_pool(pool: ProcessPoolExecutor, grace: float = 1.0) -> None:
    """Cancel ``pool``'s queued work and end its running workers now."""
    processes = list((pool._processes or {}).values())  # see the module docstring
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(grace)
        if process.is_alive():
            process.kill()
            process.join(grace)
