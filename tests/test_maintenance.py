"""patternstore.maintenance called directly (no subprocesses): results
against what was stored, repair of what was broken, read-only directories,
and a repair racing a clear."""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time
import warnings
from pathlib import Path

import diskcache
import pytest

from patternstore.precompute import precompute
from patternstore import DilatedSpec, PatternStore, SparseSpec, generate, maintenance
from patternstore.cli import main
from patternstore.codec import encode
from patternstore.pattern import Pattern

SPECS = [
    DilatedSpec((64, 128), (1, 2), 4),
    SparseSpec("bigbird", 2048, 64, 2, seed=7, num_random_blocks=2),
    SparseSpec("local", 1 << 16, 16),  # a value file of its own (over diskcache's 32 KiB)
]


@pytest.fixture
def seeded(tmp_path: Path) -> Path:
    directory = tmp_path / "store"
    result = precompute(maintenance.open_store(directory, writable=True), SPECS)
    assert (result.generated, result.present, result.failed) == (len(SPECS), 0, [])
    return directory


def test_precompute_generates_once_then_finds_present(tmp_path):
    store = maintenance.open_store(tmp_path, writable=True)
    seen = []
    first = precompute(store, SPECS + SPECS[:1], progress=seen.append)  # a key given twice counts once
    assert [item.spec for item in seen] == SPECS and all(item.generated and item.stored for item in seen)
    assert first.bytes == sum(generate(spec).nbytes for spec in SPECS)
    again = precompute(store, SPECS)
    assert (again.generated, again.present, again.bytes) == (0, len(SPECS), 0)
    assert again.to_json()["specs"] == len(SPECS) and again.to_json()["directory"] == str(tmp_path)


def test_list_info_stats_and_keys(seeded):
    store = maintenance.open_store(seeded)
    entries = maintenance.list_entries(store)
    assert [e.key for e in entries] == sorted(s.key for s in SPECS)
    for entry in entries:
        spec = next(s for s in SPECS if s.key == entry.key)
        assert entry.spec == spec and entry.problem is None and entry.bytes == generate(spec).nbytes
        assert entry.stored_bytes == len(encode(generate(spec))) and entry.stored_at <= time.time()
        assert entry.arrays == {n: {"dtype": "int32", "shape": list(t.shape)} for n, t in generate(spec).arrays.items()}
    dilated = SPECS[0].key
    assert maintenance.entry_info(store, dilated).to_json()["spec"] == SPECS[0].to_dict()
    assert maintenance.entry_info(store, "dilated-v2-0000") is None
    assert maintenance.resolve_key(store, dilated[:16]) == dilated
    assert maintenance.resolve_key(store, "dilated:segment_lengths=64,128:dilation_rates=1,2:num_heads=4") == dilated
    with pytest.raises(maintenance.AmbiguousKey, match="matches 3 keys"):
        maintenance.resolve_key(store, "")
    stats = maintenance.store_stats(store)
    assert stats.entries == 3 and stats.kinds == {"bigbird": 1, "dilated": 1, "local": 1} and stats.bytes > 0


def _plant_orphan(directory: Path) -> Path:
    """A value file no entry refers to, two hours old (a writer killed between file and row)."""
    orphan = directory / "ab" / "cd" / "orphan.val"
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"x" * 100)
    old = time.time() - 7200
    os.utime(orphan, (old, old))
    return orphan


