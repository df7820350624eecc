"""The disk tier under attack and under failure.

Corrupt, truncated, wrong-version and wrong-key values and planted pickles
are refused (counted in ``corrupt``) and regenerated, and the pickles never
run. An unusable directory, a full disk or a network filesystem leave the
store working with exactly one warning.
"""

from __future__ import annotations

import errno
import os
import pickle
import sqlite3
import warnings
from pathlib import Path

import diskcache
import msgpack
import pytest

import patternstore.disk as disk_module
from patternstore import DilatedSpec, PatternStore, SparseSpec, generate
from patternstore.codec import checksum, decode, decode_packed, encode
from patternstore.memory import MemoryTier
from patternstore.pattern import PACK_ALIGN
from patternstore.disk import PatternStoreWarning, filesystem_type

SMALL = DilatedSpec([128, 512], [1, 2], 2)  # envelope < 32 KiB: inside SQLite
LARGE = SparseSpec("bigbird", seq_len=16384, block_size=32, num_heads=4, different_layout_per_head=True)  # a file


class Planted:
    """Unpickling this creates ``marker``: the code-execution hole of pickle."""

    def __init__(self, marker: Path, padding: int = 0) -> None:
        self.marker, self.padding = marker, padding

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()  # {'x' * self.padding}",))


def plain_cache(store: PatternStore) -> diskcache.Cache:
    """The directory opened the way an attacker or a careless tool would."""
    return diskcache.Cache(str(store.directory))


def refetched(store: PatternStore, spec) -> None:
    """get returns the true pattern, counted as one corrupt value, and the
    disk now holds a value a fresh store accepts."""
    assert store.get(spec).equals(generate(spec))
    stats = store.stats()
    assert stats["corrupt"] == 1 and stats["generations"] == 1 and stats["disk_hits"] == 0
    fresh = PatternStore(store.directory)
    assert fresh.get(spec).equals(generate(spec)) and fresh.stats()["disk_hits"] == 1


def test_a_value_decodes_into_one_aligned_buffer_that_the_memory_tier_holds_without_a_copy():
    for spec in (SMALL, LARGE):
        expected = generate(spec)
        packed = decode_packed(encode(expected), spec.key)
        assert [slot[0] for slot in packed.slots] == list(expected.arrays)
        assert all(offset % PACK_ALIGN == 0 for _, _, _, offset, _ in packed.slots)
        assert packed.unpack().equals(expected) and decode(encode(expected), spec.key).equals(expected)
        held = MemoryTier().put(packed)
        assert held.equals(expected)
        for array in held.arrays.values():
            assert array.untyped_storage().data_ptr() == packed.buffer.untyped_storage().data_ptr()


def test_the_planted_payload_is_live():
    marker = Path(os.environ.get("TMPDIR", "/tmp")) / f"planted-live-{os.getpid()}"
    marker.unlink(missing_ok=True)
    pickle.loads(pickle.dumps(Planted(marker)))
    assert marker.exists()  # so its absence below means it never ran
    marker.unlink()


# ------------------------------------------------------------------ corrupt values
@pytest.mark.parametrize("spec", [SMALL, LARGE], ids=["in-sqlite", "in-file"])
def test_flipped_bytes(tmp_path, spec):
    PatternStore(tmp_path).get(spec)
    files = list(tmp_path.rglob("*.val"))
    if spec is LARGE:
        (path,) = files
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x40
        path.write_bytes(bytes(data))
    else:
        assert files == []
        with sqlite3.connect(tmp_path / "cache.db") as db:
            (value,) = db.execute("SELECT value FROM Cache WHERE key = ?", (spec.key,)).fetchone()
            data = bytearray(value)
            data[-100] ^= 0x01
            db.execute("UPDATE Cache SET value = ? WHERE key = ?", (bytes(data), spec.key))
    refetched(PatternStore(tmp_path), spec)


@pytest.mark.parametrize("spec", [SMALL, LARGE], ids=["in-sqlite", "in-file"])
def test_truncated(tmp_path, spec):
    store = PatternStore(tmp_path)
    store.disk.write(spec.key, encode(generate(spec))[:-7])
    refetched(store, spec)


