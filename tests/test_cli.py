"""The ``patternstore`` command line, run as a real process against temporary
store directories (each child imports the worktree's code through PYTHONPATH).

References are independent of the command line: ``generate`` for contents and
sizes, ``PatternStore`` / ``diskcache`` for what is on disk, ``msgpack`` for
the bundle file.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import diskcache
import msgpack
import pytest
import torch
from hypothesis import given, settings

from patternstore.cli import main
from patternstore.codec import ENVELOPE_VERSION, decode, encode
from patternstore.generate import generate
from patternstore.pattern import Pattern
from patternstore.presets import PRESETS
from patternstore.specs import SparseSpec
from patternstore.spectext import EXAMPLES, format_spec, parse_spec
from patternstore.store import PatternStore
from strategies import any_spec

REPO = Path(__file__).resolve().parents[1]

# Tiny specs of four kinds, through both sources: --spec and a TOML --config.
SPEC_TEXTS = [
    "dilated:segment_lengths=64,128:dilation_rates=1,2:num_heads=4",
    "bigbird:seq_len=2048:block_size=64:num_heads=2:num_random_blocks=2:seed=7",
    "local:seq_len=1024:block_size=128",
]
CONFIG = """\
specs = [
  "dilated:segment_lengths=100:dilation_rates=3:num_heads=2:scheme=grouped",
  {kind = "fixed", seq_len = 4096, block_size = 128, num_local_blocks = 4, num_global_blocks = 2},
]
"""
CONFIG_SPECS = [
    parse_spec("dilated:segment_lengths=100:dilation_rates=3:num_heads=2:scheme=grouped"),
    parse_spec("fixed:seq_len=4096:block_size=128:num_local_blocks=4:num_global_blocks=2"),
]
ALL_SPECS = [parse_spec(text) for text in SPEC_TEXTS] + CONFIG_SPECS


def _env(directory: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "PATTERNSTORE_DIR": str(directory)}


def cli(directory: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m patternstore ARGS`` with PATTERNSTORE_DIR=directory, stdin not a terminal."""
    return subprocess.run(
        [sys.executable, "-m", "patternstore", *args], env=_env(directory), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=300,
    )


