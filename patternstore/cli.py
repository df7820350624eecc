"""The ``patternstore`` command line: seed, inspect, verify and ship a store.

    patternstore [--dir DIR] [-q] [--json] COMMAND ...

Exit status (the README's table): 0 success; 1 problems found or the work
failed (a full disk, an I/O error); 2 bad input, one line on stderr before
anything is written; 130 interrupted, 143 terminated (workers stopped). Data
goes to stdout (``--json``: machine-readable), progress and notes to stderr
(``-q`` silences them); text from a store or a bundle is printed escaped and cut.

Start-up: parsing, ``--help`` and argument errors (a bad SPEC, config or
option) import no torch (the spec registries are torch-free); a command
imports the store and maintenance code (and so torch) when it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
import warnings
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .cost import MAX_GENERATION_BYTES_ENV, SpecTooLarge, check_generation, generation_limit, max_generation_bytes
from .faults import disk_failed
from .interrupts import Terminated, sigterm_raises
from .presets import PRESETS
from .printable import printable
from .sizes import format_size, parse_size
from .specs import Spec
from .spectext import KINDS, SpecError, format_spec, format_value, grammar_help, parse_spec, spec_from_fields

if TYPE_CHECKING:
    from .store import PatternStore


PROG = "patternstore"

GRAMMAR = grammar_help()

CONFIG_HELP = """\
--config FILE (TOML):
  presets = ["default"]
  specs = ["local:seq_len=8192:block_size=128",
           {kind = "dilated", segment_lengths = [2048, 4096],
            dilation_rates = [1, 2], num_heads = 8}]"""


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2, nothing written."""


class WorkFailed(Exception):
    """The work could not be done (a full disk, an I/O error): one line, exit status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


# ---------------------------------------------------------------- output helpers
def _when(timestamp: float | None) -> str:
    return "-" if timestamp is None else datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def _note(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(printable(text, 2000), file=sys.stderr)


def _emit(args: argparse.Namespace, data: Any, text: str | None) -> None:
    """Print a command's result: JSON with ``--json``, else ``text`` (unless -q)."""
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    elif text is not None and not args.quiet:
        print(text)


def _progress(
    args: argparse.Namespace, total: int, label: Callable[[Any], str], *, lines: bool
) -> Callable[[Any], None] | None:
    """A bar on a terminal; elsewhere one plain ``[i/n] label`` line per item
    when ``lines`` (nothing with -q)."""
    from .precompute import progress_bar
    if args.quiet:
        return None
    if sys.stderr.isatty():
        return progress_bar(total, sys.stderr, label)
    if not lines:
        return None
    done = 0

    def line(item: Any) -> None:
        nonlocal done
        done += 1
        print(f"[{done}/{total}] {label(item)}", file=sys.stderr, flush=True)

    return line


def _open_store(args: argparse.Namespace, *, writable: bool = False, repair: bool = False) -> PatternStore:
    """The store in ``--dir`` (else the default directory); a directory that
    cannot hold a store, or cannot be written by a command that writes, is
    bad input. Read-only commands open it read-only: they create and change
    nothing, so a directory without a store is bad input too."""
    from . import maintenance
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            store = maintenance.open_store(args.dir, writable=writable, repair=repair)
        except maintenance.StoreUnavailable as error:
            raise (WorkFailed if disk_failed(error) else UsageError)(str(error)) from None
    for warning in caught:
        _note(args, f"{PROG}: warning: {str(warning.message).splitlines()[0]}")
    return store


def _short(key: str) -> str:
    kind, version, digest = (key.split("-", 2) + ["", ""])[:3]
    return printable(f"{kind}-{version}-{digest[:12]}" if digest else key, 60)


# ---------------------------------------------------------------- precompute
def _config_specs(path: Path) -> list[Spec]:
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
    specs = list({spec.key: spec for spec in specs}.values())
    for spec in specs:  # before any work, and before torch is imported
        try:
            check_generation(spec)
        except SpecTooLarge as error:
            raise UsageError(f"{printable(format_spec(spec, defaults=False), 120)}: {error}") from None
    return specs


