"""MemoryTier: bounds, LRU order, re-put, per-device copies, tamper detection.

The LRU against an independent model runs through the whole store in
test_store.py (state machine); here are the tier's own edges. Device copies
use the ``meta`` device, which every torch build has.
"""

from __future__ import annotations

import random
import threading

import pytest
import torch

from patternstore import SparseSpec, generate
from patternstore.memory import MemoryTier, exact_device


def sized(n: int) -> SparseSpec:
    """A causal local layout of n one-position blocks: nbytes = 12 * n - 4
    (n counts, 2n - 1 entries), so n sets the size."""
    return SparseSpec("local", n, 1)


def pattern(n: int):
    return generate(sized(n))


def test_bounds_by_entries_and_bytes_evict_least_recent_first():
    a, b, c, d = pattern(16), pattern(32), pattern(48), pattern(64)
    tier = MemoryTier(max_entries=3, max_bytes=10_000)
    for p in (a, b, c):
        tier.put(p)
    assert tier.get(a.key) is not None  # a becomes the most recent
    tier.put(d)  # over max_entries: b, the least recent, goes
    assert tier.keys() == [c.key, a.key, d.key]
    assert tier.evictions == 1

    tier = MemoryTier(max_entries=10, max_bytes=c.nbytes + d.nbytes + 10)
    for p in (a, b, c):
        tier.put(p)  # 104 + 168 + 232 bytes
    tier.put(d)  # + 296: a, then b (the oldest) go; c and d fit
    assert tier.keys() == [c.key, d.key]
    assert tier.nbytes == c.nbytes + d.nbytes
    assert tier.evictions == 2


def test_reput_of_a_held_key_never_evicts_another_entry():
    a, b = pattern(16), pattern(32)
    tier = MemoryTier(max_entries=2, max_bytes=a.nbytes + b.nbytes)
    held_a = tier.put(a)
    tier.put(b)
    again = tier.put(generate(a.spec))  # equal content, other tensors
    assert again is held_a
    assert tier.keys() == [b.key, a.key]  # recency refreshed
    assert tier.evictions == 0 and len(tier) == 2


def test_a_pattern_larger_than_max_bytes_is_served_not_kept():
    big = pattern(1024)
    tier = MemoryTier(max_entries=4, max_bytes=big.nbytes - 1)
    small = pattern(16)
    tier.put(small)
    served = tier.put(big)
    assert served.equals(big)
    assert tier.keys() == [small.key] and tier.evictions == 0
    assert MemoryTier(max_entries=0).put(small).equals(small)


def test_put_copies_so_the_callers_tensors_do_not_alias_the_held_ones():
    tier = MemoryTier()
    mine = pattern(64)
    held = tier.put(mine)
    mine["kv_indices"].zero_()
    assert tier.get(mine.key) is held and held.equals(pattern(64)) and tier.tampered == 0


def test_held_arrays_cannot_be_swapped_out():
    tier = MemoryTier()
    held = tier.put(pattern(16))
    with pytest.raises(TypeError):
        held.arrays["kv_indices"] = torch.zeros(16, dtype=torch.int32)


def test_in_place_change_of_a_held_array_drops_the_entry():
    tier = MemoryTier()
    held = tier.put(pattern(64))
    held["kv_indices"].add_(1)
    assert tier.get(held.key) is None
    assert tier.tampered == 1 and len(tier) == 0 and tier.nbytes == 0
    # Writing through a view bumps the shared version counter too.
    held = tier.put(pattern(64))
    held["kv_indices"][3:5] = 7
    assert tier.get(held.key) is None and tier.tampered == 2


def test_reput_replaces_a_tampered_entry():
    tier = MemoryTier()
    held = tier.put(pattern(64))
    held["kv_num_blocks"].zero_()
    fresh = tier.put(pattern(64))
    assert fresh is not held and fresh.equals(pattern(64))
    assert tier.tampered == 1 and tier.nbytes == fresh.nbytes