def in_process(capsys, *args: str) -> tuple[int, str, str]:
    """``main(args)`` in this process (no interpreter start): (status, stdout, stderr)."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def stored_keys(directory: Path) -> list[str]:
    if not directory.exists():
        return []
    store = PatternStore(directory, max_entries=0)
    try:
        return sorted(store.disk.keys())
    finally:
        store.disk.close()


@pytest.fixture(scope="module")
def seeded(tmp_path_factory) -> tuple[Path, dict, float, float]:
    """A store seeded once by ``precompute`` in two processes; tests that
    change it work on a copy. Returns (directory, summary, start, end)."""
    root = tmp_path_factory.mktemp("cli")
    config = root / "specs.toml"
    config.write_text(CONFIG)
    directory = root / "seeded"
    start = time.time()
    args = [a for text in SPEC_TEXTS for a in ("--spec", text)]
    done = cli(directory, "--json", "precompute", *args, "--config", str(config), "--jobs", "2")
    assert done.returncode == 0, done.stderr
    return directory, json.loads(done.stdout), start, time.time()


def copy_of(seeded, tmp_path: Path) -> Path:
    target = tmp_path / "store"
    shutil.copytree(seeded[0], target)
    return target


# ---------------------------------------------------------------- precompute, stats
def test_precompute_then_stats_and_a_fresh_process_generates_nothing(seeded, tmp_path):
    directory, summary, _, _ = seeded
    # Two worker processes, one generation per key, every byte counted.
    assert summary["generated"] == len(ALL_SPECS) and summary["present"] == 0 and summary["failed"] == 0
    assert summary["bytes"] == sum(generate(spec).nbytes for spec in ALL_SPECS)
    assert Path(summary["directory"]) == directory

    stats = json.loads(cli(directory, "stats", "--json").stdout)
    assert stats["entries"] == len(ALL_SPECS)
    assert Path(stats["directory"]) == directory and stats["format_version"] == ENVELOPE_VERSION
    assert stats["kinds"] == {"bigbird": 1, "dilated": 2, "fixed": 1, "local": 1}
    assert stats["disk_size_limit"] == 8 << 30 and stats["bytes"] > summary["bytes"]

    # A fresh Python process gets every pattern from disk: zero generations, equal arrays.
    script = (
        "import json, sys\n"
        "from patternstore.generate import generate\n"
        "from patternstore.spectext import parse_spec\n"
        "from patternstore.store import PatternStore\n"
        "store = PatternStore(sys.argv[1])\n"
        "specs = [parse_spec(t) for t in sys.argv[2:]]\n"
        "same = all(store.get(s).equals(generate(s)) for s in specs)\n"
        "print(json.dumps({'same': same, **store.stats()}))\n"
    )
    texts = [format_spec(spec) for spec in ALL_SPECS]
    child = subprocess.run([sys.executable, "-c", script, str(directory), *texts], env=_env(tmp_path / "unused"),
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr
    fresh = json.loads(child.stdout)
    assert fresh["same"] and fresh["generations"] == 0 and fresh["disk_hits"] == len(ALL_SPECS)

    # Again, plus the default preset, on a copy with one entry damaged: what is
    # missing or damaged is generated, the rest is read.
    again = copy_of(seeded, tmp_path)
    store = PatternStore(again, max_entries=0)
    store.disk.write(ALL_SPECS[1].key, b"damaged")
    store.disk.close()
    done = cli(again, "precompute", "--preset", "default", *[a for t in SPEC_TEXTS for a in ("--spec", t)])
    assert done.returncode == 0, done.stderr
    default = PRESETS["default"].specs
    assert f"generated {len(default) + 1}, already present {len(SPEC_TEXTS) - 1}" in done.stdout
    lines = re.findall(r"^\[\d+/\d+\] (generated|present) ", done.stderr, re.M)  # plain lines: no terminal
    assert lines.count("generated") == len(default) + 1 and lines.count("present") == len(SPEC_TEXTS) - 1
    assert stored_keys(again) == sorted({s.key for s in ALL_SPECS} | {s.key for s in default})


# ---------------------------------------------------------------- ls, info
def _ls_without_times(text: str) -> list[str]:
    return [re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", "<time>", line) for line in text.splitlines()]


def test_ls_and_info(seeded, capsys):
    directory, _, start, end = seeded
    rows = json.loads(cli(directory, "ls", "--json").stdout)
    assert [r["key"] for r in rows] == sorted(s.key for s in ALL_SPECS)
    by_key = {s.key: s for s in ALL_SPECS}
    for row in rows:
        spec = by_key[row["key"]]
        assert row["kind"] == spec.kind and row["bytes"] == generate(spec).nbytes
        assert parse_spec(row["spec_text"]).key == spec.key
        assert start - 1 <= row["stored_at"] <= end + 1

    lines = cli(directory, "ls").stdout.splitlines()
    assert lines[0].split() == ["KEY", "KIND", "BYTES", "STORED", "FIELDS"] and len(lines) == 1 + len(ALL_SPECS)
    dilated = ALL_SPECS[0]
    line = next(l for l in lines if l.startswith(dilated.key[:23]))
    assert "segment_lengths=64,128:dilation_rates=1,2:num_heads=4" in line

    # info by the short key that ls prints, and (in this process) by SPEC: the same answer.
    by_prefix = cli(directory, "info", line.split()[0], "--json")
    assert by_prefix.returncode == 0
    info = json.loads(by_prefix.stdout)
    code, out, _ = in_process(capsys, "--dir", str(directory), "--json", "info", SPEC_TEXTS[0])
    assert code == 0 and json.loads(out) == info
    assert info["key"] == dilated.key and info["spec"] == json.loads(json.dumps(dilated.to_dict()))
    assert info["arrays"] == {n: {"dtype": "int32", "shape": list(t.shape)} for n, t in generate(dilated).arrays.items()}

    code, _, err = in_process(capsys, "--dir", str(directory), "info", "dilated-v1-0000")
    assert code == 1 and "no pattern stored under 'dilated-v1-0000'" in err


# ---------------------------------------------------------------- verify
def test_verify_finds_corruption_and_repair_fixes_it(seeded, tmp_path):
    directory = copy_of(seeded, tmp_path)
    dilated, bigbird, local = (s.key for s in ALL_SPECS[:3])
    grouped = CONFIG_SPECS[0].key
    store = PatternStore(directory, max_entries=0)
    flipped = bytearray(store.disk.read(dilated))
    groups = generate(ALL_SPECS[0])["groups"].numpy().tobytes()
    flipped[bytes(flipped).rindex(groups) + len(groups) - 1] ^= 0xFF  # inside the groups array: checksum mismatch, spec still readable
    store.disk.write(dilated, bytes(flipped))
    store.disk.write(bigbird, b"not an envelope")  # nothing left to regenerate from
    wrong = {name: t.clone() for name, t in generate(ALL_SPECS[2]).arrays.items()}
    wrong["kv_indices"][0] += 1
    store.disk.write(local, encode(Pattern(ALL_SPECS[2], wrong)))  # valid envelope, wrong arrays
    store.disk.close()
    planted = diskcache.Cache(str(directory))
    planted.set(grouped, {"a pickled": "value"})  # diskcache pickles a dict: must never be loaded
    planted.close()

    found = cli(directory, "verify")
    assert found.returncode == 1
    problems = dict(line.split(": ", 1) for line in found.stdout.splitlines())
    assert problems == {
        dilated: "checksum mismatch",
        bigbird: problems[bigbird],
        local: "arrays differ from a fresh generation",
        grouped: problems[grouped],
    }
    assert "not a format-2 value" in problems[bigbird] and "refused unread" in problems[grouped]

    repaired = cli(directory, "--json", "verify", "--repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    outcome = {p["key"]: p["repair"] for p in json.loads(repaired.stdout)["problems"]}
    assert outcome[dilated] == outcome[local] == "regenerated"
    assert outcome[bigbird].startswith("dropped") and outcome[grouped].startswith("dropped")

    clean = cli(directory, "verify", "--full")
    assert clean.returncode == 0 and clean.stdout == ""
    assert "verified 3 entries (3 compared with a fresh generation): 0 problem(s), 0 orphan file(s)" in clean.stderr
    store = PatternStore(directory, max_entries=0)
    assert sorted(store.disk.keys()) == sorted([dilated, local, CONFIG_SPECS[1].key])
    for spec in (ALL_SPECS[0], ALL_SPECS[2]):
        assert decode(store.disk.read(spec.key), spec.key).equals(generate(spec))
    store.disk.close()


def test_verify_finds_orphan_value_files_and_repair_removes_only_those(seeded, tmp_path):
    """A writer killed between writing its value file and inserting the row
    leaves a file no entry refers to: an hour later it is an orphan."""
    directory = copy_of(seeded, tmp_path)
    store = PatternStore(directory, max_entries=0)
    store.get(SparseSpec("bigbird", seq_len=16384, block_size=32, num_heads=4, different_layout_per_head=True))
    referenced = sorted(directory.rglob("*.val"))
    assert referenced  # values over 32 KiB live in files
    hour_ago = time.time() - 3700
    old, young = directory / "ff" / "ee" / "0123abcd.val", directory / "ff" / "ee" / "4567cdef.val"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"x" * 1000)
    young.write_bytes(b"y" * 10)
    for path in referenced + [old]:
        os.utime(path, (hour_ago, hour_ago))
    assert store.disk.orphans() == [old]
    store.disk.close()

    found = cli(directory, "--json", "verify")
    assert found.returncode == 1
    assert json.loads(found.stdout)["orphans"] == [{"path": str(old), "bytes": 1000}]
    repaired = cli(directory, "verify", "--repair")
    assert repaired.returncode == 0 and repaired.stdout == f"{old}: orphan file of 1000 bytes, no entry refers to it -> removed\n"
    assert not old.exists() and young.exists() and all(path.exists() for path in referenced)
    clean = cli(directory, "verify", "--full")
    assert clean.returncode == 0 and "0 problem(s), 0 orphan file(s)" in clean.stderr


# ---------------------------------------------------------------- export, import
def test_export_then_import_gives_the_same_store(seeded, tmp_path, capsys):
    source = seeded[0]
    bundle = tmp_path / "patterns.bundle"
    exported = cli(source, "export", str(bundle))
    assert exported.returncode == 0 and f"exported {len(ALL_SPECS)} patterns" in exported.stdout

    # The file: one msgpack map, a format marker, [key, envelope] pairs that decode.
    data = msgpack.unpackb(bundle.read_bytes(), raw=False)
    assert data["format"] == "patternstore-bundle" and data["version"] == 1
    assert sorted(k for k, _ in data["entries"]) == sorted(s.key for s in ALL_SPECS)
    assert all(decode(value, key).key == key for key, value in data["entries"])

    target = tmp_path / "target"
    imported = cli(target, "import", str(bundle))
    assert imported.returncode == 0 and f"imported {len(ALL_SPECS)}, already present 0" in imported.stdout
    listings = [in_process(capsys, "--dir", str(d), "ls")[1] for d in (source, target)]
    assert len(listings[0].splitlines()) == 1 + len(ALL_SPECS)
    assert _ls_without_times(listings[0]) == _ls_without_times(listings[1])
    code, out, _ = in_process(capsys, "--dir", str(target), "--json", "import", str(bundle))
    assert code == 0 and json.loads(out)["imported"] == 0 and json.loads(out)["present"] == len(ALL_SPECS)

    # One damaged entry (the last): import refuses the whole bundle, writes nothing.
    key, value = data["entries"][-1]
    damaged = bytearray(value)
    damaged[len(damaged) // 2] ^= 0xFF
    data["entries"][-1] = [key, bytes(damaged)]
    bad = tmp_path / "damaged.bundle"
    bad.write_bytes(msgpack.packb(data, use_bin_type=True))
    empty = tmp_path / "empty"
    code, _, err = in_process(capsys, "--dir", str(empty), "import", str(bad))
    assert code == 2 and err.count("\n") == 1 and f"entry {len(ALL_SPECS) - 1} ({key}) fails verification" in err
    assert "nothing imported" in err and stored_keys(empty) == []


# ---------------------------------------------------------------- clear, terminals
def test_clear_needs_yes_without_a_terminal(seeded, tmp_path):
    directory = copy_of(seeded, tmp_path)
    refused = cli(directory, "clear")
    assert refused.returncode == 2 and "pass --yes" in refused.stderr and refused.stderr.count("\n") == 1
    assert len(stored_keys(directory)) == len(ALL_SPECS)
    cleared = cli(directory, "clear", "--yes")
    assert cleared.returncode == 0 and f"cleared {len(ALL_SPECS)} patterns" in cleared.stdout
    assert stored_keys(directory) == []


def _in_terminal(directory: Path, args: list[str], answer: str = "") -> tuple[int, str]:
    """Run the command line with stdin, stdout and stderr on a pseudo-terminal."""
    leader, follower = pty.openpty()
    child = subprocess.Popen([sys.executable, "-m", "patternstore", *args], env=_env(directory),
                             stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    if answer:
        os.write(leader, answer.encode())
    output = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 120)
        try:
            chunk = os.read(leader, 4096) if ready else b""
        except OSError:  # EIO: the child closed the terminal
            chunk = b""
        if not chunk:
            break
        output += chunk
    os.close(leader)
    return child.wait(timeout=60), output.decode(errors="replace")


def test_terminal_progress_bar_and_confirmation(tmp_path):
    directory = tmp_path / "tty"
    code, output = _in_terminal(directory, ["precompute", *[a for t in SPEC_TEXTS for a in ("--spec", t)]])
    assert code == 0 and f"\r[{'#' * 20}] 3/3 " in output and "[1/3]" not in output

    code, output = _in_terminal(directory, ["clear"], answer="n\n")
    assert code == 1 and "Delete all 3 patterns" in output and len(stored_keys(directory)) == 3
    code, output = _in_terminal(directory, ["clear"], answer="y\n")
    assert code == 0 and "cleared 3 patterns" in output and stored_keys(directory) == []


# ---------------------------------------------------------------- bad input
GOOD = SPEC_TEXTS[0]
BAD_INPUT = {
    "malformed SPEC": (["precompute", "--spec", "dilated"], "malformed SPEC 'dilated': expected KIND:FIELD=VALUE"),
    "unknown kind": (["precompute", "--spec", "sliding:seq_len=8"], "unknown kind 'sliding'; allowed kinds: dilated, dense"),
    "unknown field": (["precompute", "--spec", GOOD + ":window=3"],
                      "unknown field 'window' for kind 'dilated'; allowed fields: segment_lengths, dilation_rates"),
    "bad value": (["precompute", "--spec", "local:seq_len=lots:block_size=128"], "seq_len must be an int in [1, 2147483647], got str 'lots'"),
    "int past msgpack": (["precompute", "--spec", "local:seq_len=18446744073709551616:block_size=128"],
                         "seq_len must be an int in [1, 2147483647], got 18446744073709551616"),
    "seed past int64": (["precompute", "--spec", "bigbird:seq_len=1024:block_size=64:seed=9223372036854775808"],
                        "seed must be an int in [0, 9223372036854775807]"),
    "random past the row": (["precompute", "--spec", "bigbird:seq_len=1024:block_size=64:num_random_blocks=1000000"],
                            "num_random_blocks must be <= the number of blocks (16)"),
    "bad choice": (["precompute", "--spec", "local:seq_len=64:block_size=8:attention=both"],
                   "attention must be one of 'bidirectional', 'unidirectional'"),
    "missing field": (["precompute", "--spec", "dilated:segment_lengths=8:dilation_rates=1"],
                      "kind 'dilated' needs field 'num_heads'"),
    "good then bad": (["precompute", "--spec", GOOD, "--spec", "local:seq_len=64:block_size=3"],
                      "block_size must be a power of two"),
    "unknown preset": (["precompute", "--preset", "gpt5"], "unknown preset 'gpt5'; presets: default, longnet"),
    "missing config": (["precompute", "--spec", GOOD, "--config", "{tmp}/none.toml"], "none.toml: no such file"),
    "unreadable TOML": (["precompute", "--config", "{tmp}/broken.toml"], "broken.toml: not valid TOML"),
    "bad TOML spec": (["precompute", "--config", "{tmp}/badspec.toml"],
                      "badspec.toml: specs[1]: unknown field 'heads' for kind 'dilated'"),
    "TOML key": (["precompute", "--config", "{tmp}/badkey.toml"], "unknown key 'spec'; allowed: presets, specs"),
    "nothing to do": (["precompute"], "nothing to precompute: give --preset NAME, --spec SPEC or --config FILE"),
    "jobs": (["precompute", "--jobs", "0", "--spec", GOOD], "--jobs/-j: must be an integer >= 1, got '0'"),
    "unknown command": (["compact"], "invalid choice: 'compact'"),
    "missing bundle": (["import", "{tmp}/none.bundle"], "none.bundle: no such file"),
    "not a bundle": (["import", "{tmp}/broken.toml"], "broken.toml: not a patternstore bundle"),
    "directory is a file": (["--dir", "{tmp}/broken.toml", "precompute", "--spec", GOOD],
                            "(the store directory must be a writable directory)"),
    "bad SPEC in info": (["info", "dilated:num_heads=0"], "bad SPEC 'dilated:num_heads=0'"),
}


@pytest.fixture
def bad_files(tmp_path) -> Path:
    (tmp_path / "broken.toml").write_text("specs = [\n")
    (tmp_path / "badspec.toml").write_text(
        f'specs = ["{GOOD}", {{kind = "dilated", segment_lengths = 8, dilation_rates = 1, heads = 2}}]\n'
    )
    (tmp_path / "badkey.toml").write_text(f'spec = ["{GOOD}"]\n')
    return tmp_path


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, bad_files, capsys):
    args, message = BAD_INPUT[case]
    directory = bad_files / "store"
    args = ["--dir", str(directory), *(a.replace("{tmp}", str(bad_files)) for a in args)]
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("patternstore: error: ")
    assert message.replace("{tmp}", str(bad_files)) in err
    assert stored_keys(directory) == []


def test_bad_input_in_a_real_process_is_one_line_not_a_traceback(tmp_path):
    (tmp_path / "broken.toml").write_text("[[specs]\n")
    done = cli(tmp_path / "store", "precompute", "--spec", GOOD, "--config", str(tmp_path / "broken.toml"))
    assert done.returncode == 2 and done.stdout == "" and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and "broken.toml: not valid TOML" in done.stderr
    assert stored_keys(tmp_path / "store") == []


# ---------------------------------------------------------------- entry points, help, presets
def test_module_and_main_function_and_help(capsys):
    done = subprocess.run([sys.executable, "-m", "patternstore", "precompute", "--help"], env=_env(Path("/nonexistent")),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "SPEC grammar" in done.stdout
    assert all(example in done.stdout for example in EXAMPLES) and "--config FILE (TOML" in done.stdout
    assert main(["--help"]) == 0
    assert "KIND:FIELD=VALUE:FIELD=VALUE" in capsys.readouterr().out


def test_list_presets(capsys):
    assert main(["--json", "precompute", "--list-presets", "--preset", "default"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    default = PRESETS["default"].specs
    assert row["name"] == "default" and row["specs"] == len(default)
    assert row["bytes"] == sum(generate(spec).nbytes for spec in default)
    assert {"default", "longnet", "dilated-small", "sparse"} <= set(PRESETS)
    assert any(s.kind == "dilated" and s.segment_lengths == (2048, 4096, 8192, 16384, 32768)
               and s.dilation_rates == (1, 2, 4, 6, 12) and s.num_heads == 16 for s in PRESETS["longnet"].specs)
    assert {s.kind for s in PRESETS["sparse"].specs} == {"bigbird", "bslongformer", "fixed", "local"}


# ---------------------------------------------------------------- the grammar
@settings(max_examples=300, deadline=None)
@given(any_spec)
def test_spec_text_round_trips(spec):
    assert parse_spec(format_spec(spec)).key == spec.key
    assert parse_spec(format_spec(spec, defaults=False)).key == spec.key


def test_list_fields_are_tuples_even_with_one_item():
    spec = parse_spec("dilated:segment_lengths=16:dilation_rates=2:num_heads=2")
    assert spec.segment_lengths == (16,) and spec.dilation_rates == (2,)
    sparse = parse_spec("bslongformer:seq_len=1024:block_size=64:global_block_indices=3:global_block_end_indices=5")
    assert sparse.params["global_block_indices"] == (3,) and sparse.params["global_block_end_indices"] == (5,)
    assert parse_spec("fixed:seq_len=512:block_size=64:different_layout_per_head=TRUE").params["different_layout_per_head"]


# ---------------------------------------------------------------- start-up without torch
NO_TORCH_SCRIPT = """
import json, runpy, sys
sys.argv = ["patternstore", *json.loads(sys.argv[1])]
try:
    runpy.run_module("patternstore", run_name="__main__")
