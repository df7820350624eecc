"""Generation cost known from the spec (``patternstore.cost``): the estimate
bounds what a generation really allocates (counted op by op with a dispatch
mode, not timed); a spec above the limit is refused before any work by
``generate``, the store and the modules alike; and a ``dilated_blocks`` spec
costs what its layout costs however often it repeats a branch, with the
layout of the definition (a dense, loop-based reference)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from patternstore import DilatedSpec, SparseSpec, generate
from patternstore.cost import (
    DEFAULT_MAX_GENERATION_BYTES, MAX_GENERATION_BYTES_ENV, SpecTooLarge, generation_cost, max_generation_bytes,
)
from patternstore.fields import INT32_MAX
from patternstore.kinds import SPARSE_KINDS, dilated_block_branches
from patternstore.layouts import LAYOUT_BUILDERS
from patternstore.store import PatternStore
from strategies import dilated_specs, sparse_specs
from test_generate import dense_of, reference_layout


class Allocated(TorchDispatchMode):
    """Counts the bytes of every fresh storage an op returns (views and
    in-place results share an input's storage and are not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                self.bytes += t.untyped_storage().nbytes()
        return out


def allocated(spec) -> tuple[int, object]:
    with Allocated() as counter:
        pattern = generate(spec)
    return counter.bytes, pattern


# ------------------------------------------------------------------ the estimate bounds the real cost
@settings(max_examples=120, deadline=None)
@given(sparse_specs(max_blocks=512, max_heads=8) | dilated_specs())
def test_the_estimate_bounds_what_generation_allocates_and_returns(spec):
    cost = generation_cost(spec)
    used, pattern = allocated(spec)
    assert used <= cost.written and pattern.nbytes <= cost.layout


LARGE = [  # each kind at a size where its arrays, not the fixed allowance, dominate
    SparseSpec("dense", 1 << 16, 64, attention="unidirectional"),
    SparseSpec("fixed", 1 << 18, 128, num_local_blocks=4, horizontal_global_attention=True),
    SparseSpec("bigbird", 1 << 16, 64, 4, num_random_blocks=16, different_layout_per_head=True),
    SparseSpec("bslongformer", 1 << 16, 16, 2, global_block_indices=(0, 100), global_block_end_indices=(50, 400)),
    SparseSpec("variable", 1 << 16, 32, num_random_blocks=8, local_window_blocks=(4, 64)),
    SparseSpec("local", 1 << 20, 16, num_sliding_window_blocks=33),
    SparseSpec("dilated_blocks", 1 << 14, 16, 8, segment_lengths=(256, 64), dilation_rates=(2, 4)),
]


@pytest.mark.parametrize("spec", LARGE, ids=[s.kind for s in LARGE])
def test_the_estimate_is_within_a_few_times_the_real_cost(spec):
    """A bound much looser than the cost would refuse specs far below the limit."""
    used, _ = allocated(spec)
    assert used <= generation_cost(spec).written <= 4 * used


def test_every_sparse_kind_has_a_cost():
    for name in SPARSE_KINDS:  # one table per concept: the builders, the kinds and the costs agree
        assert name in LAYOUT_BUILDERS
        spec = SparseSpec(name, 256, 16)
        assert generation_cost(spec).written >= allocated(spec)[0]


# ------------------------------------------------------------------ refused before any work
HUGE_DENSE = SparseSpec("dense", INT32_MAX, 1)


def test_a_spec_too_large_is_refused_before_any_work_with_estimate_fields_and_limit():
    with Allocated() as counter, pytest.raises(SpecTooLarge) as refused:
        generate(HUGE_DENSE)
    assert counter.bytes == 0  # not one array was made
    message = str(refused.value)
    assert isinstance(refused.value, ValueError) and "\n" not in message
    assert "dense spec too large to generate: an estimated" in message
    assert f"{INT32_MAX} blocks (seq_len={INT32_MAX}, block_size=1)" in message
    assert "the limit is 4.0 GiB" in message and MAX_GENERATION_BYTES_ENV in message


def test_dilated_head_groups_are_bounded_too():
    with Allocated() as counter, pytest.raises(SpecTooLarge, match=r"head groups \(num_heads=2147483647"):
        generate(DilatedSpec((INT32_MAX,), (INT32_MAX,), INT32_MAX))  # 2**31 loop steps if not refused
    assert counter.bytes == 0


def test_the_limit_is_a_keyword_an_environment_variable_or_the_default(monkeypatch):
    spec = SparseSpec("dense", 4096, 16)  # 256 blocks: a few MiB
    written = generation_cost(spec).written
    monkeypatch.delenv(MAX_GENERATION_BYTES_ENV, raising=False)
    assert max_generation_bytes() == DEFAULT_MAX_GENERATION_BYTES == 4 << 30
    with pytest.raises(SpecTooLarge, match=r"the limit is 1\.0 MiB"):
        generate(spec, max_bytes=1 << 20)
    monkeypatch.setenv(MAX_GENERATION_BYTES_ENV, "1MiB")
    with pytest.raises(SpecTooLarge, match=r"the limit is 1\.0 MiB"):
        generate(spec)
    at_limit = generate(spec, max_bytes=written)  # the keyword wins over the environment
    monkeypatch.setenv(MAX_GENERATION_BYTES_ENV, str(written))
    assert torch.equal(generate(spec)["kv_indices"], at_limit["kv_indices"])
    with pytest.raises(SpecTooLarge):
        generate(spec, max_bytes=written - 1)


def test_a_bad_limit_setting_names_the_variable(monkeypatch):
    for text in ("lots", "0", "-5", "4 GB", "1.5GiB"):
        monkeypatch.setenv(MAX_GENERATION_BYTES_ENV, text)
        with pytest.raises(ValueError, match=rf"{MAX_GENERATION_BYTES_ENV} must be a size >= 1 byte"):
            generate(SparseSpec("local", 64, 16))


def test_the_store_refuses_and_keeps_nothing(tmp_path, monkeypatch):
    store = PatternStore(tmp_path / "store")
    with pytest.raises(SpecTooLarge):
        store.get(HUGE_DENSE)
    assert store.stored_keys() == [] and store.stats()["generations"] == 0
    monkeypatch.setenv(MAX_GENERATION_BYTES_ENV, "1KiB")
    with pytest.raises(SpecTooLarge, match="the limit is 1.0 KiB"):
        store.get(SparseSpec("local", 1024, 16))


def test_the_modules_refuse_alike(tmp_path, monkeypatch):
    from attention import BlockSparseAttention

    monkeypatch.setenv(MAX_GENERATION_BYTES_ENV, "1MiB")
    module = BlockSparseAttention("dense", block_size=16, store=PatternStore(tmp_path / "store"))
    q = torch.randn(1, 4096, 1, 8)  # 256 blocks: a dense layout over the 1 MiB limit
    with pytest.raises(SpecTooLarge, match="dense spec too large to generate"):
        module(q, q, q)


# ------------------------------------------------------------------ repeated branches cost the layout
@settings(max_examples=150, deadline=None)
@given(
    nb=st.integers(1, 24), heads=st.integers(1, 4), causal=st.booleans(),
    branches=st.lists(st.tuples(st.integers(1, 30), st.integers(1, 6)), min_size=1, max_size=4),
    repeats=st.lists(st.integers(0, 3), min_size=4, max_size=4), multiples=st.lists(st.integers(2, 4), max_size=3),
)
def test_repeated_and_covered_branches_give_the_layout_of_the_definition(nb, heads, causal, branches, repeats,
                                                                        multiples):
    """Repeats, and branches that others cover (segment a multiple, same rate), are dropped; the layout
    is still the dense definition's (``reference_layout`` walks every branch the spec lists)."""
    branches = [(max(w, r), r) for w, r in branches]
    spelled = [b for b, n in zip(branches, repeats) for _ in range(1 + n)]
    spelled += [(w * m, r) for (w, r), m in zip(branches, multiples)]  # each covers a listed branch
    spec = SparseSpec("dilated_blocks", nb, 1, heads, segment_lengths=[w for w, _ in spelled],
                      dilation_rates=[r for _, r in spelled],
                      attention="unidirectional" if causal else "bidirectional")
    assert torch.equal(dense_of(generate(spec)), reference_layout(spec))


@pytest.mark.parametrize("repeats", [40, 100])
def test_a_branch_repeated_many_times_costs_what_the_layout_costs(repeats):
    once = SparseSpec("dilated_blocks", 1 << 14, 16, 8, segment_lengths=(256,), dilation_rates=(2,))
    many = SparseSpec("dilated_blocks", 1 << 14, 16, 8, segment_lengths=(256,) * repeats + (64,),
                      dilation_rates=(2,) * repeats + (2,))  # (64, 2) lies inside (256, 2)
    assert dilated_block_branches(many.params, many.num_blocks) == [(256, 2)]
    (used_once, one), (used_many, other) = allocated(once), allocated(many)
    assert used_many == used_once  # not one array more
    assert generation_cost(many).written == generation_cost(once).written
    assert all(torch.equal(one[n], other[n]) for n in ("kv_num_blocks", "kv_indices"))
