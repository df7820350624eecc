"""The disk tier under attack and under failure.

Corrupt, truncated, wrong-version and wrong-key values and planted pickles
are refused (counted in ``corrupt``) and regenerated, and the pickles never
run. An unusable directory, a full disk or a network filesystem leave the
store working with exactly one warning.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import pickle
import sqlite3
import struct
import warnings
from pathlib import Path

import diskcache
import msgpack
import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import patternstore.disk as disk_module
from patternstore import DilatedSpec, PatternStore, SparseSpec, generate
from patternstore.codec import CorruptValue, decode, decode_packed, encode, stored_spec
from patternstore.memory import MemoryTier
from patternstore.pattern import PACK_ALIGN, Pattern
from patternstore.diskerrors import PatternStoreWarning
from patternstore.safedir import filesystem_type
from strategies import dilated_specs, sparse_specs, tiny_sparse_specs

SMALL = DilatedSpec([128, 512], [1, 2], 2)  # envelope < 32 KiB: inside SQLite
LARGE = SparseSpec("bigbird", seq_len=16384, block_size=32, num_heads=4, different_layout_per_head=True)  # a file


def resealed(value: bytearray) -> bytes:
    """``value`` with its checksum recomputed: xxh3_64 of bytes 12 onwards,
    at bytes 4 to 12 (the layout in codec.py), so only the field checks can
    refuse it."""
    struct.pack_into("<Q", value, 4, xxhash.xxh3_64_intdigest(bytes(value[12:])))
    return bytes(value)


class Planted:
    """Unpickling this creates ``marker``: the code-execution hole of pickle."""

    def __init__(self, marker: Path, padding: int = 0) -> None:
        self.marker, self.padding = marker, padding

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()  # {'x' * self.padding}",))


def plain_cache(store: PatternStore) -> diskcache.Cache:
    """The directory opened the way an attacker or a careless tool would."""
    return diskcache.Cache(str(store.directory))


def refetched(store: PatternStore, spec, counter: str = "corrupt") -> None:
    """get returns the true pattern, counted as one refused value (in
    ``counter``: corrupt, or outdated for another format), and the disk now
    holds a value a fresh store accepts."""
    assert store.get(spec).equals(generate(spec))
    stats = store.stats()
    other = {"corrupt": "outdated", "outdated": "corrupt"}[counter]
    assert stats[counter] == 1 and stats[other] == 0
    assert stats["generations"] == 1 and stats["disk_hits"] == 0
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


def test_wrong_version_value_with_a_valid_checksum_is_an_outdated_miss(tmp_path):
    store = PatternStore(tmp_path)
    value = bytearray(encode(generate(SMALL)))
    struct.pack_into("<I", value, 12, 3)  # a format this code does not know
    store.disk.write(SMALL.key, resealed(value))
    refetched(store, SMALL, counter="outdated")


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


def test_read_only_directory_is_still_read(tmp_path, monkeypatch):
    """A precomputed store whose database cannot be opened for writing.
    Root ignores mode bits, so chmod alone cannot refuse this process: where
    it does not, diskcache's (writing) open is made to fail the way SQLite
    fails on a read-only directory. test_read_only_mount below uses a real
    read-only mount."""
    directory = tmp_path / "store"
    PatternStore(directory).get(SMALL)
    PatternStore(directory).get(LARGE)
    directory.chmod(0o500)
    try:
        if not writes_are_refused(directory):
            def refuse(*args, **kwargs):
                raise sqlite3.OperationalError("attempt to write a readonly database")

            monkeypatch.setattr(diskcache.Cache, "__init__", refuse)
        stores = []

        def use() -> None:
            stores.append(PatternStore(directory))
            attention_style_use(stores[0])  # SMALL from disk, another spec generated
            assert stores[0].get(LARGE).equals(generate(LARGE))

        caught = warnings_of(use)
        assert len(caught) == 1 and "read-only" in str(caught[0].message)
        store = stores[0]
        assert store.read_only and store.disk.read_only and "readonly" in str(store.disk_error)
        stats = store.stats()
        assert stats["disk_hits"] == 2 and stats["generations"] == 1 and stats["corrupt"] == 0
        assert sorted(store.disk.keys()) == sorted([SMALL.key, LARGE.key])  # what `patternstore ls` reads
        assert store.disk.stored_at(LARGE.key) is not None and store.disk.volume() > 0
        assert decode(store.disk.read(LARGE.key), LARGE.key).equals(generate(LARGE))
        assert not store.disk.write(SMALL.key, b"x") and not store.disk.delete(SMALL.key)
        assert store.disk.clear() == 0 and store.disk.contains(SMALL.key)
    finally:
        directory.chmod(0o700)
    monkeypatch.undo()
    assert PatternStore(directory).get(SMALL).equals(generate(SMALL))  # untouched


READ_ONLY_CHILD = """
import json, sys, warnings
warnings.simplefilter("always")
from patternstore import DilatedSpec, PatternStore, SparseSpec, generate
small = DilatedSpec([128, 512], [1, 2], 2)
large = SparseSpec("bigbird", seq_len=16384, block_size=32, num_heads=4, different_layout_per_head=True)
absent = DilatedSpec([256], [1], 1)
with warnings.catch_warnings(record=True) as caught:
    store = PatternStore(sys.argv[1])
    ok = all(store.get(spec).equals(generate(spec)) for spec in (small, large, absent, small))