except SystemExit as done:
    code = done.code
print("RESULT", json.dumps([code, "torch" in sys.modules]), file=sys.stderr)
"""
ARGUMENT_ERRORS = [
    ["--help"], ["precompute", "--help"], ["import", "--help"], [], ["compact"], ["--dir", "", "ls"],
    ["precompute"], ["precompute", "--spec", "dilated"], ["precompute", "--preset", "gpt5"],
    ["precompute", "--spec", "local:seq_len=18446744073709551616:block_size=128"],
    ["precompute", "--spec", "bigbird:seq_len=256:block_size=16:num_random_blocks=99"],
    ["precompute", "--config", "{tmp}/broken.toml"], ["precompute", "--jobs", "0", "--spec", GOOD],
    ["info", "dilated:num_heads=0"],
]


@pytest.mark.parametrize("args", ARGUMENT_ERRORS, ids=lambda args: " ".join(args) or "no arguments")
def test_help_and_argument_errors_never_import_torch(args, bad_files):
    args = [a.replace("{tmp}", str(bad_files)) for a in args]
    done = subprocess.run([sys.executable, "-c", NO_TORCH_SCRIPT, json.dumps(args)], env=_env(bad_files / "store"),
                          capture_output=True, text=True, timeout=120)
    code, imported_torch = json.loads(done.stderr.rsplit("RESULT ", 1)[1])
    assert code == (0 if "--help" in args else 2) and not imported_torch
    assert "Traceback" not in done.stderr and not (bad_files / "store").exists()


# ---------------------------------------------------------------- read-only commands write nothing
def _tree(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` and ``root`` itself: its bytes and size
    (files), its mtime (all), so a created, removed or rewritten file shows."""
    tree = {}
    for path in [root, *sorted(root.rglob("*"))]:
        info = path.stat()
        content = path.read_bytes() if path.is_file() else None
        tree[str(path.relative_to(root))] = (content, info.st_size if content is not None else None, info.st_mtime_ns)
    return tree


