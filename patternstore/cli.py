"""The ``patternstore`` command line: seed, inspect, verify and ship a store.

    patternstore [--dir DIR] [-q] [--json] COMMAND ...

Exit status: 0 success; 1 the work found or left something wrong (verify
problems, a pattern that could not be stored, a key not in the store);
2 bad input (usage, SPEC, config, bundle or directory), reported as one line
on stderr before anything is written. Data goes to stdout (``--json`` makes it
machine-readable); progress and notes go to stderr (``-q`` silences them).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import textwrap
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

import msgpack

from .bundle import BundleError, read_bundle, write_bundle
from .codec import ENVELOPE_VERSION, CorruptValue, decode
from .generate import generate
from .pattern import Pattern
from .presets import PRESETS
from .fields import Field
from .kinds import SPARSE_KINDS
from .specs import DILATED_FORMAT_VERSION, SPARSE_BASE_FIELDS, SPARSE_FORMAT_VERSION, Spec, spec_from_dict
from .spectext import (
    EXAMPLES, KINDS, LIST_FIELDS, SpecError, format_spec, format_value, kind_schema, parse_spec, spec_from_fields,
)
from .store import PatternStore

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - exercised on Python 3.10 only
    tomllib = None

PROG = "patternstore"


def _grammar_help() -> str:
    """The SPEC grammar for --help: every kind with its help line and its
    fields (required, then optional with defaults), from their declarations."""
    def fields(schema: Sequence[Field]) -> str:
        required = [f.name for f in schema if f.required]
        def optional(f: Field) -> str:
            choices = getattr(f.check, "allowed", ())  # a choice lists its values, the default first
            allowed = (f.default, *(c for c in choices if c != f.default))
            return f.name if f.default is None else f"{f.name}={'|'.join(map(format_value, allowed))}"

        optional = [optional(f) for f in schema if not f.required]
        return " ".join(required + ([f"[{' '.join(optional)}]"] if optional else []))

    lines = [
        "SPEC grammar:  KIND:FIELD=VALUE:FIELD=VALUE...",
        "  VALUE  an integer, true/false, or a string. List fields take items separated by",
        *textwrap.wrap(f"commas (one item is a list of one): {', '.join(sorted(LIST_FIELDS))}", 80,
                       initial_indent="         ", subsequent_indent="         "),
        "  KINDs and their FIELDs (optional ones in brackets, with their defaults):",
        f"    dilated          {fields(kind_schema('dilated'))}  (one pattern for every length)",
        f"    every sparse kind: {fields(SPARSE_BASE_FIELDS)}, and",
    ]
    for name, kind in SPARSE_KINDS.items():
        lines += textwrap.wrap(f"{kind.help}: {fields(kind.params)}", 96,
                               initial_indent=f"      {name:<15}", subsequent_indent=" " * 21)
    return "\n".join(lines + ["examples:", *(f"  {example}" for example in EXAMPLES)])


GRAMMAR = _grammar_help()

CONFIG_HELP = """\
--config FILE (TOML, Python 3.11+):
  presets = ["default"]
  specs = ["local:seq_len=8192:block_size=128",
           {kind = "dilated", segment_lengths = [2048, 4096],
            dilation_rates = [1, 2], num_heads = 8}]"""


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2, nothing written."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


# ---------------------------------------------------------------- output helpers
def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"


def _when(timestamp: float | None) -> str:
    return "-" if timestamp is None else datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def _note(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text, file=sys.stderr)


def _emit(args: argparse.Namespace, data: Any, text: str | None) -> None:
    """Print a command's result: JSON with ``--json``, else ``text`` (unless -q)."""
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    elif text is not None and not args.quiet:
        print(text)