def _list_presets(args: argparse.Namespace) -> int:
    for name in args.preset:
        _preset_specs(name)  # an unknown name is bad input
    from .precompute import preset_sizes

    rows = preset_sizes(args.preset)
    text = "\n".join(f"{r.name:<14} {r.specs:>4} specs {format_size(r.bytes):>10}  {r.description}" for r in rows)
    _emit(args, [r.to_json() for r in rows], text)
    return 0


def cmd_precompute(args: argparse.Namespace) -> int:
    if args.list_presets:
        return _list_presets(args)
    specs = _requested_specs(args)  # every SPEC and config checked before torch is imported
    if not specs:
        raise UsageError("nothing to precompute: give --preset NAME, --spec SPEC or --config FILE "
                         f"(presets: {', '.join(PRESETS)})")
    from .precompute import describe, precompute

    store = _open_store(args, writable=True)
    progress = _progress(args, len(specs), describe, lines=True)
    result = precompute(store, specs, jobs=args.jobs, progress=progress)
    for line in result.failed:
        print(f"{PROG}: failed: {printable(line, 1000)}", file=sys.stderr)
    _emit(args, result.to_json(),
          f"generated {result.generated}, already present {result.present}"
          + (f", failed {len(result.failed)}" if result.failed else "")
          + f"; {format_size(result.bytes)} in {result.seconds:.2f} s ({store.directory})")
    return 1 if result.failed else 0


# ---------------------------------------------------------------- ls / stats / info
def cmd_ls(args: argparse.Namespace) -> int:
    from . import maintenance
    store = _open_store(args)
    rows = [entry.to_json(arrays=False) for entry in maintenance.list_entries(store)]
    status = 1 if any("problem" in r for r in rows) else 0
    if args.json:
        _emit(args, rows, None)
        return status
    table = [("KEY", "KIND", "BYTES", "STORED", "FIELDS")] + [
        (_short(r["key"]), r["kind"], format_size(r["bytes"]) if "bytes" in r else "-", _when(r["stored_at"]),
         r.get("short_spec", "").partition(":")[2] or printable(r.get("problem", ""), 200))
        for r in rows
    ]
    if rows:
        key_width, kind_width = (max(len(row[i]) for row in table) for i in (0, 1))
        for key, kind, size, when, fields in table:
            print(f"{key:<{key_width}}  {kind:<{kind_width}}  {size:>10}  {when:<19}  {fields}")
    return status


def cmd_stats(args: argparse.Namespace) -> int:
    from . import maintenance
    data = maintenance.store_stats(_open_store(args)).to_json()
    versions = data["spec_format_versions"]
    _emit(args, data, "\n".join([
        f"directory       {data['directory']}",
        f"entries         {data['entries']}" + (
            f" ({', '.join(f'{k} {n}' for k, n in data['kinds'].items())})" if data["kinds"] else ""),
        f"bytes on disk   {format_size(data['bytes'])}",
        f"disk limit      {format_size(data['disk_size_limit'])}",
        f"format version  envelope {data['format_version']}, dilated {versions['dilated']}, sparse {versions['sparse']}",
    ]))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    if ":" in args.key:  # a SPEC: bad input is reported before anything is opened
        try:
            parse_spec(args.key)
        except SpecError as error:
            raise UsageError(str(error)) from None
    from . import maintenance

    store = _open_store(args)
    try:
        key = maintenance.resolve_key(store, args.key)
    except (SpecError, maintenance.AmbiguousKey) as error:
        raise UsageError(str(error)) from None
    entry = None if key is None else maintenance.entry_info(store, key)
    if entry is None:
        print(f"{PROG}: no pattern stored under {args.key!r} in {store.directory}", file=sys.stderr)
        return 1
    row = entry.to_json()
    if args.json:
        _emit(args, row, None)
    elif "problem" in row:
        print(f"{printable(key)}\n  {printable(row['problem'], 1000)} (run 'patternstore verify --repair')")
    else:
        lines = [printable(key), f"  spec    {row['spec_text']}"]
        lines += [f"          {name} = {format_value(value)}" for name, value in row["spec"].items() if name != "kind"]
        lines += [f"  array   {name}: {a['dtype']} {a['shape']}" for name, a in row["arrays"].items()]
        lines += [f"  bytes   {format_size(row['bytes'])} in arrays, {format_size(row['stored_bytes'])} stored",
                  f"  stored  {_when(row['stored_at'])}"]
        print("\n".join(lines))
    return 1 if "problem" in row else 0


