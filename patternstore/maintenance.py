"""Store maintenance as library functions: precompute, verify (and repair),
export, import, list, stats. Each returns a result object (a dataclass with
``to_json()``, the form ``patternstore --json`` prints); the command line
(``patternstore.cli``) only parses arguments and renders these.

Guarantees:
- Only the store's public API is used (``PatternStore.get/put/evict/clear``
  and its maintenance block: ``entries``, ``read_entry``, ``stored_keys``,
  ``stored``, ``orphans``, ``remove_orphans``).
- Read-only operations (``list_entries``, ``entry_info``, ``store_stats``,
  ``verify`` without repair, ``export``) never write the store directory, so
  they work on a directory this process cannot write (``open_store(...,
  writable=False)``).
- Entries and files that vanish while an operation runs (another process
  clearing or repairing the directory) are treated as already gone, never as
  an error.
- Bad input (a directory that cannot hold a store, a store that must be
  written but cannot be) raises ``StoreUnavailable`` before anything is done.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TextIO

from .bundle import read_bundle, write_bundle
from .codec import ENVELOPE_VERSION, decode, stored_spec
from .generate import generate
from .presets import PRESETS
from .specs import DILATED_FORMAT_VERSION, SPARSE_FORMAT_VERSION, Spec
from .spectext import format_spec, parse_spec
from .store import PatternStore

__all__ = [
    "StoreUnavailable", "open_store", "kind_of",
    "EntryInfo", "list_entries", "entry_info", "resolve_key",
    "StoreStats", "store_stats",
    "PrecomputeItem", "PrecomputeResult", "precompute", "progress_bar", "PresetSize", "preset_sizes",
    "VerifyProblem", "OrphanFile", "VerifyResult", "verify",
    "ExportResult", "export", "ImportResult", "import_bundle", "import_entries", "clear", "format_size", "AmbiguousKey", "describe",
]


class StoreUnavailable(ValueError):
    """The directory cannot hold a store, or cannot be written where an
    operation must write; the message is one line."""


def open_store(directory: str | os.PathLike | None = None, *, writable: bool = False) -> PatternStore:
    """A store on ``directory`` that keeps nothing in memory (maintenance
    reads every entry once). ``writable``: raise ``StoreUnavailable`` unless
    the directory can be written; otherwise a read-only directory is fine."""
    store = PatternStore(directory, max_entries=0)
    if store.disk is None:
        raise StoreUnavailable(f"{store.disk_error} (the store directory must be a writable directory)")
    if writable and store.read_only:
        raise StoreUnavailable(
            f"{store.directory} cannot be written ({store.disk_error}); this command needs a writable store directory"
        )
    return store


def kind_of(key: str) -> str:
    """``"dilated"`` of ``"dilated-v2-<hex>"`` (kinds contain no '-')."""
    return key.split("-", 1)[0]


# ---------------------------------------------------------------- list / info
@dataclass(frozen=True)
class EntryInfo:
    """One stored entry: its spec, array shapes and sizes, or its problem."""

    key: str
    kind: str
    stored_at: float | None
    spec: Spec | None = None
    bytes: int = 0                      # array bytes
    stored_bytes: int = 0               # bytes of the stored value
    arrays: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"dtype", "shape"}
    problem: str | None = None          # "corrupt: ..." or "vanished while listing"

    def to_json(self, arrays: bool = True) -> dict[str, Any]:
        row: dict[str, Any] = {"key": self.key, "kind": self.kind, "stored_at": self.stored_at}
        if self.problem is not None:
            return {**row, "problem": self.problem}
        row.update(spec=self.spec.to_dict(), spec_text=format_spec(self.spec),
                   short_spec=format_spec(self.spec, defaults=False), bytes=self.bytes,
                   stored_bytes=self.stored_bytes)
        if arrays:
            row["arrays"] = self.arrays
        return row


def _info(entry: PatternStore.StoredEntry) -> EntryInfo:
    if entry.pattern is None:
        problem = f"corrupt: {entry.problem}" if entry.problem else "vanished while listing"
        return EntryInfo(entry.key, kind_of(entry.key), entry.stored_at, problem=problem)
    pattern = entry.pattern
    return EntryInfo(
        entry.key, kind_of(entry.key), entry.stored_at, pattern.spec, pattern.nbytes, len(entry.value),
        {name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
         for name, t in pattern.arrays.items()},
    )


def list_entries(store: PatternStore) -> list[EntryInfo]:
    """Every stored entry, by key."""
    return [_info(entry) for entry in store.entries()]


def entry_info(store: PatternStore, key: str) -> EntryInfo | None:
    """The entry of ``key``; None when the store does not hold it."""
    if not store.stored(key):
        return None
    return _info(store.read_entry(key))


class AmbiguousKey(ValueError):
    """A key prefix that matches several stored keys."""


def resolve_key(store: PatternStore, text: str) -> str | None:
    """A full key, a unique key prefix (as ``ls`` prints), or a SPEC (raises
    ``SpecError`` if malformed, ``AmbiguousKey`` for a prefix of several)."""
    if ":" in text:
        return parse_spec(text).key
    keys = store.stored_keys()
    if text in keys:
        return text
    matches = [key for key in keys if key.startswith(text)]
    if len(matches) > 1:
        raise AmbiguousKey(f"{text!r} matches {len(matches)} keys; give more of the key (see 'patternstore ls')")
    return matches[0] if matches else None


# ---------------------------------------------------------------- stats
@dataclass(frozen=True)
class StoreStats:
    directory: str
    entries: int
    bytes: int
    disk_size_limit: int
    format_version: int
    spec_format_versions: dict[str, int]
    kinds: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def store_stats(store: PatternStore) -> StoreStats:
    """Entries by kind, bytes on disk, limit and format versions."""
    keys = store.stored_keys()
    kinds: dict[str, int] = {}
    for key in keys:
        kinds[kind_of(key)] = kinds.get(kind_of(key), 0) + 1
    return StoreStats(
        directory=str(store.directory), entries=len(keys), bytes=store.disk.volume(),
        disk_size_limit=store.disk.size_limit, format_version=ENVELOPE_VERSION,
        spec_format_versions={"dilated": DILATED_FORMAT_VERSION, "sparse": SPARSE_FORMAT_VERSION},
        kinds=dict(sorted(kinds.items())),
    )


# ---------------------------------------------------------------- precompute
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


def _worker_start(directory: str, threads: int) -> None:
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
        with ProcessPoolExecutor(
            max_workers=min(jobs, len(pooled)), mp_context=get_context("spawn"),
            initializer=_worker_start, initargs=(str(store.directory), threads),
        ) as pool:
            futures = {pool.submit(_worker_precompute, spec): spec for spec in pooled}
            for future in as_completed(futures):
                error = future.exception()
                record(futures[future], error if error is not None else future.result())
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


# ---------------------------------------------------------------- verify
@dataclass
class VerifyProblem:
    key: str
    problem: str
    repair: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "problem": self.problem, **({"repair": self.repair} if self.repair else {})}


@dataclass
class OrphanFile:
    path: Path
    bytes: int
    repair: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "bytes": self.bytes, **({"repair": self.repair} if self.repair else {})}


@dataclass(frozen=True)
class VerifyResult:
    entries: int
    compared: int
    problems: list[VerifyProblem]
    orphans: list[OrphanFile]
    repaired: bool      # repair was asked for
    unrepaired: int     # problems and orphans repair could not fix

    @property
    def ok(self) -> bool:
        """Without repair: nothing found; with repair: everything fixed."""
        return self.unrepaired == 0 if self.repaired else not (self.problems or self.orphans)

    def to_json(self) -> dict[str, Any]:
        return {"entries": self.entries, "compared": self.compared,
                "problems": [p.to_json() for p in self.problems],
                "orphans": [o.to_json() for o in self.orphans], "ok": self.ok}


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # removed meanwhile
        return 0


def verify(
    store: PatternStore, *, full: bool = False, sample: int = 8, repair: bool = False,
    rng: random.Random | None = None, progress: Callable[[str], None] | None = None,
) -> VerifyResult:
    """Decode every entry (checksum, format, key); compare ``sample`` entries
    chosen at random (``full``: all) with a fresh generation; list orphan
    value files. ``repair``: drop bad entries and regenerate those whose spec
    is still readable, delete orphan files (needs a writable store).
    Without ``repair`` nothing is written. ``progress`` gets each key."""
    keys = sorted(store.stored_keys())
    chooser = rng or random
    compare = set(keys) if full else set(chooser.sample(keys, min(sample, len(keys))))
    found: list[tuple[VerifyProblem, Spec | None]] = []
    for key in keys:
        entry = store.read_entry(key)
        if progress is not None:
            progress(key)
        if entry.problem is not None:
            found.append((VerifyProblem(key, entry.problem), stored_spec(entry.value, key)))
        elif entry.pattern is not None and key in compare and not entry.pattern.equals(generate(entry.pattern.spec)):
            found.append((VerifyProblem(key, "arrays differ from a fresh generation"), entry.pattern.spec))
        # (no pattern and no problem: deleted since listed)

    unrepaired = 0
    if repair:
        for problem, spec in found:
            store.evict(problem.key)
            if store.stored(problem.key):
                problem.repair, unrepaired = "could not delete", unrepaired + 1
            elif spec is None:
                problem.repair = "dropped (spec unreadable, nothing to regenerate)"
            else:
                store.get(spec)
                ok = store.stored(spec.key)
                problem.repair = "regenerated" if ok else "dropped; regenerating did not write"
                unrepaired += not ok
    # Value files no entry refers to (a writer killed between file and row).
    paths = store.orphans()
    orphans = [OrphanFile(path, _file_size(path)) for path in paths]
    if repair and paths:
        left = set(store.remove_orphans(paths))
        for orphan in orphans:
            orphan.repair = "could not delete" if orphan.path in left else "removed"
        unrepaired += len(left)
    return VerifyResult(len(keys), len(compare), [p for p, _ in found], orphans, repair, unrepaired)


# ---------------------------------------------------------------- clear / export / import
def clear(store: PatternStore) -> int:
    """Delete every stored pattern; how many there were."""
    count = len(store.stored_keys())
    store.clear()
    return count


@dataclass(frozen=True)
class ExportResult:
    exported: int
    skipped: list[str]   # "key: problem" of each corrupt entry left out
    bytes: int
    file: str

    def to_json(self) -> dict[str, Any]:
        return {"exported": self.exported, "skipped": len(self.skipped), "bytes": self.bytes, "file": self.file}


def export(store: PatternStore, path: str | os.PathLike) -> ExportResult:
    """Write every valid entry into one bundle file (``patternstore.bundle``),
    as stored. Reads the store only. Raises ``OSError`` if ``path`` cannot be written."""
    entries, skipped = [], []
    for entry in store.entries():
        if entry.problem is not None:
            skipped.append(f"{entry.key}: {entry.problem}")
        elif entry.pattern is not None:
            entries.append((entry.key, entry.value))
    size = write_bundle(Path(path), entries)
    return ExportResult(len(entries), skipped, size, str(path))


@dataclass(frozen=True)
class ImportResult:
    imported: int
    present: int
    failed: list[str]    # keys that could not be written
    directory: str

    def to_json(self) -> dict[str, Any]:
        return {"imported": self.imported, "present": self.present, "failed": len(self.failed),
                "directory": self.directory}


def import_bundle(store: PatternStore, path: str | os.PathLike) -> ImportResult:
    """Store every entry of a bundle. Every entry is verified before any is
    written (``read_bundle`` raises ``BundleError`` or ``OSError`` first), so
    a bad bundle imports nothing."""
    return import_entries(store, read_bundle(Path(path)))


def import_entries(store: PatternStore, entries: Sequence[tuple[str, bytes]]) -> ImportResult:
    """Store ``(key, value)`` entries that ``bundle.read_bundle`` verified. An
    entry already stored with the same bytes counts as present (encoding is
    pure: equal bytes, equal pattern)."""
    imported = present = 0
    failed = []
    for key, value in entries:
        if store.read_entry(key).value == value:
            present += 1
            continue
        store.put(decode(value, key))  # read_bundle decoded every entry already: this one cannot fail
        if store.stored(key):
            imported += 1
        else:
            failed.append(key)
    return ImportResult(imported, present, failed, str(store.directory))


def format_size(n: int) -> str:
    """``n`` bytes for people: B, KiB, MiB, GiB."""
    if n < 1024:
        return f"{n} B"
    value, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"