def test_device_copies_are_cached_per_device_counted_and_evicted_with_their_entry():
    p = pattern(256)
    meta = torch.device("meta")
    tier = MemoryTier(max_entries=4, max_bytes=10 * p.nbytes)
    tier.put(p)
    on_meta = tier.get(p.key, meta)
    assert on_meta.device == meta
    assert tier.get(p.key, meta) is on_meta  # steady state: no new copy
    assert tier.devices(p.key) == [meta]
    assert tier.nbytes == 2 * p.nbytes
    assert tier.evict(p.key) and tier.nbytes == 0 and tier.devices(p.key) == []


def test_a_device_copy_makes_room_by_evicting_least_recent_entries():
    a, b = pattern(256), pattern(512)
    tier = MemoryTier(max_entries=4, max_bytes=2 * b.nbytes + a.nbytes - 1)
    tier.put(a)
    tier.put(b)
    tier.get(b.key, torch.device("meta"))  # b + copy + a = 2 * b + a > bound
    assert tier.keys() == [b.key] and tier.evictions == 1
    assert tier.nbytes == 2 * b.nbytes


def test_a_device_copy_that_cannot_fit_beside_its_entry_is_served_uncached():
    p = pattern(256)
    tier = MemoryTier(max_entries=4, max_bytes=p.nbytes + 10)
    tier.put(p)
    first = tier.get(p.key, torch.device("meta"))
    assert first.device.type == "meta"
    assert tier.devices(p.key) == [] and tier.nbytes == p.nbytes


def test_a_tampered_device_copy_is_copied_again():
    p = pattern(64)
    meta = torch.device("meta")
    tier = MemoryTier()
    tier.put(p)
    first = tier.get(p.key, meta)
    first["kv_indices"].add_(1)  # meta tensors keep version counters too
    second = tier.get(p.key, meta)
    assert second is not first
    assert tier.tampered == 1 and tier.nbytes == 2 * p.nbytes


def test_exact_device(monkeypatch):
    assert exact_device(None) is None
    assert exact_device("cpu") is None and exact_device(torch.device("cpu")) is None
    assert exact_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert exact_device("cuda") == torch.device("cuda", 1)  # "cuda" means the current one
    assert exact_device("cuda") != torch.device("cuda", 0)
    assert exact_device("meta") == torch.device("meta")


def test_bad_bounds_name_the_field():
    with pytest.raises(ValueError, match="max_entries"):
        MemoryTier(max_entries=-1)
    with pytest.raises(TypeError, match="max_bytes"):
        MemoryTier(max_bytes=1.5)


def test_threads_keep_the_accounting_exact():
    patterns = [pattern(16 * (i + 1)) for i in range(12)]
    tier = MemoryTier(max_entries=5, max_bytes=sum(p.nbytes for p in patterns) // 3)
    failures = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(400):
            p = rng.choice(patterns)
            op = rng.random()
            if op < 0.5:
                got = tier.get(p.key)
                if got is not None and not got.equals(p):
                    failures.append(p.key)
            elif op < 0.9:
                tier.put(generate(p.spec))
            else:
                tier.evict(p.key)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    held = {p.key: p.nbytes for p in patterns}
    assert len(tier) <= 5 and tier.nbytes <= tier.max_bytes
    assert tier.nbytes == sum(held[k] for k in tier.keys())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_copies_are_per_exact_device():
    p = pattern(1024)
    tier = MemoryTier()
    tier.put(p)
    current = exact_device("cuda")
    first = tier.get(p.key, current)
    assert first.device == current and first.equals(p)
    assert tier.get(p.key, exact_device(f"cuda:{current.index}")) is first
    if torch.cuda.device_count() > 1:
        other = torch.device("cuda", 1 - current.index if current.index < 2 else 0)
        assert tier.get(p.key, other) is not first
        assert tier.get(p.key, other).device == other
