"""Precompute: make a set of specs present in a store, generating each
missing key once (in several spawned processes when asked), with progress
reporting; and the sizes of the named presets.

Guarantees:
- Each key is generated at most once across the worker processes and any
  other process using the directory (the store's single flight); what is
  on disk is read through ``PatternStore.get``, so a stored value that fails
  to decode is regenerated rather than counted as present.
- A failure is recorded in its item and the other specs go on.
- An interrupt (Ctrl-C, or SIGTERM under ``interrupts.sigterm_raises``)
  stops the work at once: queued specs are dropped, running workers end
  (``interrupts.stop_pool``), and the exception goes on to the caller. What
  was stored stays valid. Workers ignore SIGINT and die with their parent
  (``interrupts.worker_start``).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from typing import Any, Callable, Iterable, Sequence, TextIO

from .generate import generate
from .interrupts import stop_pool, worker_start
from .presets import PRESETS
from .sizes import format_size
from .specs import Spec
from .spectext import format_spec
from .store import PatternStore

__all__ = [
    "PrecomputeItem", "PrecomputeResult", "precompute", "describe", "progress_bar", "PresetSize", "preset_sizes",
]


@dataclass(frozen=True)
class PrecomputeItem:
    """What became of one spec: generated here, or present (stored before or
    by another process meanwhile); ``stored``: on disk now; ``error``: why it failed."""

    spec: Spec
    generated: bool = False
    nbytes: int = 0
    stored: bool = False
    error: str | None = None

    @property
    def failure(self) -> str | None:
        if self.error is not None:
            return f"{self.spec.key}: {self.error}"
        if not self.stored:
            return f"{self.spec.key}: generated but not written to the store directory"
        return None


@dataclass(frozen=True)
class PrecomputeResult:
    items: tuple[PrecomputeItem, ...]
    seconds: float
    directory: str

    @property
    def generated(self) -> int:
        return sum(item.generated and item.error is None for item in self.items)

    @property
    def present(self) -> int:
        return sum(not item.generated and item.error is None for item in self.items)

    @property
    def failed(self) -> list[str]:
        return [item.failure for item in self.items if item.failure is not None]

    @property
    def bytes(self) -> int:
        """Array bytes generated (what was present is not counted)."""
        return sum(item.nbytes for item in self.items if item.generated and item.error is None)

    def to_json(self) -> dict[str, Any]:
        return {"specs": len(self.items), "generated": self.generated, "present": self.present,
                "failed": len(self.failed), "bytes": self.bytes, "seconds": round(self.seconds, 3),
                "directory": self.directory}


def _precompute_one(store: PatternStore, spec: Spec) -> tuple[bool, int, bool]:
    """``(generated here, array bytes, now on disk)`` after ``store.get(spec)``.
    The store's single flight makes exactly one process generate a key; the
    others read what it wrote."""
    before = store.stats()["generations"]
    pattern = store.get(spec)
    generated = store.stats()["generations"] > before
    return generated, pattern.nbytes, store.stored(spec.key)


# A worker process keeps one store open for all the specs it is given.
_worker_store: PatternStore | None = None


def _worker_start(directory: str, threads: int, parent: int) -> None:
    worker_start(parent)
    import torch

    global _worker_store
    torch.set_num_threads(threads)
    _worker_store = PatternStore(directory, max_entries=0)


def _worker_precompute(spec: Spec) -> tuple[bool, int, bool]:
    assert _worker_store is not None
    return _precompute_one(_worker_store, spec)


def precompute(
    store: PatternStore, specs: Iterable[Spec], *, jobs: int = 1,
    progress: Callable[[PrecomputeItem], None] | None = None,
) -> PrecomputeResult:
    """Make every spec's pattern present in ``store`` (each key once).
    What is absent is generated in ``jobs`` spawned processes when there are
    several; what is on disk is read here, through ``store.get``, so a stored
    value that fails to decode is regenerated rather than counted as present.
    A failure is recorded in its item and the other specs go on.
    ``progress`` is called with each item as it completes (``progress_bar``)."""
    specs = list({spec.key: spec for spec in specs}.values())
    start = time.perf_counter()
    absent = [spec for spec in specs if not store.contains(spec)]
    pooled = absent if jobs > 1 and len(absent) > 1 else []
    pooled_keys = {spec.key for spec in pooled}
    items: list[PrecomputeItem] = []

    def record(spec: Spec, outcome: tuple[bool, int, bool] | BaseException) -> None:
        if isinstance(outcome, BaseException):
            item = PrecomputeItem(spec, error=f"{type(outcome).__name__}: {outcome}")
        else:
            item = PrecomputeItem(spec, *outcome)
        items.append(item)
        if progress is not None:
            progress(item)

    for spec in specs:
        if spec.key not in pooled_keys:
            try:
                record(spec, _precompute_one(store, spec))
            except Exception as error:  # recorded; the other specs go on
                record(spec, error)
    if pooled:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        pool = ProcessPoolExecutor(
            max_workers=min(jobs, len(pooled)), mp_context=get_context("spawn"),
            initializer=_worker_start, initargs=(str(store.directory), threads, os.getpid()),
        )
        try:
            futures = {pool.submit(_worker_precompute, spec): spec for spec in pooled}
            for future in as_completed(futures):
                error = future.exception()
                record(futures[future], error if error is not None else future.result())
        except BaseException:  # an interrupt: the queue is not worked off first
            stop_pool(pool)
            raise
        pool.shutdown()
    return PrecomputeResult(tuple(items), time.perf_counter() - start, str(store.directory))


def describe(item: PrecomputeItem) -> str:
    """One progress line of ``item``: what happened, the spec, its size."""
    label = format_spec(item.spec, defaults=False)
    if item.error is not None:
        return f"FAILED {label}: {item.error}"
    return f"{'generated' if item.generated else 'present'} {label} ({format_size(item.nbytes)})"


def progress_bar(
    total: int, stream: TextIO | None = None, label: Callable[[Any], str] = describe
) -> Callable[[Any], None]:
    """A terminal progress bar (``tqdm``) for ``precompute(progress=...)``
    (and ``verify``'s, with ``label=str``): ``[#####     ] done/total`` and
    ``label`` of the last item; it closes when ``total`` items are done."""
    from tqdm import tqdm  # a terminal-only dependency: imported when a bar is drawn

    # A terminal that reports no size (a fresh pseudo-terminal) gets shutil's
    # 80x24: tqdm would draw a zero-width bar and hide it below a zero-row screen.
    columns, rows = shutil.get_terminal_size()
    bar = tqdm(total=total, file=stream or sys.stderr, bar_format="[{bar:20}] {n_fmt}/{total_fmt} {desc}",
               ascii=" #", mininterval=0, leave=True, ncols=max(columns, 40) - 1, nrows=max(rows, 1))

    def step(item: Any) -> None:
        bar.set_description_str(label(item), refresh=False)
        bar.update(1)
        if bar.n >= total:
            bar.close()

    return step


@dataclass(frozen=True)
class PresetSize:
    name: str
    specs: int
    bytes: int
    description: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def preset_sizes(names: Sequence[str] | None = None) -> list[PresetSize]:
    """Each preset (``names``, else all) with its exact array bytes: its
    patterns are generated, not stored, so this takes seconds."""
    rows = []
    for name in names or PRESETS:
        specs = PRESETS[name].specs
        rows.append(PresetSize(name, len(specs), sum(generate(spec).nbytes for spec in specs),
                               PRESETS[name].description))
    return rows