# ---------------------------------------------------------------- verify
def cmd_verify(args: argparse.Namespace) -> int:
    from . import maintenance
    store = _open_store(args, writable=args.repair, repair=args.repair)
    total = len(store.stored_keys())
    result = maintenance.verify(store, full=args.full, sample=args.sample, repair=args.repair,
                                progress=_progress(args, total, _short, lines=False))
    if args.json:
        _emit(args, result.to_json(), None)
    else:
        for p in result.problems:
            print(printable(f"{p.key}: {p.problem}" + (f" -> {p.repair}" if p.repair else ""), 2000))
        for o in result.orphans:
            print(printable(f"{o.path}: orphan file of {o.bytes} bytes, no entry refers to it"
                            + (f" -> {o.repair}" if o.repair else ""), 2000))
        found = bool(result.problems or result.orphans)
        _note(args, f"verified {result.entries} entries ({result.compared} compared with a fresh generation): "
                    f"{len(result.problems)} problem(s), {len(result.orphans)} orphan file(s)"
                    + (", repaired" if args.repair and found and result.ok else ""))
    return 0 if result.ok else 1


# ---------------------------------------------------------------- clear / export / import
def cmd_clear(args: argparse.Namespace) -> int:
    from . import maintenance
    store = _open_store(args, writable=True, repair=True)
    count = len(store.stored_keys())
    if not args.yes:
        if not sys.stdin.isatty():
            raise UsageError(f"refusing to clear {count} patterns in {store.directory} without confirmation: pass --yes")
        answer = input(f"Delete all {count} patterns ({format_size(store.disk.volume())}) in {store.directory}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing cleared", file=sys.stderr)
            return 1
    count = maintenance.clear(store)
    _emit(args, {"cleared": count, "directory": str(store.directory)}, f"cleared {count} patterns from {store.directory}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from . import maintenance
    if not args.file.parent.is_dir():
        raise UsageError(f"export: {args.file.parent} is not a directory")
    store = _open_store(args)
    try:
        result = maintenance.export(store, args.file)
    except OSError as error:
        raise (WorkFailed if disk_failed(error) else UsageError)(
            f"export: cannot write {args.file}: {error.strerror}; nothing written") from None
    for line in result.skipped:
        print(f"{PROG}: skipped corrupt entry {printable(line, 1000)} (run 'patternstore verify --repair')",
              file=sys.stderr)
    _emit(args, result.to_json(), f"exported {result.exported} patterns ({format_size(result.bytes)}) to {args.file}")
    return 1 if result.skipped else 0


def cmd_import(args: argparse.Namespace) -> int:
    from . import maintenance
    from .bundle import BundleError, read_bundle
    try:
        entries = read_bundle(args.file, trust=args.trust)  # every entry verified before the store is opened
    except FileNotFoundError:
        raise UsageError(f"import: {args.file}: no such file") from None
    except OSError as error:
        raise UsageError(f"import: cannot read {args.file}: {error.strerror}") from None
    except BundleError as error:
        raise UsageError(f"import: {args.file}: {error}; nothing imported") from None
    store = _open_store(args, writable=True)
    result = maintenance.import_entries(store, entries)
    for key in result.failed:
        print(f"{PROG}: failed: could not write {printable(key, 80)} to {store.directory}", file=sys.stderr)
    _emit(args, result.to_json(), f"imported {result.imported}, already present {result.present} ({store.directory})")
    return 1 if result.failed else 0


# ---------------------------------------------------------------- argument parsing
def _directory(text: str) -> Path:
    if not text:
        raise argparse.ArgumentTypeError("'' names no directory (it would be the current directory); "
                                         "give the store directory")
    return Path(text)


def _size(text: str) -> int:
    try:
        return parse_size("SIZE", text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


def _global_options(parser: argparse.ArgumentParser, defaults: dict[str, Any] | None) -> None:
    """--dir, -q, --json, --max-generation-bytes. They work before or after the command: on each
    command they default to SUPPRESS (``defaults=None``), so an option given
    before the command is not overwritten by the command's own default."""
    def default(name: str) -> Any:
        return argparse.SUPPRESS if defaults is None else defaults[name]

    parser.add_argument("--dir", type=_directory, default=default("dir"), metavar="DIR",
                        help="store directory (default: $PATTERNSTORE_DIR, else the user cache dir)")
    parser.add_argument("-q", "--quiet", action="store_true", default=default("quiet"),
                        help="no progress or notes on stderr")
    parser.add_argument("--json", action="store_true", default=default("json"),
                        help="machine-readable output on stdout")
    parser.add_argument("--max-generation-bytes", type=_size, default=default("max_generation_bytes"),
                        metavar="SIZE", help="refuse to generate a pattern estimated to allocate more than SIZE "
                        f"(4294967296, 16GiB; default: ${MAX_GENERATION_BYTES_ENV}, else 4GiB)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Seed, inspect, verify and ship a store of attention index patterns.",
        epilog=GRAMMAR + "\n\nexit status: 0 ok; 1 problems found or work failed; 2 bad input (nothing written); "
               "130 interrupted; 143 terminated",
    )
    _global_options(parser, defaults={"dir": None, "quiet": False, "json": False, "max_generation_bytes": None})
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
    import_ = command("import", cmd_import, "verify every entry of a bundle (regenerated from its spec and "
                      "compared byte for byte), then store them all (or none)")
    import_.add_argument("file", type=Path, metavar="FILE")
    import_.add_argument("--trust", action="store_true",
                         help="skip the regeneration (format, checksums and keys are still checked): trusts that "
                              "each entry's arrays are what its spec generates, i.e. whoever wrote the bundle "
                              "and the way it came (checksums are unkeyed: anyone can reseal an edited entry)")
    return parser


def _show_warning(message: Warning | str, *_: Any, **__: Any) -> None:
    """Warnings (e.g. a store directory on NFS) as one line, without source."""
    print(f"{PROG}: warning: {printable(str(message).splitlines()[0], 2000)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        with warnings.catch_warnings(), sigterm_raises():  # restores showwarning when main returns
            warnings.showwarning = _show_warning
            args = parser.parse_args(argv)
            try:  # a bad setting is bad input; the option reaches worker processes through the environment
                limit = args.max_generation_bytes or max_generation_bytes()
            except ValueError as error:
                raise UsageError(str(error)) from None
            with generation_limit(limit):
                return args.run(args)
    except UsageError as error:
        print(f"{PROG}: error: {printable(' '.join(str(error).splitlines()), 2000)}", file=sys.stderr)
        return 2
    except (WorkFailed, SpecTooLarge) as error:  # SpecTooLarge here: verify's fresh generation of a stored entry
        print(f"{PROG}: error: {printable(' '.join(str(error).splitlines()), 2000)}", file=sys.stderr)
        return 1
    except SystemExit as exit:  # --help and --version print, then exit 0
        return exit.code if isinstance(exit.code, int) else 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{PROG}: terminated", file=sys.stderr)
        return 143
    except BrokenPipeError:  # e.g. `patternstore ls | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1