def test_verify_finds_and_repair_fixes(seeded):
    store = maintenance.open_store(seeded, writable=True)
    dilated, bigbird, local = (s.key for s in SPECS)
    value = bytearray(maintenance.read_entry(store, dilated).value)
    value[-1] ^= 0xFF  # inside the arrays: checksum mismatch, header (spec) still readable
    store.disk.write(dilated, bytes(value))
    store.disk.write(bigbird, b"not a value")  # nothing to regenerate from
    wrong = {name: t.clone() for name, t in generate(SPECS[2]).arrays.items()}
    wrong["kv_indices"][0] += 1
    store.put(Pattern(SPECS[2], wrong))  # a valid value with wrong arrays
    orphan = _plant_orphan(seeded)

    found = maintenance.verify(store, full=True)
    assert not found.ok and found.entries == 3 and found.compared == 3
    problems = {p.key: p.problem for p in found.problems}
    assert problems.keys() == {dilated, bigbird, local} and problems[dilated] == "checksum mismatch"
    assert problems[local] == "arrays differ from a fresh generation" and "prefix" in problems[bigbird]
    assert [(o.path, o.bytes, o.repair) for o in found.orphans] == [(orphan, 100, None)]
    assert orphan.exists()  # verify without repair writes nothing

    fixed = maintenance.verify(store, full=True, repair=True)
    assert fixed.ok and {p.key: p.repair for p in fixed.problems} == {
        dilated: "regenerated", bigbird: "dropped (spec unreadable, nothing to regenerate)", local: "regenerated",
    }
    assert [o.repair for o in fixed.orphans] == ["removed"] and not orphan.exists()
    clean = maintenance.verify(store, full=True)
    assert clean.ok and clean.entries == 2 and clean.problems == [] and clean.orphans == []
    assert maintenance.read_entry(store, local).pattern.equals(generate(SPECS[2]))


def test_verify_samples_with_the_given_random_generator(seeded):
    store = maintenance.open_store(seeded)
    result = maintenance.verify(store, sample=2, rng=random.Random(3))
    assert result.ok and result.compared == 2 and result.to_json()["ok"]


def test_export_then_import_into_an_empty_store(seeded, tmp_path):
    store = maintenance.open_store(seeded, writable=True)
    store.disk.write(SPECS[0].key, b"broken")
    bundle = tmp_path / "all.bundle"
    exported = maintenance.export(store, bundle)
    assert exported.exported == 2 and len(exported.skipped) == 1 and exported.skipped[0].startswith(SPECS[0].key)
    assert exported.bytes == bundle.stat().st_size

    other = maintenance.open_store(tmp_path / "other", writable=True)
    imported = maintenance.import_bundle(other, bundle)
    assert (imported.imported, imported.present, imported.failed) == (2, 0, [])
    for spec in SPECS[1:]:
        assert maintenance.read_entry(other, spec.key).value == maintenance.read_entry(store, spec.key).value
    assert maintenance.import_bundle(other, bundle).present == 2


def _snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(directory.rglob("*"))}


def _refuse_writes(directory: Path, monkeypatch) -> None:
    """Make ``directory`` unwritable for this process. Root ignores mode bits:
    where chmod does not refuse, diskcache's (writing) open is made to fail
    the way SQLite fails on a read-only directory, which is what the store
    sees on a read-only mount (tests/test_store_disk.py mounts one for real)."""
    directory.chmod(0o500)
    probe = directory / "probe"
    try:
        probe.write_text("x")
    except OSError:
        return
    probe.unlink()

    def refuse(*args, **kwargs):
        raise sqlite3.OperationalError("attempt to write a readonly database")

    monkeypatch.setattr(diskcache.Cache, "__init__", refuse)


def test_read_only_directory_serves_every_read_only_operation(seeded, tmp_path, monkeypatch, capsys):
    before = _snapshot(seeded)
    _refuse_writes(seeded, monkeypatch)
    try:
        store = maintenance.open_store(seeded)  # read-only on purpose: nothing tried, nothing to warn of
        assert store.read_only
        assert [e.key for e in maintenance.list_entries(store)] == sorted(s.key for s in SPECS)
        assert maintenance.entry_info(store, SPECS[1].key).problem is None
        assert maintenance.store_stats(store).entries == 3
        assert maintenance.verify(store, full=True).ok
        assert maintenance.export(store, tmp_path / "ro.bundle").exported == 3
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the error says it all: no warning besides
            with pytest.raises(maintenance.StoreUnavailable, match="needs a writable store directory"):
                maintenance.open_store(seeded, writable=True)

        for args, status in ((["ls"], 0), (["stats"], 0), (["info", SPECS[0].key[:20]], 0), (["verify"], 0),
                             (["export", str(tmp_path / "cli.bundle")], 0), (["verify", "--repair"], 2),
                             (["clear", "--yes"], 2), (["precompute", "--spec", "local:seq_len=64:block_size=8"], 2)):
            assert main(["--dir", str(seeded), "-q", *args]) == status, args
        err = capsys.readouterr().err
        assert "Traceback" not in err and "needs a writable store directory" in err
    finally:
        seeded.chmod(0o700)
    assert _snapshot(seeded) == before  # nothing was written