READ_ONLY = {
    "ls": ["ls"], "info": ["info", "{key}"], "stats": ["--json", "stats"], "verify": ["verify", "--full"],
    "export": ["export", "{out}/all.bundle"],
}


@pytest.mark.parametrize("command", sorted(READ_ONLY))
def test_read_only_commands_on_a_missing_directory_are_an_error_and_create_nothing(command, tmp_path, capsys,
                                                                                    monkeypatch):
    args = [a.format(key=ALL_SPECS[0].key, out=tmp_path) for a in READ_ONLY[command]]
    missing = tmp_path / "typo" / "store"
    code, out, err = in_process(capsys, "--dir", str(missing), *args)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert f"no pattern store in {missing}: no such directory" in err and not (tmp_path / "typo").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = in_process(capsys, "--dir", str(empty), *args)
    assert code == 2 and f"no pattern store in {empty}: it holds no cache.db" in err and not any(empty.iterdir())
    monkeypatch.chdir(empty)  # --dir '' would have made the current directory a store
    code, _, err = in_process(capsys, "--dir", "", *args)
    assert code == 2 and "argument --dir: '' names no directory" in err and not any(empty.iterdir())


@pytest.mark.parametrize("command", sorted(READ_ONLY))
def test_read_only_commands_on_a_store_change_no_byte_and_no_mtime(command, seeded, tmp_path, capsys):
    directory = copy_of(seeded, tmp_path)
    owner = PatternStore(directory, max_entries=0, disk_size_limit=3 << 20)  # the owner's limit, not the default
    owner.disk.close()
    del owner
    before = _tree(directory)
    args = [a.format(key=ALL_SPECS[0].key, out=tmp_path) for a in READ_ONLY[command]]
    code, out, err = in_process(capsys, "--dir", str(directory), *args)
    assert code == 0, err
    if command == "stats":
        assert json.loads(out)["disk_size_limit"] == 3 << 20
    assert _tree(directory) == before


