"""Store maintenance as library functions: read each disk entry
(``read_entry``, ``entries``, ``orphans``), verify (and repair), export,
import, list, stats (precompute lives in ``patternstore.precompute``).
Each operation returns a result object (a dataclass with ``to_json()``,
the form ``patternstore --json`` prints); the command line
(``patternstore.cli``) only parses arguments and renders these.

Guarantees:
- Only the store's public API is used (``PatternStore.get/put/evict/clear/
  stored_keys/stored`` and its ``disk`` tier's reads).
- Read-only operations (``list_entries``, ``entry_info``, ``store_stats``,
  ``verify`` without repair, ``export``) never write the store directory:
  ``open_store(..., writable=False)`` opens it read-only, so nothing in it
  is created or changed (not a setting, not SQLite's side files), and a
  directory without a store is ``StoreUnavailable``, never created.
- Entries and files that vanish while an operation runs (another process
  clearing or repairing the directory) are treated as already gone, never as
  an error.
- Bad input (a directory that cannot hold a store, a store that must be
  written but cannot be, a bundle that fails verification) raises before
  anything is written.
"""

from __future__ import annotations

import os
import random
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

from .bundle import read_bundle, write_bundle
from .codec import ENVELOPE_VERSION, CorruptValue, decode, decode_packed, stored_spec
from .diskerrors import DamagedStore, DiskUnavailable, PatternStoreWarning
from .generate import generate
from .pattern import Pattern
from .specs import DILATED_FORMAT_VERSION, SPARSE_FORMAT_VERSION, Spec
from .rebuild import rebuild
from .spectext import format_spec, parse_spec
from .store import PatternStore

__all__ = [
    "StoreUnavailable", "open_store", "kind_of", "StoredEntry", "read_entry", "entries", "orphans",
    "remove_orphans", "EntryInfo", "list_entries", "entry_info", "resolve_key", "AmbiguousKey",
    "StoreStats", "store_stats",
    "VerifyProblem", "OrphanFile", "VerifyResult", "verify",
    "ExportResult", "export", "ImportResult", "import_bundle", "import_entries", "clear",
]


class StoreUnavailable(ValueError):
    """The directory cannot hold a store, or cannot be written where an
    operation must write; the message is one line."""


def open_store(directory: str | os.PathLike | None = None, *, writable: bool = False,
               repair: bool = False) -> PatternStore:
    """A store on ``directory`` that keeps nothing in memory (maintenance
    reads every entry once). ``writable``: raise ``StoreUnavailable`` unless
    the directory can be written (it is created when missing); otherwise the
    store is opened read-only and must exist. ``repair`` (with ``writable``):
    a database SQLite cannot open or finds unsound (``PRAGMA quick_check``)
    is rebuilt first (``rebuild``: the value files that verify are kept),
    with one warning saying so."""
    with warnings.catch_warnings(record=True) as caught:  # said once: by the error, or again below
        warnings.simplefilter("always")
        store = PatternStore(directory, max_entries=0, read_only=not writable)
        damage = _damage(store) if repair and writable else None
        if damage is not None:
            caught.clear()  # the damage, said once by the rebuild's warning
            try:
                done = rebuild(damage[1], damage[0], store.lock_timeout)
            except DiskUnavailable as error:
                raise StoreUnavailable(str(error)) from None
            store = PatternStore(directory, max_entries=0)
            warnings.warn(f"rebuilt the damaged database of {done.directory} ({done.cause}): kept {done.kept} "
                          f"value file(s) that verify, dropped {done.dropped}; entries that lived inside the "
                          "database are regenerated when next asked for", PatternStoreWarning)
    if store.disk is None:
        error = store.disk_error
        plain = type(error) is DiskUnavailable  # not damage, not distrust: the directory itself
        raise StoreUnavailable(f"{error} (the store directory must be a writable directory)" if writable and plain
                               else str(error)) from error
    if writable and store.read_only:
        raise StoreUnavailable(
            f"{store.directory} cannot be written ({store.disk_error}); this command needs a writable store directory"
        ) from store.disk_error
    for warning in caught:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return store


def _damage(store: PatternStore) -> tuple[str, Path] | None:
    """(what is wrong, the directory) when the store's database is damaged."""
    if isinstance(store.disk_error, DamagedStore) and store.disk is None:
        return str(store.disk_error), store.disk_error.directory
    if store.disk is None or not store.disk.writable:
        return None
    found = store.disk.check_database()
    if found is None:
        return None
    store.disk.close()
    return f"SQLite's quick_check: {found}", store.disk.directory


