"""The one bounded cache (``attention.caches.BoundedCache``) against a model
of an LRU, and ``attention.clear_caches`` emptying every process-wide cache
that a dilated, block-sparse, fused-flex and Hugging Face decode call fills."""

from __future__ import annotations

import ast
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attention
import attention.dilated.residue_layout as residue_module
import attention.sparse.layouts as sparse_layouts
from attention import BlockSparseAttention, DilatedAttention
from attention.caches import BoundedCache, process_cache
from attention.dilated.flex import residue_block_mask
from attention.dilated.residue_layout import residue_layout

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5), st.lists(st.tuples(st.booleans(), st.integers(0, 8)), max_size=60))
def test_bounded_cache_is_an_lru_of_its_limit(limit, operations):
    cache: BoundedCache[int] = BoundedCache(limit)
    model: OrderedDict[int, int] = OrderedDict()
    for step, (is_put, key) in enumerate(operations):
        if is_put:
            kept = cache.put(key, step)
            if key not in model:
                model[key] = step
            model.move_to_end(key)
            while len(model) > limit:
                model.popitem(last=False)
            assert kept == model[key]  # the first value stored under a key stays
        else:
            assert cache.get(key) == model.get(key)
            if key in model:
                model.move_to_end(key)
        assert len(cache) == len(model) <= limit
        assert all(k in cache for k in model)


@pytest.mark.parametrize("limit", [0, -1, 1.5, True, None])
def test_bounded_cache_refuses_a_bad_limit(limit):
    with pytest.raises(ValueError, match="limit must be an int >= 1"):
        BoundedCache(limit)


def test_clear_caches_empties_every_process_wide_cache():
    import attention.hf.decode as hf_decode

    q = torch.randn(1, 64, 2, 8)
    DilatedAttention([16, 32], [1, 2], implementation="fast")(q, q, q)
    BlockSparseAttention("bigbird", block_size=16, num_random_blocks=1)(q, q, q)
    plan = DilatedAttention([16, 32], [1, 2]).plan(2)
    residue_block_mask(plan, 64, 16, False, True, torch.device("cpu"))
    mine = process_cache(2)
    mine.put("x", 1)
    hf_decode._tables.put("probe", (q, q))
    assert len(sparse_layouts.SOURCES) and residue_block_mask.cache_info().currsize
    assert residue_layout(plan, 64, 16, False) is not None
    attention.clear_caches()
    assert len(sparse_layouts.SOURCES) == 0 and len(mine) == 0 and len(hf_decode._tables) == 0
    assert residue_block_mask.cache_info().currsize == 0
    assert residue_module._layout.cache_info().currsize == 0


def test_every_module_level_cache_is_registered():
    """A module-level ``BoundedCache(...)`` (not ``process_cache``) or an
    ``lru_cache`` without ``register_cached_function`` would escape
    ``clear_caches``."""
    wrong = []
    for path in sorted((ROOT / "attention").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Call):
                if getattr(node.value.func, "id", None) == "BoundedCache":
                    wrong.append(f"{path.name}: module-level BoundedCache (use process_cache)")
            if isinstance(node, ast.FunctionDef):
                names = [ast.unparse(d) for d in node.decorator_list]
                cached = any("lru_cache" in n for n in names)
                if cached and "register_cached_function" not in names:
                    wrong.append(f"{path.name}: {node.name} is lru_cached but not registered")
    assert not wrong, "\n".join(wrong)
