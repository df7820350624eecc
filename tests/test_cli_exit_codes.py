"""Every command's exit status, as the README says it (0 ok; 1 problems
found or the work failed; 2 bad input, one line on stderr, nothing
written), in one table run through ``main`` in this process. The store and
bundle directories are real: a full disk is a small tmpfs mount, a read-only
directory a read-only bind mount (both need root: skipped otherwise, with
that reason). Interrupts (130, 143) are tests/test_cli_signals.py's."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from patternstore.cli import main
from patternstore.cost import MAX_GENERATION_BYTES_ENV
from patternstore.spectext import parse_spec
from patternstore.store import PatternStore

SMALL = "local:seq_len=1024:block_size=16"
BIG = "local:seq_len=65536:block_size=16:num_sliding_window_blocks=64"  # about 1 MiB stored
OTHER_BIG = "local:seq_len=65536:block_size=16:num_sliding_window_blocks=63"
DILATED = "dilated:segment_lengths=64:dilation_rates=2:num_heads=2"

# (command, case, arguments, status). Placeholders: {store} a copy of a store holding SMALL, BIG and
# DILATED; {corrupt} the same with SMALL's value garbage; {empty_store} a store with no entry; {new} a
# directory that does not exist; {file} a file that is no store and no bundle; {bundle} an export of
# {store}; {readonly} a read-only bind mount of a copy of {store}; {full} a 400 KiB tmpfs (a store opens,
# a value does not fit); {tiny} a 40 KiB tmpfs (not even the store's database fits); {tmp} the test's directory.
CASES = [
    ("global", "help", ["--help"], 0),
    ("global", "no command", [], 2),
    ("global", "unknown command", ["compact"], 2),
    ("global", "unknown option", ["--dir", "{store}", "ls", "--long"], 2),
    ("global", "empty --dir", ["--dir", "", "ls"], 2),
    ("global", "bad --max-generation-bytes", ["--max-generation-bytes", "lots", "--dir", "{store}", "ls"], 2),
    ("precompute", "generated", ["--dir", "{new}", "precompute", "--spec", SMALL], 0),
    ("precompute", "already present", ["--dir", "{store}", "precompute", "--spec", SMALL, "--spec", BIG], 0),
    ("precompute", "list presets", ["precompute", "--list-presets", "--preset", "dilated-small"], 0),
    ("precompute", "bad SPEC", ["--dir", "{new}", "precompute", "--spec", "local:seq_len=0:block_size=16"], 2),
    ("precompute", "too large to generate", ["--dir", "{new}", "precompute", "--spec",
                                             "dense:seq_len=2147483647:block_size=1"], 2),
    ("precompute", "over --max-generation-bytes", ["--dir", "{new}", "--max-generation-bytes", "64KiB",
                                                   "precompute", "--spec", SMALL], 2),
    ("precompute", "nothing to precompute", ["--dir", "{new}", "precompute"], 2),
    ("precompute", "directory is a file", ["--dir", "{file}", "precompute", "--spec", SMALL], 2),
    ("precompute", "read-only directory", ["--dir", "{readonly}", "precompute", "--spec", OTHER_BIG], 2),
    ("precompute", "full disk", ["--dir", "{full}/store", "precompute", "--spec", OTHER_BIG], 1),
    ("precompute", "disk too full to open", ["--dir", "{tiny}/store", "precompute", "--spec", SMALL], 1),
    ("ls", "entries", ["--dir", "{store}", "ls"], 0),
    ("ls", "no entries", ["--dir", "{empty_store}", "ls"], 0),
    ("ls", "a corrupt entry", ["--dir", "{corrupt}", "ls"], 1),
    ("ls", "no store", ["--dir", "{new}", "ls"], 2),
    ("stats", "entries", ["--dir", "{store}", "stats"], 0),
    ("stats", "no store", ["--dir", "{new}", "stats"], 2),
    ("info", "a SPEC", ["--dir", "{store}", "info", SMALL], 0),
    ("info", "a key", ["--dir", "{store}", "info", parse_spec(SMALL).key], 0),
    ("info", "not stored", ["--dir", "{store}", "info", "local:seq_len=2048:block_size=16"], 1),
    ("info", "a corrupt entry", ["--dir", "{corrupt}", "info", SMALL], 1),
    ("info", "a prefix of several keys", ["--dir", "{store}", "info", "local-"], 2),
    ("info", "bad SPEC", ["--dir", "{store}", "info", "local:seq_len=0:block_size=16"], 2),
    ("info", "no store", ["--dir", "{new}", "info", SMALL], 2),
    ("verify", "clean", ["--dir", "{store}", "verify", "--full"], 0),
    ("verify", "a corrupt entry", ["--dir", "{corrupt}", "verify"], 1),
    ("verify", "a corrupt entry repaired", ["--dir", "{corrupt}", "verify", "--repair"], 0),
    ("verify", "an entry over the generation limit", ["--dir", "{store}", "--max-generation-bytes", "64KiB",
                                                      "verify", "--full"], 1),
    ("verify", "no store", ["--dir", "{new}", "verify"], 2),
    ("verify", "repair in a read-only directory", ["--dir", "{readonly}", "verify", "--repair"], 2),
    ("clear", "--yes", ["--dir", "{store}", "clear", "--yes"], 0),
    ("clear", "no --yes off a terminal", ["--dir", "{store}", "clear"], 2),
    ("clear", "read-only directory", ["--dir", "{readonly}", "clear", "--yes"], 2),
    ("export", "exported", ["--dir", "{store}", "export", "{tmp}/out.bundle"], 0),
    ("export", "a corrupt entry skipped", ["--dir", "{corrupt}", "export", "{tmp}/out.bundle"], 1),
    ("export", "no such directory for the file", ["--dir", "{store}", "export", "{tmp}/none/out.bundle"], 2),
    ("export", "read-only destination", ["--dir", "{store}", "export", "{readonly}/out.bundle"], 2),
    ("export", "no store", ["--dir", "{new}", "export", "{tmp}/out.bundle"], 2),
    ("export", "full disk", ["--dir", "{store}", "export", "{full}/out.bundle"], 1),
    ("import", "imported", ["--dir", "{new}", "import", "{bundle}"], 0),
    ("import", "already present", ["--dir", "{store}", "import", "{bundle}"], 0),
    ("import", "trusted", ["--dir", "{new}", "import", "--trust", "{bundle}"], 0),
    ("import", "no such file", ["--dir", "{new}", "import", "{tmp}/none.bundle"], 2),
    ("import", "not a bundle", ["--dir", "{new}", "import", "{file}"], 2),
    ("import", "an entry over the generation limit", ["--dir", "{new}", "--max-generation-bytes", "64KiB",
                                                      "import", "{bundle}"], 2),
    ("import", "read-only directory", ["--dir", "{readonly}", "import", "{bundle}"], 2),
    ("import", "full disk", ["--dir", "{full}/store", "import", "{bundle}"], 1),
    ("import", "disk too full to open", ["--dir", "{tiny}/store", "import", "{bundle}"], 1),
]


def test_every_command_has_cases_of_its_statuses():
    from patternstore.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    assert {command for command, *_ in CASES} == commands | {"global"}
    for command in commands:
        statuses = {status for c, _, _, status in CASES if c == command}
        assert {0, 2} <= statuses, command  # each command succeeds and refuses bad input


@pytest.fixture(scope="module")
def seeded(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("exit-codes") / "store"
    assert main(["-q", "--dir", str(directory), "precompute", "--spec", SMALL, "--spec", BIG,
                 "--spec", DILATED]) == 0
    return directory


def _mount(args: list[str], target: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs or a read-only bind mount needs root")
    target.mkdir(exist_ok=True)
    done = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here: {done.stderr.strip()}")


class Places:
    """The placeholders' paths, each made on first use; mounts are undone by ``close``."""

    def __init__(self, tmp: Path, seeded: Path) -> None:
        self.tmp, self.seeded, self.mounts = tmp, seeded, []

    def copy(self, name: str) -> Path:
        target = self.tmp / name
        if not target.exists():
            shutil.copytree(self.seeded, target)
        return target

    def __getitem__(self, name: str) -> str:
        tmp = self.tmp
        if name == "tmp":
            return str(tmp)
        if name in ("store", "new"):
            return str(self.copy("store") if name == "store" else tmp / "new")
        if name == "corrupt":
            directory = self.copy("corrupt")
            store = PatternStore(directory, max_entries=0)
            store.disk.write(parse_spec(SMALL).key, b"garbage, not a value")
            store.disk.close()
            return str(directory)
        if name == "empty_store":
            PatternStore(tmp / "empty_store").disk.close()
            return str(tmp / "empty_store")
        if name == "file":
            (tmp / "file").write_text("neither a store nor a bundle\n")
            return str(tmp / "file")
        if name == "bundle":
            assert main(["-q", "--dir", str(self.seeded), "export", str(tmp / "all.bundle")]) == 0
            return str(tmp / "all.bundle")
        if name in ("full", "tiny"):
            _mount(["-t", "tmpfs", "-o", f"size={'400k' if name == 'full' else '40k'},mode=0700", "tmpfs"], tmp / name)
            self.mounts.append(tmp / name)
            return str(tmp / name)
        if name == "readonly":
            source = self.copy("readonly-source")
            _mount(["--bind", str(source)], tmp / name)
            self.mounts.append(tmp / name)
            _mount(["-o", "remount,bind,ro"], tmp / name)
            return str(tmp / name)
        raise KeyError(name)

    def close(self) -> None:
        for target in reversed(self.mounts):  # lazily: a store this process opened may still hold a file there
            subprocess.run(["umount", "--lazy", str(target)], check=True)


@pytest.mark.parametrize("command, case, args, status", CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_exit_status(command, case, args, status, seeded, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(MAX_GENERATION_BYTES_ENV, raising=False)
    places = Places(tmp_path, seeded)
    try:
        filled = [a.format_map(places) for a in args]
        capsys.readouterr()
        code = main(filled)
    finally:
        places.close()
    out, err = capsys.readouterr()
    assert code == status, out + err
    assert "Traceback" not in err
    if status == 2:
        assert err.startswith("patternstore: error: ") and err.count("\n") == 1 and out == ""
    assert os.environ.get(MAX_GENERATION_BYTES_ENV) is None  # the option is the command's alone


def test_a_bad_generation_limit_setting_is_bad_input(seeded, capsys, monkeypatch):
    monkeypatch.setenv(MAX_GENERATION_BYTES_ENV, "lots")
    assert main(["--dir", str(seeded), "ls"]) == 2
    assert f"{MAX_GENERATION_BYTES_ENV} must be a size" in capsys.readouterr().err