print(json.dumps({"ok": ok, "read_only": store.read_only, "warnings": [str(w.message) for w in caught],
                  "stats": store.stats(), "keys": sorted(store.disk.keys())}))
"""


def test_read_only_mount(tmp_path):
    """A precomputed store on a read-only bind mount, made in a user and mount
    namespace of its own (``unshare -rm``: nothing outside it sees the mount,
    and it ends with the child)."""
    import shutil
    import subprocess
    import sys

    directory = tmp_path / "store"
    PatternStore(directory).get(SMALL)
    PatternStore(directory).get(LARGE)
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("no user namespaces here; test_read_only_directory_is_still_read covers the logic")
    repo = str(Path(__file__).resolve().parents[1])
    script = (f'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && touch "$1/probe" 2>/dev/null '
              f'&& exit 3; exec "$2" -c "$3" "$1"')
    result = subprocess.run(
        [unshare, "-rm", "sh", "-c", script, "sh", str(directory), sys.executable, READ_ONLY_CHILD],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))},
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and report["read_only"]
    assert len(report["warnings"]) == 1 and "read-only" in report["warnings"][0]
    stats = report["stats"]
    assert stats["disk_hits"] == 2 and stats["generations"] == 1 and stats["memory_hits"] == 1
    assert report["keys"] == sorted([SMALL.key, LARGE.key])


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

    monkeypatch.setattr(disk_module, "read_row", broken)  # the tier's one query of a value
    caught = warnings_of(lambda: [store.get(SMALL) for _ in range(3)])
    assert len(caught) == 1 and "cannot read" in str(caught[0].message)
    assert store.get(SMALL).equals(generate(SMALL)) and store.stats()["generations"] == 2


# ------------------------------------------------------------------ format 2
def format_1_value(pattern) -> bytes:
    """The format-1 encoder, as it was (a msgpack map with CRC-32), inlined
    so the test does not depend on code that no longer exists."""
    import zlib

    arrays = {
        name: {"dtype": "<i4", "shape": list(t.shape), "data": t.contiguous().numpy().astype("<i4").tobytes()}
        for name, t in pattern.arrays.items()
    }
    spec = pattern.spec.to_dict()
    header = [1, pattern.key, spec, [[name, a["dtype"], a["shape"]] for name, a in arrays.items()]]
    crc = zlib.crc32(msgpack.packb(header, use_bin_type=True))
    for entry in arrays.values():
        crc = zlib.crc32(entry["data"], crc)
    envelope = {"format": 1, "key": pattern.key, "spec": spec, "arrays": arrays, "checksum": crc}
    return msgpack.packb(envelope, use_bin_type=True)


@pytest.mark.parametrize("spec", [SMALL, LARGE], ids=["in-sqlite", "in-file"])
def test_a_format_1_value_is_a_clean_outdated_miss(tmp_path, spec):
    store = PatternStore(tmp_path)
    store.disk.write(spec.key, format_1_value(generate(spec)))
    assert (list(tmp_path.rglob("*.val")) != []) == (spec is LARGE)
    with pytest.raises(CorruptValue, match="format-1"):
        decode(store.disk.read(spec.key), spec.key)
    refetched(store, spec, counter="outdated")


def header_of(value: bytes) -> tuple[dict, int, int]:
    """(header map, header start, header size) of a format-2 value."""
    (size,) = struct.unpack_from("<I", value, 16)
    return msgpack.unpackb(value[20 : 20 + size], raw=False), 20, size


def rebuilt(value: bytes, change) -> bytearray:
    """``value`` with ``change(header)`` applied to its header (the payload
    moved to stay aligned) and its header_size updated; checksum left stale."""
    header, start, size = header_of(value)
    payload = value[-(-(start + size) // PACK_ALIGN) * PACK_ALIGN :]
    change(header)
    packed = msgpack.packb(header, use_bin_type=True)
    padding = -(start + len(packed)) % PACK_ALIGN
    out = bytearray(value[:start] + packed + bytes(padding) + payload)
    struct.pack_into("<I", out, 16, len(packed))
    return out


def other_spec(header: dict) -> None:
    header["spec"]["num_heads"] += 1


def other_dtype(header: dict) -> None:
    header["arrays"][0][1] = "<i8"


def other_shape(header: dict) -> None:
    # Four more rows: at least PACK_ALIGN more bytes, so the layout no longer
    # matches the value's length. (A shape change that keeps the layout, under
    # a valid checksum, is as undetectable as other payload bytes: only a
    # writer of the directory can make it; `patternstore verify` regenerates.)
    header["arrays"][-1][2][0] += 4


def other_offset(header: dict) -> None:
    header["arrays"][-1][3] += PACK_ALIGN


def other_name(header: dict) -> None:
    header["arrays"][0][0] = header["arrays"][-1][0]


def other_key(header: dict) -> None:
    header["key"] = LARGE.key


TWO_ARRAYS = SparseSpec("bigbird", seq_len=1024, block_size=32, num_heads=2)  # in SQLite, two arrays
FIELD_CHANGES = {"key": other_key, "spec": other_spec, "array dtype": other_dtype, "array shape": other_shape,
                 "array offset": other_offset, "array name": other_name}


@pytest.mark.parametrize("field", list(FIELD_CHANGES))
@pytest.mark.parametrize("reseal", [False, True], ids=["stale-checksum", "valid-checksum"])
def test_each_header_field_changed_is_refused(tmp_path, field, reseal):
    """A header field changed, with the checksum left as it was (the checksum
    refuses it) and recomputed (the field's own check refuses it)."""
    value = bytearray(rebuilt(encode(generate(TWO_ARRAYS)), FIELD_CHANGES[field]))
    stored = resealed(value) if reseal else bytes(value)
    with pytest.raises(CorruptValue) as refusal:
        decode(stored, TWO_ARRAYS.key)
    assert ("checksum" in str(refusal.value)) != reseal
    store = PatternStore(tmp_path)
    store.disk.write(TWO_ARRAYS.key, stored)
    refetched(store, TWO_ARRAYS)


def test_the_unchanged_rebuild_decodes(tmp_path):
    """The helpers above change only what they are asked to."""
    value = encode(generate(SMALL))
    assert resealed(rebuilt(value, lambda header: None)) == value


@pytest.mark.parametrize("spec", [SMALL, LARGE], ids=["in-sqlite", "in-file"])
@pytest.mark.parametrize(
    "where", ["magic", "checksum", "format", "header_size", "header", "padding", "payload start", "payload end"])
def test_a_flipped_byte_anywhere_is_refused(tmp_path, spec, where):
    value = bytearray(encode(generate(spec)))
    _, start, size = header_of(bytes(value))
    data_start = -(-(start + size) // PACK_ALIGN) * PACK_ALIGN
    position = {"magic": 1, "checksum": 7, "format": 12, "header_size": 17, "header": start + size // 2,
                "padding": data_start - 1, "payload start": data_start, "payload end": len(value) - 1}[where]
    if where == "padding" and data_start == start + size:
        value[position] ^= 0xFF  # no padding in this value: the last header byte instead
    else:
        value[position] ^= 0x10
    with pytest.raises(CorruptValue):
        decode(bytes(value), spec.key)
    store = PatternStore(tmp_path)
    store.disk.write(spec.key, bytes(value))
    refetched(store, spec, counter="outdated" if where == "format" else "corrupt")


def test_values_cut_short_or_padded_are_refused():
    value = encode(generate(SMALL))
    for damaged in (b"", value[:3], value[:19], value[:30], value[:-1], value + b"\0" * PACK_ALIGN):
        with pytest.raises(CorruptValue):
            decode(damaged, SMALL.key)


class ReadOnce:
    """A value file that records where each ``readinto`` wrote. It has no
    ``read``: a decoder that asked for bytes would fail."""

    def __init__(self, file) -> None:
        self.file, self.targets = file, []

    def fileno(self) -> int:
        return self.file.fileno()

    def readinto(self, target) -> int:
        self.targets.append((ctypes.addressof(ctypes.c_char.from_buffer(target)), len(target)))
        return self.file.readinto(target)

    def close(self) -> None:
        self.file.close()


def test_a_disk_hit_reads_the_file_once_into_the_buffer_the_returned_arrays_view(tmp_path, monkeypatch):
    PatternStore(tmp_path).get(LARGE)
    (path,) = tmp_path.rglob("*.val")
    store = PatternStore(tmp_path)
    opened: list[ReadOnce] = []
    source = store.disk.source

    def recording(key):
        found = source(key)
        assert not isinstance(found, (bytes, bytearray)), "a value over 32 KiB is a file"
        opened.append(ReadOnce(found))
        return opened[-1]

    monkeypatch.setattr(store.disk, "source", recording)
    pattern = store.get(LARGE)
    assert store.stats()["disk_hits"] == 1 and pattern.equals(generate(LARGE))
    ((address, length),) = opened[0].targets  # one read of the whole file
    assert length == path.stat().st_size
    for array in pattern.arrays.values():
        pointer = array.data_ptr()
        assert address <= pointer and pointer + array.nbytes <= address + length
    assert opened[0].file.closed
    assert store.get(LARGE) is pattern  # and the memory tier keeps that buffer


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=st.one_of(dilated_specs(), sparse_specs()),
    shapes=st.dictionaries(st.text(min_size=1, max_size=12), st.lists(st.integers(0, 9), max_size=3), max_size=4),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_of_any_named_int32_arrays(spec, shapes, seed):
    """The codec is generic over named arrays: any names, shapes (empty ones
    included) and values round-trip, every array aligned, bytes deterministic."""
    generator = torch.Generator().manual_seed(seed)
    arrays = {name: torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int32, generator=generator)
              for name, shape in shapes.items()}
    pattern = Pattern(spec, arrays)
    value = encode(pattern)
    assert encode(Pattern(spec, {n: t.clone() for n, t in arrays.items()})) == value
    packed = decode_packed(value, spec.key)
    assert packed.unpack().equals(pattern) and list(packed.unpack().arrays) == list(arrays)
    assert all(view.data_ptr() % PACK_ALIGN == 0 for view in packed.views().values())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(spec=st.one_of(tiny_sparse_specs(), st.sampled_from([SMALL, DilatedSpec([64, 128], [1, 2], 3)])))
def test_round_trip_of_every_kind_through_the_disk(tmp_path_factory, spec):
    directory = tmp_path_factory.mktemp("kinds")
    PatternStore(directory).get(spec)
    reader = PatternStore(directory)
    assert reader.get(spec).equals(generate(spec)) and reader.stats()["disk_hits"] == 1


def test_the_spec_of_a_damaged_value_is_recovered_only_for_its_own_key():
    value = bytearray(encode(generate(TWO_ARRAYS)))
    value[-1] ^= 0xFF  # payload damaged: the checksum refuses the value
    with pytest.raises(CorruptValue, match="checksum"):
        decode(bytes(value), TWO_ARRAYS.key)
    assert stored_spec(bytes(value), TWO_ARRAYS.key) == TWO_ARRAYS
    assert stored_spec(bytes(value), SMALL.key) is None  # another key: not that spec's value
    for garbage in (b"", b"not a value", format_1_value(generate(SMALL)), bytes(value[:25]), 12):
        assert stored_spec(garbage, SMALL.key) is None


def test_a_miss_and_a_put_copy_the_arrays_once_into_the_buffer_the_disk_value_was_written_from(tmp_path, monkeypatch):
    """encode_packed builds the stored value in one buffer; the memory tier
    adopts it (its storage is the whole value, header included), and nothing
    copies the arrays a second time (PackedPattern.copy_of is never called)."""
    from patternstore.pattern import PackedPattern

    def second_copy(pattern):
        raise AssertionError("the arrays were copied a second time")

    monkeypatch.setattr(PackedPattern, "copy_of", second_copy)
    store = PatternStore(tmp_path)
    for spec in (SMALL, LARGE):
        got = store.get(spec)  # a miss: generate, encode_packed, write, keep
        assert got.equals(generate(spec)) and store.stats()["misses"] >= 1
        value = store.disk.read(spec.key)
        for array in got.arrays.values():
            assert array.untyped_storage().nbytes() == len(value)
        assert bytes(array.untyped_storage()) == value  # the very bytes on disk
    other = SparseSpec("local", 4096, 16, 2)
    store.put(generate(other))
    held = store.get(other)
    assert store.stats()["memory_hits"] == 1 and held.equals(generate(other))
    assert held["kv_indices"].untyped_storage().nbytes() == len(store.disk.read(other.key))