class Progress:
    """A one-line bar on a terminal, one plain line per item elsewhere."""

    def __init__(self, total: int, stream: TextIO, enabled: bool) -> None:
        self.total, self.stream, self.enabled = total, stream, enabled
        self.tty = enabled and stream.isatty()
        self.done = 0

    def step(self, text: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self.tty:
            width = max(shutil.get_terminal_size().columns, 40)
            bar = "#" * (20 * self.done // max(self.total, 1))
            line = f"[{bar:<20}] {self.done}/{self.total} {text}"
            self.stream.write("\r" + line[: width - 1].ljust(width - 1))
            if self.done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(f"[{self.done}/{self.total}] {text}\n")
        self.stream.flush()


# ---------------------------------------------------------------- the store
def _open_store(args: argparse.Namespace) -> PatternStore:
    """The store in ``--dir`` (else the default directory); a directory that
    cannot hold a disk tier is bad input."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = PatternStore(args.dir, max_entries=0)  # the command line keeps nothing in memory
    if store.disk is None:  # (its warning says patterns stay in memory: not so here)
        raise UsageError(f"{store.disk_error} (the store directory must be a writable directory)")
    for warning in caught:
        _note(args, f"{PROG}: warning: {str(warning.message).splitlines()[0]}")
    return store


def _kind_of(key: str) -> str:
    """``"dilated"`` of ``"dilated-v1-<hex>"`` (kinds contain no '-')."""
    return key.split("-", 1)[0]


def _short(key: str) -> str:
    kind, version, digest = (key.split("-", 2) + ["", ""])[:3]
    return f"{kind}-{version}-{digest[:12]}" if digest else key


# ---------------------------------------------------------------- precompute
def _config_specs(path: Path) -> list[Spec]:
    if tomllib is None:
        raise UsageError(f"--config {path}: TOML config needs Python 3.11+ (tomllib); pass --spec instead")
    try:
        with open(path, "rb") as file:
            config = tomllib.load(file)
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except OSError as error:
        raise UsageError(f"--config {path}: cannot read: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"--config {path}: not valid TOML: {error}") from None
    unknown = sorted(set(config) - {"presets", "specs"})
    if unknown:
        raise UsageError(f"--config {path}: unknown key {', '.join(map(repr, unknown))}; allowed: presets, specs")
    presets, items = config.get("presets", []), config.get("specs", [])
    if not isinstance(presets, list) or not all(isinstance(p, str) for p in presets):
        raise UsageError(f"--config {path}: presets must be a list of preset names ({', '.join(PRESETS)})")
    if not isinstance(items, list):
        raise UsageError(f"--config {path}: specs must be a list of SPEC strings or tables")
    specs = [spec for name in presets for spec in _preset_specs(name)]
    for position, item in enumerate(items):
        try:
            if isinstance(item, str):
                specs.append(parse_spec(item))
            elif isinstance(item, dict):
                fields = dict(item)
                kind = fields.pop("kind", None)
                if not isinstance(kind, str):
                    raise SpecError(f"a spec table needs kind = one of {', '.join(KINDS)}")
                specs.append(spec_from_fields(kind, fields))
            else:
                raise SpecError("must be a SPEC string or a table with kind and fields")
        except SpecError as error:
            raise UsageError(f"--config {path}: specs[{position}]: {error}") from None
    return specs


def _preset_specs(name: str) -> tuple[Spec, ...]:
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name].specs


def _requested_specs(args: argparse.Namespace) -> list[Spec]:
    """Every spec named by --preset, --spec and --config, validated, each key once."""
    specs = [spec for name in args.preset for spec in _preset_specs(name)]
    for text in args.spec:
        try:
            specs.append(parse_spec(text))
        except SpecError as error:
            raise UsageError(f"--spec: {error}") from None
    for path in args.config:
        specs += _config_specs(path)
    return list({spec.key: spec for spec in specs}.values())


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


def _precompute_one(store: PatternStore, spec: Spec) -> tuple[bool, int, bool]:
    """``(generated here, array bytes, now on disk)`` after ``store.get(spec)``.
    The store's single flight makes exactly one process generate a key; the
    others read what it wrote."""
    before = store.stats()["generations"]
    pattern = store.get(spec)
    generated = store.stats()["generations"] > before
    return generated, pattern.nbytes, store.disk.contains(spec.key)


def _list_presets(args: argparse.Namespace) -> int:
    """Each preset (those named by --preset, else all) with its exact size:
    its patterns are generated, not stored, so this takes seconds."""
    rows = []
    for name in args.preset or PRESETS:
        specs = _preset_specs(name)
        total = sum(generate(spec).nbytes for spec in specs)
        rows.append({"name": name, "specs": len(specs), "bytes": total, "description": PRESETS[name].description})
    text = "\n".join(
        f"{r['name']:<14} {r['specs']:>4} specs {_size(r['bytes']):>10}  {r['description']}" for r in rows
    )
    _emit(args, rows, text)
    return 0


def cmd_precompute(args: argparse.Namespace) -> int:
    if args.list_presets:
        return _list_presets(args)
    specs = _requested_specs(args)
    if not specs:
        raise UsageError("nothing to precompute: give --preset NAME, --spec SPEC or --config FILE "
                         f"(presets: {', '.join(PRESETS)})")
    store = _open_store(args)
    start = time.perf_counter()
    # What is on disk is read here, through store.get, so a stored value that
    # fails to decode is regenerated rather than counted as present; what is
    # absent goes to the worker processes when there are several.
    absent = [spec for spec in specs if not store.contains(spec)]
    pooled = absent if args.jobs > 1 and len(absent) > 1 else []
    here = [spec for spec in specs if spec.key not in {s.key for s in pooled}]
    progress = Progress(len(specs), sys.stderr, enabled=not args.quiet)
    generated = present = written = 0
    failed: list[str] = []

    def record(spec: Spec, outcome: tuple[bool, int, bool] | BaseException) -> None:
        nonlocal generated, present, written
        label = format_spec(spec, defaults=False)
        if isinstance(outcome, BaseException):
            failed.append(f"{spec.key}: {type(outcome).__name__}: {outcome}")
            progress.step(f"FAILED {label}: {outcome}")
            return
        was_generated, nbytes, on_disk = outcome
        if not on_disk:
            failed.append(f"{spec.key}: generated but not written to {store.directory}")
        if was_generated:
            generated += 1
            written += nbytes
        else:
            present += 1  # stored before, or by another process meanwhile
        progress.step(f"{'generated' if was_generated else 'present'} {label} ({_size(nbytes)})")

    for spec in here:
        try:
            record(spec, _precompute_one(store, spec))
        except Exception as error:  # reported and counted; the other specs go on
            record(spec, error)
    if pooled:
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        with ProcessPoolExecutor(
            max_workers=min(args.jobs, len(pooled)),
            mp_context=get_context("spawn"),
            initializer=_worker_start,
            initargs=(str(store.directory), threads),
        ) as pool:
            futures = {pool.submit(_worker_precompute, spec): spec for spec in pooled}
            for future in as_completed(futures):
                error = future.exception()
                record(futures[future], error if error is not None else future.result())

    seconds = time.perf_counter() - start
    summary = {
        "specs": len(specs), "generated": generated, "present": present, "failed": len(failed),
        "bytes": written, "seconds": round(seconds, 3), "directory": str(store.directory),
    }
    for line in failed:
        print(f"{PROG}: failed: {line}", file=sys.stderr)
    _emit(args, summary,
          f"generated {generated}, already present {present}"
          + (f", failed {len(failed)}" if failed else "")
          + f"; {_size(written)} in {seconds:.2f} s ({store.directory})")
    return 1 if failed else 0


# ---------------------------------------------------------------- ls / stats / info
def _read(store: PatternStore, key: str) -> tuple[bytes | None, Pattern | None, str | None]:
    """``(raw bytes, decoded pattern, problem)`` of one entry; raw is None when
    the entry vanished or was refused unread (not stored as raw bytes)."""
    try:
        raw = store.disk.read(key)
    except CorruptValue as error:
        return None, None, str(error)
    if raw is None:
        return None, None, None
    try:
        return raw, decode(raw, key), None
    except CorruptValue as error:
        return raw, None, str(error)


def _entry(store: PatternStore, key: str) -> dict[str, Any]:
    """What ``ls`` and ``info`` show of one stored entry."""
    raw, pattern, problem = _read(store, key)
    row: dict[str, Any] = {"key": key, "kind": _kind_of(key), "stored_at": store.disk.stored_at(key)}
    if pattern is None:
        return {**row, "problem": f"corrupt: {problem}" if problem else "vanished while listing"}
    return {
        **row,
        "spec": pattern.spec.to_dict(),
        "spec_text": format_spec(pattern.spec),
        "short_spec": format_spec(pattern.spec, defaults=False),
        "bytes": pattern.nbytes,
        "stored_bytes": len(raw),
        "arrays": {name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
                   for name, t in pattern.arrays.items()},
    }


def cmd_ls(args: argparse.Namespace) -> int:
    store = _open_store(args)
    rows = [_entry(store, key) for key in sorted(store.disk.keys())]
    if args.json:
        _emit(args, [{k: v for k, v in r.items() if k != "arrays"} for r in rows], None)
        return 0
    table = [("KEY", "KIND", "BYTES", "STORED", "FIELDS")] + [
        (_short(r["key"]), r["kind"], _size(r["bytes"]) if "bytes" in r else "-", _when(r["stored_at"]),
         r.get("short_spec", "").partition(":")[2] or r.get("problem", ""))
        for r in rows
    ]
    if rows:
        key_width, kind_width = (max(len(row[i]) for row in table) for i in (0, 1))
        for key, kind, size, when, fields in table:
            print(f"{key:<{key_width}}  {kind:<{kind_width}}  {size:>10}  {when:<19}  {fields}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    store = _open_store(args)
    keys = store.disk.keys()
    kinds: dict[str, int] = {}
    for key in keys:
        kinds[_kind_of(key)] = kinds.get(_kind_of(key), 0) + 1
    data = {
        "directory": str(store.directory),
        "entries": len(keys),
        "bytes": store.disk.volume(),
        "disk_size_limit": store.disk.size_limit,
        "format_version": ENVELOPE_VERSION,
        "spec_format_versions": {"dilated": DILATED_FORMAT_VERSION, "sparse": SPARSE_FORMAT_VERSION},
        "kinds": dict(sorted(kinds.items())),
    }
    _emit(args, data, "\n".join([
        f"directory       {data['directory']}",
        f"entries         {data['entries']}" + (
            f" ({', '.join(f'{k} {n}' for k, n in data['kinds'].items())})" if kinds else ""),
        f"bytes on disk   {_size(data['bytes'])}",
        f"disk limit      {_size(data['disk_size_limit'])}",
        f"format version  envelope {ENVELOPE_VERSION}, dilated {DILATED_FORMAT_VERSION}, sparse {SPARSE_FORMAT_VERSION}",
    ]))
    return 0


def _resolve_key(store: PatternStore, text: str) -> str | None:
    """A full key, a unique key prefix (as ``ls`` prints), or a SPEC."""
    if ":" in text:
        try:
            return parse_spec(text).key
        except SpecError as error:
            raise UsageError(str(error)) from None
    keys = store.disk.keys()
    if text in keys:
        return text
    matches = [key for key in keys if key.startswith(text)]
    if len(matches) > 1:
        raise UsageError(f"{text!r} matches {len(matches)} keys; give more of the key (see 'patternstore ls')")
    return matches[0] if matches else None


def cmd_info(args: argparse.Namespace) -> int:
    store = _open_store(args)
    key = _resolve_key(store, args.key)
    if key is None or not store.disk.contains(key):
        print(f"{PROG}: no pattern stored under {args.key!r} in {store.directory}", file=sys.stderr)
        return 1
    row = _entry(store, key)
    if args.json:
        _emit(args, row, None)
    elif "problem" in row:
        print(f"{key}\n  {row['problem']} (run 'patternstore verify --repair')")
    else:
        lines = [key, f"  spec    {row['spec_text']}"]
        lines += [f"          {name} = {format_value(value)}" for name, value in row["spec"].items() if name != "kind"]
        lines += [f"  array   {name}: {a['dtype']} {a['shape']}" for name, a in row["arrays"].items()]
        lines += [f"  bytes   {_size(row['bytes'])} in arrays, {_size(row['stored_bytes'])} stored",
                  f"  stored  {_when(row['stored_at'])}"]
        print("\n".join(lines))
    return 1 if "problem" in row else 0


# ---------------------------------------------------------------- verify
def _recover_spec(raw: bytes | None, key: str) -> Spec | None:
    """The spec a damaged envelope was written for, when its (unchecked) spec
    field still rebuilds to exactly ``key``; regenerating that spec gives the
    one value that belongs under the key. Otherwise None."""
    try:
        envelope = msgpack.unpackb(raw, raw=False, strict_map_key=True, ext_hook=lambda c, d: None)
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in envelope["spec"].items()}
        spec = spec_from_dict(fields)
    except Exception:  # anything unreadable: nothing to regenerate from
        return None
    return spec if spec.key == key else None


def cmd_verify(args: argparse.Namespace) -> int:
    store = _open_store(args)
    keys = sorted(store.disk.keys())
    compare = set(keys) if args.full else set(random.sample(keys, min(args.sample, len(keys))))
    problems: list[dict[str, Any]] = []
    progress = Progress(len(keys), sys.stderr, enabled=not args.quiet and sys.stderr.isatty())
    for key in keys:
        raw, pattern, problem = _read(store, key)
        progress.step(_short(key))
        if problem is not None:
            problems.append({"key": key, "problem": problem, "spec": _recover_spec(raw, key)})
            continue
        if pattern is None:
            continue  # deleted since listed
        if key in compare and not pattern.equals(generate(pattern.spec)):
            problems.append({"key": key, "problem": "arrays differ from a fresh generation", "spec": pattern.spec})

    unrepaired = 0
    for problem in problems:
        spec = problem.pop("spec")
        if not args.repair:
            continue
        store.evict(problem["key"])
        if store.disk.contains(problem["key"]):
            problem["repair"], unrepaired = "could not delete", unrepaired + 1
        elif spec is None:
            problem["repair"] = "dropped (spec unreadable, nothing to regenerate)"
        else:
            store.get(spec)
            ok = store.disk.contains(spec.key)
            problem["repair"] = "regenerated" if ok else "dropped; regenerating did not write"
            unrepaired += not ok
    # Value files no entry refers to (a writer killed between file and row).
    orphan_paths = store.disk.orphans()
    orphans = [{"path": str(path), "bytes": _file_size(path)} for path in orphan_paths]
    if args.repair and orphan_paths:
        left = set(store.disk.remove(orphan_paths))
        for path, orphan in zip(orphan_paths, orphans):
            orphan["repair"] = "could not delete" if path in left else "removed"
        unrepaired += len(left)
    found = bool(problems or orphans)
    status = (1 if unrepaired else 0) if args.repair else (1 if found else 0)
    data = {"entries": len(keys), "compared": len(compare), "problems": problems, "orphans": orphans,
            "ok": status == 0}
    if args.json:
        _emit(args, data, None)
    else:
        for p in problems:
            print(f"{p['key']}: {p['problem']}" + (f" -> {p['repair']}" if "repair" in p else ""))
        for o in orphans:
            print(f"{o['path']}: orphan file of {o['bytes']} bytes, no entry refers to it"
                  + (f" -> {o['repair']}" if "repair" in o else ""))
        _note(args, f"verified {len(keys)} entries ({len(compare)} compared with a fresh generation): "
                    f"{len(problems)} problem(s), {len(orphans)} orphan file(s)"
                    + (", repaired" if args.repair and found and not unrepaired else ""))
    return status


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# ---------------------------------------------------------------- clear / export / import
def cmd_clear(args: argparse.Namespace) -> int:
    store = _open_store(args)
    count = len(store.disk.keys())
    if not args.yes:
        if not sys.stdin.isatty():
            raise UsageError(f"refusing to clear {count} patterns in {store.directory} without confirmation: pass --yes")
        answer = input(f"Delete all {count} patterns ({_size(store.disk.volume())}) in {store.directory}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing cleared", file=sys.stderr)
            return 1
    store.clear()
    _emit(args, {"cleared": count, "directory": str(store.directory)}, f"cleared {count} patterns from {store.directory}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if not args.file.parent.is_dir():
        raise UsageError(f"export: {args.file.parent} is not a directory")
    store = _open_store(args)
    entries, skipped = [], []
    for key in sorted(store.disk.keys()):
        raw, pattern, problem = _read(store, key)
        if problem is not None:
            skipped.append(f"{key}: {problem}")
        elif pattern is not None:
            entries.append((key, raw))
    try:
        size = write_bundle(args.file, entries)
    except OSError as error:
        raise UsageError(f"export: cannot write {args.file}: {error.strerror}") from None
    for line in skipped:
        print(f"{PROG}: skipped corrupt entry {line} (run 'patternstore verify --repair')", file=sys.stderr)
    _emit(args, {"exported": len(entries), "skipped": len(skipped), "bytes": size, "file": str(args.file)},
          f"exported {len(entries)} patterns ({_size(size)}) to {args.file}")
    return 1 if skipped else 0


def cmd_import(args: argparse.Namespace) -> int:
    try:
        entries = read_bundle(args.file)  # every entry verified before any is written
    except FileNotFoundError:
        raise UsageError(f"import: {args.file}: no such file") from None
    except OSError as error:
        raise UsageError(f"import: cannot read {args.file}: {error.strerror}") from None
    except BundleError as error:
        raise UsageError(f"import: {args.file}: {error}; nothing imported") from None
    store = _open_store(args)
    imported = present = 0
    failed = []
    for key, value in entries:
        if _read(store, key)[0] == value:  # encode is pure: equal bytes, equal pattern
            present += 1
        elif store.disk.write(key, value):
            imported += 1
        else:
            failed.append(key)
    for key in failed:
        print(f"{PROG}: failed: could not write {key} to {store.directory}", file=sys.stderr)
    _emit(args, {"imported": imported, "present": present, "failed": len(failed), "directory": str(store.directory)},
          f"imported {imported}, already present {present} ({store.directory})")
    return 1 if failed else 0


# ---------------------------------------------------------------- argument parsing
def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


def _global_options(parser: argparse.ArgumentParser, defaults: dict[str, Any] | None) -> None:
    """--dir, -q, --json. They work before or after the command: on each
    command they default to SUPPRESS (``defaults=None``), so an option given
    before the command is not overwritten by the command's own default."""
    def default(name: str) -> Any:
        return argparse.SUPPRESS if defaults is None else defaults[name]

    parser.add_argument("--dir", type=Path, default=default("dir"), metavar="DIR",
                        help="store directory (default: $PATTERNSTORE_DIR, else the user cache dir)")
    parser.add_argument("-q", "--quiet", action="store_true", default=default("quiet"),
                        help="no progress or notes on stderr")
    parser.add_argument("--json", action="store_true", default=default("json"),
                        help="machine-readable output on stdout")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Seed, inspect, verify and ship a store of attention index patterns.",
        epilog=GRAMMAR + "\n\nexit status: 0 ok; 1 problems found or work failed; 2 bad input (nothing written)",
    )
    _global_options(parser, defaults={"dir": None, "quiet": False, "json": False})
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    def command(name: str, run: Callable[[argparse.Namespace], int], help: str, **kwargs: Any) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help,
                                  formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
        _global_options(sub, defaults=None)
        sub.set_defaults(run=run)
        return sub

    pre = command("precompute", cmd_precompute, "generate and store patterns (skips what is stored)",
                  epilog=GRAMMAR + "\n\n" + CONFIG_HELP)
    pre.add_argument("--preset", action="append", default=[], metavar="NAME",
                     help=f"a named set of specs (repeatable): {', '.join(PRESETS)}")
    pre.add_argument("--spec", action="append", default=[], metavar="SPEC", help="one spec (repeatable); grammar below")
    pre.add_argument("--config", action="append", default=[], type=Path, metavar="FILE",
                     help="a TOML file with presets and specs (repeatable); format below")
    pre.add_argument("--list-presets", action="store_true",
                     help="show the presets (those given with --preset, else all) with spec counts and sizes")
    pre.add_argument("--jobs", "-j", type=_positive_int, default=1, metavar="N",
                     help="generate in N processes (default 1)")

    command("ls", cmd_ls, "one line per stored pattern: key, kind, bytes, stored time, fields")
    command("stats", cmd_stats, "entries, bytes, disk limit, directory and format version")
    info = command("info", cmd_info, "spec and array shapes of one pattern")
    info.add_argument("key", metavar="KEY", help="a key, a unique key prefix as 'ls' prints it, or a SPEC")

    verify = command("verify", cmd_verify,
                     "decode every entry (checksum, version, key), compare a sample with a fresh generation")
    verify.add_argument("--full", action="store_true", help="compare every entry with a fresh generation")
    verify.add_argument("--sample", type=_positive_int, default=8, metavar="N",
                        help="entries compared with a fresh generation, chosen at random (default 8)")
    verify.add_argument("--repair", action="store_true",
                        help="drop bad entries and regenerate them; delete orphan value files")

    clear = command("clear", cmd_clear, "delete every stored pattern (asks first on a terminal)")
    clear.add_argument("--yes", "-y", action="store_true", help="do not ask")

    export = command("export", cmd_export, "write every valid entry into one portable bundle file")
    export.add_argument("file", type=Path, metavar="FILE")
    import_ = command("import", cmd_import, "verify every entry of a bundle, then store them all (or none)")
    import_.add_argument("file", type=Path, metavar="FILE")
    return parser


def _show_warning(message: Warning | str, *_: Any, **__: Any) -> None:
    """Warnings (e.g. a store directory on NFS) as one line, without source."""
    print(f"{PROG}: warning: {str(message).splitlines()[0]}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        with warnings.catch_warnings():  # restores showwarning when main returns
            warnings.showwarning = _show_warning
            args = parser.parse_args(argv)
            return args.run(args)
    except UsageError as error:
        print(f"{PROG}: error: {' '.join(str(error).split(chr(10)))}", file=sys.stderr)
        return 2
    except SystemExit as exit:  # --help and --version print, then exit 0
        return exit.code if isinstance(exit.code, int) else 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `patternstore ls | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1