def test_vanished_entries_and_files_read_as_gone(seeded, monkeypatch):
    store = maintenance.open_store(seeded, writable=True)
    gone = SPECS[0].key
    store.evict(gone)
    monkeypatch.setattr(store.disk, "keys", lambda: [s.key for s in SPECS])  # listed before a clear removed it
    entry = maintenance.read_entry(store, gone)
    assert entry.value is None and entry.pattern is None and entry.problem is None
    assert {e.key: e.problem for e in maintenance.list_entries(store)}[gone] == "vanished while listing"
    result = maintenance.verify(store, full=True, repair=True)
    assert result.ok and result.problems == []

    def cleared_meanwhile(min_age: float = 3600.0):
        raise FileNotFoundError(2, "No such file or directory", str(seeded / "ab"))

    monkeypatch.setattr(store.disk, "orphans", cleared_meanwhile)
    assert maintenance.orphans(store) == [] and maintenance.verify(store, repair=True).ok
    missing = seeded / "never" / "there.val"
    assert maintenance.remove_orphans(store, [missing]) == []  # already gone counts as removed


def test_repair_racing_a_clear_never_raises(tmp_path):
    """verify --repair in one store while another store object (its own
    SQLite connections, as another process has) clears the directory."""
    directory = tmp_path / "race"
    writer = PatternStore(directory, max_entries=0)
    specs = [SparseSpec("local", 1 << 15, 8, seed=i) for i in range(6)]
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            while not stop.is_set():
                for spec in specs:
                    writer.get(spec)
                writer.clear()
        except BaseException as error:  # reported below
            errors.append(error)

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        repairer = maintenance.open_store(directory, writable=True)
        for _ in range(15):
            _plant_orphan(directory)
            maintenance.verify(repairer, full=True, repair=True)
            maintenance.list_entries(repairer)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive() and errors == []


def test_read_only_open_of_a_missing_store_is_refused_and_creates_nothing(tmp_path):
    with pytest.raises(maintenance.StoreUnavailable, match="no pattern store in .*: no such directory"):
        maintenance.open_store(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()


def test_import_regenerates_every_entry_unless_trusted(seeded, tmp_path):
    from patternstore.bundle import BundleError, read_bundle, write_bundle

    store = maintenance.open_store(seeded)
    values = [(e.key, e.value) for e in maintenance.entries(store)]
    wrong = {name: t.clone() for name, t in generate(SPECS[1]).arrays.items()}
    wrong["kv_indices"][-1] -= 1
    doctored = [(key, encode(Pattern(SPECS[1], wrong)) if key == SPECS[1].key else value) for key, value in values]
    bundle = tmp_path / "doctored.bundle"
    write_bundle(bundle, doctored)
    position = [key for key, _ in doctored].index(SPECS[1].key)
    with pytest.raises(BundleError, match=rf"entry {position} \({SPECS[1].key}\) differs from a fresh generation"):
        read_bundle(bundle)
    target = maintenance.open_store(tmp_path / "target", writable=True)
    with pytest.raises(BundleError):
        maintenance.import_bundle(target, bundle)
    assert target.stored_keys() == []  # all or nothing
    assert read_bundle(bundle, trust=True) == doctored
    assert maintenance.import_bundle(target, bundle, trust=True).imported == len(SPECS)