# ---------------------------------------------------------------- one entry as read
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


def read_entry(store: PatternStore, key: str) -> StoredEntry:
    """The disk entry of ``key``, decoded and checked (checksum, format,
    key) exactly as a get would; never generates, never kept in memory. An
    entry that vanished meanwhile (another process clearing the directory)
    reads as gone, never as an error."""
    disk = store.disk
    if disk is None:
        return StoredEntry(key, None, None, None, None)
    stored_at = disk.stored_at(key)
    try:
        value = disk.read(key)
    except CorruptValue as error:  # not stored as raw bytes: refused unread
        return StoredEntry(key, None, None, str(error), stored_at)
    if value is None:
        return StoredEntry(key, None, None, None, stored_at)
    try:
        return StoredEntry(key, value, decode_packed(value, key).unpack(), None, stored_at)
    except CorruptValue as error:
        return StoredEntry(key, value, None, str(error), stored_at)


def entries(store: PatternStore) -> Iterator[StoredEntry]:
    """Every disk entry, checked (``read_entry``), in key order."""
    for key in sorted(store.stored_keys()):
        yield read_entry(store, key)


def orphans(store: PatternStore, min_age: float = 3600.0) -> list[Path]:
    """Value files no entry refers to, last written over ``min_age`` s ago
    (a writer killed between its file and its row)."""
    if store.disk is None:
        return []
    try:
        return store.disk.orphans(min_age)
    except FileNotFoundError:  # a directory removed while it was listed: cleared meanwhile
        return []


def remove_orphans(store: PatternStore, paths: list[Path]) -> list[Path]:
    """Delete orphan files (``orphans``); those that could not be deleted.
    A file already gone counts as deleted."""
    if store.disk is None or store.read_only:
        return list(paths)
    return store.disk.remove(paths)


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


def _info(entry: StoredEntry) -> EntryInfo:
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
    return [_info(entry) for entry in entries(store)]


def entry_info(store: PatternStore, key: str) -> EntryInfo | None:
    """The entry of ``key``; None when the store does not hold it."""
    if not store.stored(key):
        return None
    return _info(read_entry(store, key))


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
        return path.lstat().st_size  # a planted link's own size: never followed
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
        entry = read_entry(store, key)
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
    paths = orphans(store)
    files = [OrphanFile(path, _file_size(path)) for path in paths]
    if repair and paths:
        left = set(remove_orphans(store, paths))
        for orphan in files:
            orphan.repair = "could not delete" if orphan.path in left else "removed"
        unrepaired += len(left)
    return VerifyResult(len(keys), len(compare), [p for p, _ in found], files, repair, unrepaired)


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
    kept, skipped = [], []
    for entry in entries(store):
        if entry.problem is not None:
            skipped.append(f"{entry.key}: {entry.problem}")
        elif entry.pattern is not None:
            kept.append((entry.key, entry.value))
    size = write_bundle(Path(path), kept)
    return ExportResult(len(kept), skipped, size, str(path))


@dataclass(frozen=True)
class ImportResult:
    imported: int
    present: int
    failed: list[str]    # keys that could not be written
    directory: str

    def to_json(self) -> dict[str, Any]:
        return {"imported": self.imported, "present": self.present, "failed": len(self.failed),
                "directory": self.directory}


def import_bundle(store: PatternStore, path: str | os.PathLike, *, trust: bool = False) -> ImportResult:
    """Store every entry of a bundle. Every entry is verified before any is
    written (``read_bundle`` raises ``BundleError`` or ``OSError`` first):
    decoded, and regenerated from its spec and compared byte for byte unless
    ``trust`` (``bundle.read_bundle`` says what that trusts), so a bad or
    doctored bundle imports nothing."""
    return import_entries(store, read_bundle(Path(path), trust=trust))


def import_entries(store: PatternStore, checked: Sequence[tuple[str, bytes]]) -> ImportResult:
    """Store ``(key, value)`` entries that ``bundle.read_bundle`` verified. An
    entry already stored with the same bytes counts as present (encoding is
    pure: equal bytes, equal pattern)."""
    imported = present = 0
    failed = []
    for key, value in checked:
        if read_entry(store, key).value == value:
            present += 1
            continue
        store.put(decode(value, key))  # read_bundle decoded every entry already: this one cannot fail
        if store.stored(key):
            imported += 1
        else:
            failed.append(key)
    return ImportResult(imported, present, failed, str(store.directory))