def test_opening_a_store_keeps_its_size_limit_unless_asked(tmp_path):
    PatternStore(tmp_path, disk_size_limit=5 << 20).disk.close()
    assert PatternStore(tmp_path).disk.size_limit == 5 << 20
    assert PatternStore(tmp_path, disk_size_limit=6 << 20).disk.size_limit == 6 << 20
    assert PatternStore(tmp_path / "new").disk.size_limit == 8 << 30


# ---------------------------------------------------------------- import verifies
def test_import_refuses_a_resealed_doctored_entry_unless_trusted(seeded, tmp_path, capsys):
    bundle = tmp_path / "all.bundle"
    assert cli(seeded[0], "export", str(bundle)).returncode == 0
    data = msgpack.unpackb(bundle.read_bytes(), raw=False)
    position = next(i for i, (key, _) in enumerate(data["entries"]) if key == ALL_SPECS[2].key)
    key, value = data["entries"][position]
    wrong = {name: t.clone() for name, t in generate(ALL_SPECS[2]).arrays.items()}
    wrong["kv_indices"][0] += 1  # another layout under the same key, sealed with a valid checksum
    data["entries"][position] = [key, encode(Pattern(ALL_SPECS[2], wrong))]
    doctored = tmp_path / "doctored.bundle"
    doctored.write_bytes(msgpack.packb(data, use_bin_type=True))

    target = tmp_path / "target"
    code, out, err = in_process(capsys, "--dir", str(target), "import", str(doctored))
    assert code == 2 and out == "" and err.count("\n") == 1
    assert f"entry {position} ({key}) differs from a fresh generation of its spec" in err and "nothing imported" in err
    assert not target.exists()  # refused before the store was opened: nothing written

    code, out, err = in_process(capsys, "--dir", str(target), "--json", "import", "--trust", str(doctored))
    assert code == 0 and json.loads(out)["imported"] == len(ALL_SPECS)  # trusted: taken as it is
    store = PatternStore(target, max_entries=0)
    assert torch.equal(store.get(ALL_SPECS[2])["kv_indices"], wrong["kv_indices"])


def test_deepspeed_flags_on_kinds_whose_heads_never_differ_through_the_cli(tmp_path, capsys):
    texts = [f"{kind}:seq_len=256:block_size=16:num_heads=4:different_layout_per_head=true"
             for kind in ("dense", "bslongformer")]
    code, out, err = in_process(capsys, "--dir", str(tmp_path), "--json", "precompute",
                                *[a for t in texts for a in ("--spec", t)])
    assert code == 0 and json.loads(out)["generated"] == 2, err
    for text in texts:
        code, out, _ = in_process(capsys, "--dir", str(tmp_path), "--json", "info", text)
        assert code == 0 and json.loads(out)["arrays"]["kv_num_blocks"]["shape"] == [1, 16]  # one shared layout