def test_truncated_value_file(tmp_path):
    PatternStore(tmp_path).get(LARGE)
    (path,) = tmp_path.rglob("*.val")
    path.write_bytes(path.read_bytes()[:1000])
    refetched(PatternStore(tmp_path), LARGE)


def test_wrong_version_envelope_with_a_valid_checksum(tmp_path):
    store = PatternStore(tmp_path)
    spec = SMALL
    envelope = msgpack.unpackb(encode(generate(spec)), raw=False)
    envelope["format"] = 2
    envelope["checksum"] = checksum(2, spec.key, envelope["spec"], envelope["arrays"])
    store.disk.write(spec.key, msgpack.packb(envelope, use_bin_type=True))
    refetched(store, spec)


def test_envelope_of_another_spec_under_this_key(tmp_path):
    store = PatternStore(tmp_path)
    other = DilatedSpec([128, 512], [1, 2], 1)  # differs in one field
    store.disk.write(SMALL.key, encode(generate(other)))
    refetched(store, SMALL)


# ------------------------------------------------------------------ planted pickles
@pytest.mark.parametrize("padding", [0, 100_000], ids=["in-sqlite", "in-file"])
def test_planted_pickle_value_never_runs(tmp_path, padding):
    directory, marker = tmp_path / "store", tmp_path / "marker"
    store = PatternStore(directory)
    plain_cache(store).set(SMALL.key, Planted(marker, padding))
    refetched(store, SMALL)
    assert store.disk.keys() == [SMALL.key]
    assert not marker.exists()


@pytest.mark.parametrize("value", ["a str", 12345, 1.5], ids=["str", "int", "float"])
def test_values_that_are_not_raw_bytes_are_refused(tmp_path, value):
    store = PatternStore(tmp_path)
    plain_cache(store).set(SMALL.key, value)
    refetched(store, SMALL)


def test_planted_pickled_key_is_never_unpickled(tmp_path):
    directory, marker = tmp_path / "store", tmp_path / "marker"
    store = PatternStore(directory)
    store.get(SMALL)
    plain_cache(store).set(Planted(marker), b"value under a pickled key")
    assert store.disk.keys() == [SMALL.key]  # str keys only
    assert PatternStore(directory).get(SMALL).equals(generate(SMALL))
    assert not marker.exists()


def test_stored_at_of_a_planted_pickle_does_not_run_it(tmp_path):
    store = PatternStore(tmp_path / "store")
    plain_cache(store).set(SMALL.key, Planted(tmp_path / "marker", 100_000), tag=1.0)
    assert store.disk.stored_at(SMALL.key) is None
    assert not (tmp_path / "marker").exists()


# ------------------------------------------------------------------ failures
def attention_style_use(store: PatternStore) -> None:
    """What a module's forward does: the same few specs, over and over."""
    specs = [SMALL, DilatedSpec([256], [1], 1)]
    first = [store.get(spec) for spec in specs]
    for _ in range(50):
        for spec, pattern in zip(specs, first):
            assert store.get(spec) is pattern
    assert all(p.equals(generate(s)) for s, p in zip(specs, first))


def warnings_of(action) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action()
    return [w for w in caught if issubclass(w.category, PatternStoreWarning)]


def test_directory_that_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    stores = []

    def use() -> None:
        stores.append(PatternStore(tmp_path / "file" / "store"))
        attention_style_use(stores[0])

    caught = warnings_of(use)
    assert len(caught) == 1 and "memory only" in str(caught[0].message)
    assert stores[0].directory is None and stores[0].disk is None
    assert str(stores[0].disk_error).startswith(f"cannot use {tmp_path / 'file' / 'store'}: ")
    assert stores[0].stats()["memory_hits"] == 100


def writes_are_refused(directory: Path) -> bool:
    probe = directory / "probe"
    try:
        probe.write_text("x")
    except OSError:
        return True
    probe.unlink()
    return False


