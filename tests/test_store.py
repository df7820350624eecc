"""PatternStore in one process: the two tiers against a model, the API,
threads, and arrays changed in place by callers.

Disk failures and corruption: test_store_disk.py. Several processes and
crashes: test_store_processes.py.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import patternstore.store as store_module
from patternstore import DilatedSpec, PatternStore, SparseSpec, Spec, default_store, generate

SIZES = (16, 40, 128, 300, 1024, 2500)  # one-position blocks; a causal local layout's nbytes is 12 * n - 4
SPECS = [SparseSpec("local", n, 1) for n in SIZES] + [SparseSpec("local", n, 1, 2, num_sliding_window_blocks=5) for n in SIZES[2:]]
SPECS += [DilatedSpec([n // 2, n], [1, 2], 2) for n in SIZES[2:4]]  # length-free: a few hundred bytes
REFERENCE = {spec.key: generate(spec) for spec in SPECS}


class StoreAgainstModel(RuleBasedStateMachine):
    """Random get/put/evict/clear (and in-place tampering) against a model:
    an OrderedDict key -> nbytes for the memory LRU, a set for the disk, and
    the counters the store must report."""

    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="patternstore-sm-")
        self.store: PatternStore | None = None
        self.memory: OrderedDict[str, int] = OrderedDict()
        self.disk: set[str] = set()
        self.tampered_keys: set[str] = set()
        self.counts = dict(memory_hits=0, disk_hits=0, misses=0, generations=0, evictions=0, tampered=0)

    @initialize(max_entries=st.integers(1, 6), max_bytes=st.integers(0, 24_000))
    def open_store(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.store = PatternStore(self.directory, max_entries=max_entries, max_bytes=max_bytes)

    def teardown(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    # -------------------------------------------------------------- model
    def _keep(self, key: str) -> None:
        size = REFERENCE[key].nbytes
        if size > self.max_bytes:
            return
        self.memory[key] = size
        while len(self.memory) > self.max_entries or sum(self.memory.values()) > self.max_bytes:
            oldest, _ = self.memory.popitem(last=False)
            self.tampered_keys.discard(oldest)
            self.counts["evictions"] += 1

    def _forget_if_tampered(self, key: str) -> None:
        if key in self.tampered_keys:
            self.tampered_keys.discard(key)
            del self.memory[key]
            self.counts["tampered"] += 1

    # -------------------------------------------------------------- rules
    @rule(spec=st.sampled_from(SPECS))
    def get(self, spec: Spec) -> None:
        key = spec.key
        self._forget_if_tampered(key)
        if key in self.memory:
            self.counts["memory_hits"] += 1
            self.memory.move_to_end(key)
        elif key in self.disk:
            self.counts["disk_hits"] += 1
            self._keep(key)
        else:
            self.counts["misses"] += 1
            self.counts["generations"] += 1
            self.disk.add(key)
            self._keep(key)
        assert self.store.get(spec).equals(REFERENCE[key])

    @rule(spec=st.sampled_from(SPECS))
    def put(self, spec: Spec) -> None:
        key = spec.key
        self.store.put(generate(spec))
        self._forget_if_tampered(key)
        self.disk.add(key)
        if key in self.memory:
            self.memory.move_to_end(key)  # never evicts another entry
        else:
            self._keep(key)

    @rule(spec=st.sampled_from(SPECS))
    def evict(self, spec: Spec) -> None:
        key = spec.key
        expected = key in self.memory or key in self.disk
        assert self.store.evict(spec) is expected
        self.memory.pop(key, None)
        self.disk.discard(key)
        self.tampered_keys.discard(key)

    @rule()
    def clear(self) -> None:
        self.store.clear()
        self.memory.clear()
        self.disk.clear()
        self.tampered_keys.clear()

    @precondition(lambda self: any(k not in self.tampered_keys for k in self.memory))
    @rule(data=st.data())
    def change_a_returned_array_in_place(self, data) -> None:
        key = data.draw(st.sampled_from(sorted(k for k in self.memory if k not in self.tampered_keys)))
        spec = REFERENCE[key].spec
        self.counts["memory_hits"] += 1
        self.memory.move_to_end(key)
        held = self.store.get(spec)
        name = data.draw(st.sampled_from(sorted(held.arrays)))
        held[name].add_(1)
        self.tampered_keys.add(key)

    # -------------------------------------------------------------- checks
    @invariant()
    def same_contents_order_and_stats(self) -> None:
        if self.store is None:
            return
        assert self.store.memory.keys() == list(self.memory)
        stats = self.store.stats()
        assert {name: stats[name] for name in self.counts} == self.counts
        assert stats["entries"] == len(self.memory)
        assert stats["bytes"] == sum(self.memory.values())
        assert stats["corrupt"] == 0 and stats["lock_timeouts"] == 0
        gets = self.counts["memory_hits"] + self.counts["disk_hits"] + self.counts["misses"]
        hits = self.counts["memory_hits"] + self.counts["disk_hits"]
        assert stats["hit_rate"] == pytest.approx(hits / gets if gets else 0.0)
        for key in self.disk:
            assert self.store.contains(key)


StoreAgainstModel.TestCase.settings = settings(
    max_examples=60, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestStoreAgainstModel = StoreAgainstModel.TestCase


# ------------------------------------------------------------------ API
def test_get_fills_both_tiers_and_a_second_store_reads_the_disk(tmp_path):
    spec = SparseSpec("bigbird", seq_len=4096, block_size=64, num_heads=2, different_layout_per_head=True)
    first = PatternStore(tmp_path)
    pattern = first.get(spec)
    assert pattern.equals(generate(spec))
    assert first.get(spec) is pattern  # memory hit: the same object
    assert first.directory == tmp_path and first.disk.keys() == [spec.key]
    second = PatternStore(tmp_path)
    assert second.get(spec).equals(pattern)
    assert second.stats()["disk_hits"] == 1 and second.stats()["generations"] == 0


def test_put_copies_the_arrays(tmp_path):
    store = PatternStore(tmp_path)
    spec = SparseSpec("local", 256, 1, 4)
    mine = generate(spec)
    store.put(mine)
    mine["kv_indices"].zero_()  # the caller keeps using its own tensors
    assert store.get(spec).equals(generate(spec))
    assert store.stats()["memory_hits"] == 1 and store.stats()["tampered"] == 0


def test_contains_evict_clear(tmp_path):
    store = PatternStore(tmp_path)
    a, b = SPECS[0], SPECS[1]
    store.get(a)
    store.get(b)
    assert store.contains(a) and store.contains(a.key)
    store.memory.evict(a.key)
    assert store.contains(a)  # still on disk
    assert store.evict(a) and not store.contains(a) and not store.evict(a)
    store.clear()
    assert not store.contains(b) and store.stats()["entries"] == 0 and store.disk.keys() == []


def test_stored_at_volume_and_size_limit(tmp_path):
    store = PatternStore(tmp_path, disk_size_limit=1 << 20)
    before = time.time()
    store.get(SPECS[-1])
    assert before <= store.disk.stored_at(SPECS[-1].key) <= time.time()
    assert store.disk.stored_at(SPECS[0].key) is None
    assert store.disk.volume() > 0 and store.disk.size_limit == 1 << 20


def test_directory_is_created_0700_and_default_directory_follows_the_env(tmp_path, monkeypatch):
    store = PatternStore(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").stat().st_mode & 0o777 == 0o700
    monkeypatch.setenv("PATTERNSTORE_DIR", str(tmp_path / "env"))
    monkeypatch.setattr(store_module, "_default", None)
    assert default_store() is default_store()
    assert default_store().directory == tmp_path / "env"
    assert PatternStore().directory == tmp_path / "env"
    assert store.directory != default_store().directory


def test_bad_arguments_raise_naming_the_field(tmp_path):
    with pytest.raises(ValueError, match="max_entries"):
        PatternStore(tmp_path, max_entries=-1)
    with pytest.raises(ValueError, match="lock_timeout"):
        PatternStore(tmp_path, lock_timeout=0)
    with pytest.raises(ValueError, match="lock_timeout"):
        PatternStore(tmp_path, lock_timeout=float("inf"))
    with pytest.raises(ValueError, match="disk_size_limit"):
        PatternStore(tmp_path, disk_size_limit=0)
    store = PatternStore(tmp_path)
    with pytest.raises(TypeError, match="spec"):
        store.get("dilated-v1-0000")
    with pytest.raises(TypeError, match="Pattern"):
        store.put(SPECS[0])


# ------------------------------------------------------------------ threads
def test_sixteen_threads_on_one_missing_key_generate_once(tmp_path, monkeypatch):
    calls = []

    def slow_generate(spec):
        calls.append(spec.key)
        time.sleep(0.2)  # long enough that every thread arrives while it runs
        return generate(spec)

    monkeypatch.setattr(store_module, "generate", slow_generate)
    store = PatternStore(tmp_path)
    spec = SparseSpec("bigbird", seq_len=8192, block_size=64, num_heads=4)
    barrier = threading.Barrier(16)
    results = [None] * 16

    def worker(i: int) -> None:
        barrier.wait()
        results[i] = store.get(spec)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [spec.key]
    assert all(r.equals(generate(spec)) for r in results)
    stats = store.stats()
    assert stats["generations"] == 1 and stats["misses"] == 1 and stats["memory_hits"] == 15


def test_clear_removes_the_lock_files_nobody_holds(tmp_path):
    import filelock

    store = PatternStore(tmp_path)
    for spec in SPECS[:3]:
        store.get(spec)
    locks = sorted((tmp_path / "locks").glob("*.lock"))
    assert [p.name for p in locks] == sorted(f"{s.key}.lock" for s in SPECS[:3])
    with filelock.FileLock(locks[0], timeout=1):  # another holder (its own open file)
        store.clear()
        assert sorted((tmp_path / "locks").glob("*.lock")) == [locks[0]]
    assert store.disk.keys() == [] and store.stats()["entries"] == 0
    store.get(SPECS[1])  # a cleared key's lock comes back with its next generation
    assert (tmp_path / "locks" / f"{SPECS[1].key}.lock").exists()


def test_a_held_lock_times_out_into_a_local_generation(tmp_path):
    import filelock

    store = PatternStore(tmp_path, lock_timeout=0.3)
    spec = SPECS[3]
    with filelock.FileLock(store.disk.lock_path(spec.key)):  # another "process" holds the key
        started = time.monotonic()
        pattern = store.get(spec)
        waited = time.monotonic() - started
    assert pattern.equals(generate(spec))
    assert 0.25 <= waited < 5
    assert store.stats()["lock_timeouts"] == 1 and store.stats()["generations"] == 1


# ------------------------------------------------------------------ tampering
def test_returned_arrays_changed_in_place_are_rebuilt_on_the_next_get(tmp_path):
    store = PatternStore(tmp_path)
    spec = SparseSpec("fixed", seq_len=2048, block_size=32, num_heads=2, different_layout_per_head=True)
    truth = generate(spec)
    first = store.get(spec)
    first["kv_indices"][0] = 12345
    second = store.get(spec)
    assert second.equals(truth) and second is not first
    second["kv_num_blocks"].mul_(2)
    assert store.get(spec).equals(truth)
    stats = store.stats()
    assert stats["tampered"] == 2 and stats["disk_hits"] == 2 and stats["generations"] == 1


def test_returned_device_copies_changed_in_place_are_copied_again(tmp_path):
    store = PatternStore(tmp_path)
    spec = SPECS[4]
    first = store.get(spec, "meta")
    assert store.get(spec, torch.device("meta")) is first
    first["kv_indices"].fill_(0)
    again = store.get(spec, "meta")
    assert again is not first and store.stats()["tampered"] == 1
    assert store.get(spec).equals(generate(spec))  # the CPU arrays were never touched


def test_memory_only_store_on_a_device_keeps_its_copy(tmp_path):
    store = PatternStore(tmp_path)
    spec = SPECS[2]
    first = store.get(spec, "meta")  # generated, kept, copied once
    assert store.memory.devices(spec.key) == [torch.device("meta")]
    assert store.get(spec, "meta") is first
    assert store.stats()["bytes"] == 2 * generate(spec).nbytes


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_get_copies_once(tmp_path):
    store = PatternStore(tmp_path)
    spec = SPECS[4]
    first = store.get(spec, "cuda")
    assert first.device.type == "cuda" and first.equals(generate(spec))
    assert store.get(spec, "cuda") is first
    assert store.get(spec, torch.device("cuda", torch.cuda.current_device())) is first


def test_disk_close_releases_connections_and_the_next_use_reopens(tmp_path):
    store = PatternStore(tmp_path)
    store.get(SPECS[0])
    store.disk.close()
    store.memory.clear()
    assert store.get(SPECS[0]).equals(REFERENCE[SPECS[0].key]) and store.stats()["disk_hits"] == 1


# ------------------------------------------------------------------ inside real PyTorch programs
SPARSE = SparseSpec("bigbird", seq_len=4096, block_size=64, num_heads=2, different_layout_per_head=True)


def held_version_is_counted(store: PatternStore, spec) -> None:
    """The held arrays are normal tensors: an in-place write outside any mode
    is noticed by the next get (counted in tampered) and rebuilt."""
    before = store.stats()["tampered"]
    store.get(spec)["kv_indices"][0] += 1
    assert store.get(spec).equals(generate(spec)) and store.stats()["tampered"] == before + 1


def test_inference_mode_on_a_cold_and_on_a_disk_warm_store(tmp_path):
    cold = PatternStore(tmp_path)
    with torch.inference_mode():
        pattern = cold.get(SPARSE)  # generate, encode, write, keep
        assert cold.get(SPARSE) is pattern  # memory hit
        on_meta = cold.get(SPARSE, "meta")  # a device copy, made in inference mode
    assert not any(t.is_inference() for t in (*pattern.arrays.values(), *on_meta.arrays.values()))
    assert pattern.equals(generate(SPARSE)) and cold.stats()["generations"] == 1
    held_version_is_counted(cold, SPARSE)

    warm = PatternStore(tmp_path)
    with torch.inference_mode():
        assert warm.get(SPARSE).equals(generate(SPARSE))  # decoded from disk
        other = SparseSpec("fixed", seq_len=1024, block_size=32, num_heads=2)
        made = generate(other)  # inference tensors, handed to put
        warm.put(made)
        assert warm.get(other).equals(made)
    assert warm.stats()["disk_hits"] == 1 and warm.stats()["memory_hits"] == 1
    held_version_is_counted(warm, SPARSE)


def test_fake_tensor_mode_lookups_give_real_tensors_cold_and_warm(tmp_path):
    """What torch.export (non-strict) runs a module's forward under: the
    lookup generates, encodes and writes (cold) or decodes (warm) real
    tensors and never reads a fake tensor's data."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    cold = PatternStore(tmp_path)
    with FakeTensorMode():
        pattern = cold.get(SPARSE)
        assert cold.get(SPARSE) is pattern
        meta = cold.get(SPARSE, "meta")
    warm = PatternStore(tmp_path)
    with FakeTensorMode():
        decoded = warm.get(SPARSE)
    for found in (pattern, meta, decoded):
        assert not any(isinstance(t, FakeTensor) for t in found.arrays.values())
    assert pattern.equals(generate(SPARSE)) and decoded.equals(generate(SPARSE))
    assert cold.stats()["generations"] == 1 and warm.stats()["disk_hits"] == 1
    held_version_is_counted(warm, SPARSE)


class Gather(torch.nn.Module):
    """A module whose forward looks its layout up, as the attention modules do."""

    def __init__(self, store: PatternStore) -> None:
        super().__init__()
        self.store = store

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        indices = self.store.get(SPARSE)["kv_indices"][:8].long()
        return x.index_select(1, indices) * 2


def test_torch_export_of_a_module_that_looks_up_a_cold_store(tmp_path):
    store = PatternStore(tmp_path)
    x = torch.randn(2, 64)
    program = torch.export.export(Gather(store), (x,))
    assert store.stats()["generations"] == 1
    expected = x[:, generate(SPARSE)["kv_indices"][:8].long()] * 2
    torch.testing.assert_close(program.module()(x), expected, rtol=0, atol=0)


def test_stores_pickle_and_deepcopy_as_their_directory(tmp_path):
    import copy
    import pickle

    store = PatternStore(tmp_path / "a", max_entries=7, lock_timeout=5.0)
    store.get(SPARSE)
    assert pickle.loads(pickle.dumps(store)) is store  # this process's store for that directory
    assert copy.deepcopy(store) is store
    module = Gather(store)
    assert copy.deepcopy(module).store is store
    assert store_module.store_for(tmp_path / "a") is store
    assert store_module.store_for(tmp_path / "a" / ".." / "a") is store
    assert store_module.store_for(None) is default_store()
    fresh = store_module.store_for(tmp_path / "b", max_entries=3)
    assert fresh.directory == tmp_path / "b" and fresh.memory.max_entries == 3


UNPICKLE_CHILD = """
import pickle, sys
from patternstore import SparseSpec, generate
store = pickle.loads(sys.stdin.buffer.read())
spec = SparseSpec("bigbird", seq_len=4096, block_size=64, num_heads=2, different_layout_per_head=True)
assert store.get(spec).equals(generate(spec))
print(store.directory, store.memory.max_entries, store.lock_timeout, store.stats()["disk_hits"])
"""


def test_a_pickled_store_opens_its_directory_in_a_fresh_process(tmp_path):
    import os
    import pickle
    import subprocess
    import sys

    store = PatternStore(tmp_path, max_entries=7, lock_timeout=5.0)
    store.get(SPARSE)
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", UNPICKLE_CHILD], input=pickle.dumps(store), env=env,
                         capture_output=True, check=True, timeout=120).stdout.decode().split()
    assert out == [str(tmp_path), "7", "5.0", "1"]