def test_read_only_directory(tmp_path, monkeypatch):
    directory = tmp_path / "store"
    PatternStore(directory).get(SMALL)
    directory.chmod(0o500)
    try:
        if not writes_are_refused(directory):
            # Root ignores mode bits: make SQLite fail the way it does on a
            # read-only directory instead.
            def refuse(*args, **kwargs):
                raise sqlite3.OperationalError("attempt to write a readonly database")

            monkeypatch.setattr(diskcache.Cache, "__init__", refuse)
        stores = []

        def use() -> None:
            stores.append(PatternStore(directory))
            attention_style_use(stores[0])

        caught = warnings_of(use)
        assert len(caught) == 1
    finally:
        directory.chmod(0o700)


@pytest.mark.parametrize(
    "error",
    [OSError(errno.ENOSPC, "No space left on device"), sqlite3.OperationalError("database or disk is full")],
    ids=["ENOSPC", "sqlite-full"],
)
def test_full_disk(tmp_path, monkeypatch, error):
    store = PatternStore(tmp_path)
    store.get(LARGE)  # on disk before the disk fills
    store.memory.clear()

    def full(*args, **kwargs):
        raise error

    monkeypatch.setattr(diskcache.Cache, "set", full)
    caught = warnings_of(lambda: attention_style_use(store))
    assert len(caught) == 1 and "memory only" in str(caught[0].message)
    assert store.get(LARGE).equals(generate(LARGE))  # still read from disk
    stats = store.stats()
    assert stats["disk_hits"] == 1 and stats["generations"] == 3
    assert not store.disk.writable


def test_network_filesystem_warns_once(tmp_path, monkeypatch):
    monkeypatch.setattr(disk_module, "filesystem_type", lambda path: "nfs4")
    stores = []

    def use() -> None:
        stores.append(PatternStore(tmp_path))
        attention_style_use(stores[0])

    caught = warnings_of(use)
    assert len(caught) == 1 and "network filesystem (nfs4)" in str(caught[0].message)
    assert stores[0].directory == tmp_path  # the disk tier is still used


def test_local_directory_does_not_warn(tmp_path):
    assert warnings_of(lambda: attention_style_use(PatternStore(tmp_path))) == []


def test_filesystem_type_picks_the_longest_mount(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "rootfs / ext4 rw 0 0\n"
        "server:/export /mnt/shared nfs4 rw 0 0\n"
        "//host/share /mnt/with\\040space cifs rw 0 0\n"
        "sshfs#me@host: /home/me/données fuse.sshfs rw 0 0\n",
        encoding="utf-8",
    )
    assert filesystem_type(Path("/home/me/données/cache"), str(mounts)) == "fuse.sshfs"
    assert filesystem_type(Path("/mnt/shared/cache"), str(mounts)) == "nfs4"
    assert filesystem_type(Path("/mnt/sharedother"), str(mounts)) == "ext4"
    assert filesystem_type(Path("/mnt/with space/x"), str(mounts)) == "cifs"
    assert filesystem_type(Path("/x"), str(tmp_path / "missing")) is None


def test_a_stuck_sqlite_writer_never_hangs_a_get(tmp_path):
    import time

    store = PatternStore(tmp_path, lock_timeout=0.3)
    stuck = sqlite3.connect(tmp_path / "cache.db", isolation_level=None)
    stuck.execute("BEGIN IMMEDIATE")  # another process's write transaction that never ends
    try:
        started = time.monotonic()
        caught = warnings_of(lambda: attention_style_use(store))
        assert time.monotonic() - started < 10
    finally:
        stuck.execute("ROLLBACK")
        stuck.close()
    assert len(caught) == 1 and "cannot write" in str(caught[0].message)


def test_an_unreadable_database_is_a_miss_with_one_warning(tmp_path, monkeypatch):
    store = PatternStore(tmp_path)
    store.get(SMALL)
    store.memory.clear()

    def broken(*args, **kwargs):
        raise sqlite3.DatabaseError("database disk image is malformed")

    monkeypatch.setattr(diskcache.Cache, "get", broken)
    caught = warnings_of(lambda: [store.get(SMALL) for _ in range(3)])
    assert len(caught) == 1 and "cannot read" in str(caught[0].message)
    assert store.get(SMALL).equals(generate(SMALL)) and store.stats()["generations"] == 2
