"""Specs: validation messages and content-addressed keys (docs/design.md section 3.1)."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from patternstore import generate
from patternstore.kinds import SPARSE_KINDS
from patternstore.specs import SPARSE_BASE_FIELDS, DilatedSpec, SparseSpec, canonical_key, spec_from_dict
from strategies import any_spec

REPO = Path(__file__).resolve().parents[1]
KEY_EXAMPLES = settings(max_examples=500, deadline=None)


def _rebuild(spec, **changes):
    data = spec.to_dict()
    data.update(changes)
    return spec_from_dict(data)


# ------------------------------------------------------------------ key properties
@KEY_EXAMPLES
@given(any_spec, st.data())
def test_changing_any_one_field_changes_the_key(spec, data):
    fields = spec.fields()
    name = data.draw(st.sampled_from(sorted(fields)))
    value = fields[name]
    if isinstance(value, bool):
        new = not value
    elif isinstance(value, int):
        new = value + data.draw(st.sampled_from([-1, 1, 7]))
    elif isinstance(value, tuple):
        new = value + (value[-1],) if data.draw(st.booleans()) else tuple(v + 1 for v in value)
    elif value is None:
        new = tuple(i + 1 for i in fields["global_block_indices"])
    else:
        new = data.draw(st.sampled_from(["longnet", "grouped", "bidirectional", "unidirectional"]))
    try:
        changed = _rebuild(spec, **{name: new})
    except (TypeError, ValueError):
        assume(False)  # the change made the spec invalid: nothing to compare
    assume(changed.fields() != fields)
    assert changed.key != spec.key


@KEY_EXAMPLES
@given(any_spec, any_spec)
def test_keys_are_equal_exactly_when_specs_are(a, b):
    assert (a.key == b.key) == (a.to_dict() == b.to_dict())
    assert (a == b) == (a.key == b.key)


@KEY_EXAMPLES
@given(any_spec, st.randoms(use_true_random=False))
def test_lists_tuples_and_keyword_order_do_not_change_the_key(spec, rng):
    data = spec.to_dict()
    kind = data.pop("kind")
    as_lists = {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}
    names = list(as_lists)
    rng.shuffle(names)
    reordered = {n: as_lists[n] for n in names}
    rebuilt = spec_from_dict({"kind": kind, **reordered})
    assert rebuilt.key == spec.key
    assert rebuilt == spec and hash(rebuilt) == hash(spec)


@KEY_EXAMPLES
@given(
    st.floats(allow_nan=False, allow_infinity=True, width=64),
    st.floats(allow_nan=False, allow_infinity=True, width=64),
)
def test_float_fields_hash_by_exact_value(x, y):
    assert (canonical_key("t", 1, {"x": x}) == canonical_key("t", 1, {"x": y})) == (
        x == y and str(x) == str(y)  # 0.0 and -0.0 are different bit patterns
    )


def test_float_examples_from_the_issue_and_type_distinctions():
    assert canonical_key("t", 1, {"x": 0.12341}) != canonical_key("t", 1, {"x": 0.12349})
    keys = {canonical_key("t", 1, {"x": v}) for v in (1, 1.0, True, "1", (1,))}
    assert len(keys) == 5
    assert canonical_key("t", 1, {"x": 1}) != canonical_key("t", 2, {"x": 1})
    assert canonical_key("t", 1, {"x": 1}) != canonical_key("u", 1, {"x": 1})


def test_key_is_readable_and_stable():
    spec = DilatedSpec(segment_lengths=(2048, 4096), dilation_rates=(1, 2), num_heads=8)
    assert spec.key.startswith("dilated-v2-") and len(spec.key) == len("dilated-v2-") + 40
    sparse = SparseSpec("bigbird", seq_len=4096, block_size=64, num_heads=8)
    assert sparse.key.startswith("bigbird-v2-")
    # spelled-out defaults equal implicit ones
    assert SparseSpec("bigbird", 4096, 64, 8, num_random_blocks=1, attention="bidirectional") == sparse


_KEY_SCRIPT = """
import json, sys
from patternstore.specs import spec_from_dict
print(json.dumps([spec_from_dict(d).key for d in json.loads(sys.stdin.read())]))
"""


def test_keys_are_the_same_in_processes_with_other_hash_seeds():
    specs = [
        DilatedSpec((2048, 4096, 8192), (1, 2, 4), 8),
        DilatedSpec([7], [3], 5, scheme="grouped"),
        SparseSpec("bigbird", 1 << 20, 128, 8, seed=7, num_random_blocks=2),
        SparseSpec("variable", 5000, 16, 4, local_window_blocks=[4, 2], global_block_indices=[0, 3]),
        SparseSpec("fixed", 2048, 32, 2, attention="unidirectional"),
    ]
    payload = json.dumps([s.to_dict() for s in specs])
    for seed in ("0", "12345", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
        out = subprocess.run(
            [sys.executable, "-c", _KEY_SCRIPT], input=payload, env=env,
            capture_output=True, text=True, check=True,
        )
        assert json.loads(out.stdout) == [s.key for s in specs]


def test_specs_are_immutable_and_picklable():
    spec = SparseSpec("local", 1024, 32)
    with pytest.raises(AttributeError):
        spec.seq_len = 5
    with pytest.raises(TypeError):
        spec.params["attention"] = "bidirectional"
    dilated = DilatedSpec([10], [2], 2)
    with pytest.raises(AttributeError):
        dilated.num_heads = 5
    for s in (spec, dilated):
        assert pickle.loads(pickle.dumps(s)).key == s.key


# ------------------------------------------------------------------ bad input
DILATED_OK = dict(segment_lengths=(16, 32), dilation_rates=(1, 2), num_heads=4)
BAD_DILATED = [
    (dict(num_heads=-3), ValueError, "num_heads"),
    (dict(num_heads=4.0), TypeError, "num_heads"),
    (dict(num_heads=0), ValueError, "num_heads"),
    (dict(num_heads=False), TypeError, "num_heads"),
    (dict(segment_lengths=(16, 0)), ValueError, "segment_lengths[1]"),
    (dict(segment_lengths=()), ValueError, "segment_lengths"),
    (dict(segment_lengths=16), TypeError, "segment_lengths"),
    (dict(segment_lengths=(16, True)), TypeError, "segment_lengths[1]"),
    (dict(dilation_rates=(1, 0)), ValueError, "dilation_rates[1]"),
    (dict(dilation_rates=(1, 2, 4)), ValueError, "same length"),
    (dict(dilation_rates=(1, 64)), ValueError, "dilation_rates[1]=64 is larger than its segment"),
    (dict(scheme="flash"), ValueError, "scheme must be one of 'longnet', 'grouped'"),
    (dict(scheme="grouped", num_heads=1), ValueError, "num_heads >= number of branches"),
]


@pytest.mark.parametrize("change, error, message", BAD_DILATED)
def test_bad_dilated_specs_name_the_field(change, error, message):
    with pytest.raises(error, match=re.escape(message)):
        DilatedSpec(**{**DILATED_OK, **change})


BAD_SPARSE = [
    (("bigbird",), dict(seq_len=0), ValueError, "seq_len"),
    (("bigbird",), dict(block_size=48), ValueError, "block_size must be a power of two"),
    (("bigbird",), dict(block_size=0), ValueError, "block_size"),
    (("bigbird",), dict(block_size=True), TypeError, "block_size"),
    (("bigbird",), dict(num_heads=-1), ValueError, "num_heads"),
    (("bigbird",), dict(seed=-1), ValueError, "seed"),
    (("bigbird",), dict(seed=2**63), ValueError, "seed must be an int in [0, 9223372036854775807]"),
    (("bigbird",), dict(seq_len=2**64), ValueError, "seq_len must be an int in [1, 2147483647], got 18446744073709551616"),
    (("bigbird",), dict(num_heads=10**5000), ValueError, "num_heads must be an int in [1, 2147483647], got an int of 16610 bits"),
    (("bigbird",), dict(num_random_blocks=17), ValueError, "num_random_blocks must be <= the number of blocks (16)"),
    (("bigbird",), dict(num_random_blocks=True), TypeError, "num_random_blocks"),
    (("bigbird",), dict(num_random_blocks=-1), ValueError, "num_random_blocks"),
    (("bigbird",), dict(window=3), ValueError, "unknown parameter(s) window for kind 'bigbird'; valid parameters: attention, different_layout_per_head"),
    (("bigbird",), dict(attention="causal"), ValueError, "attention must be one of 'bidirectional', 'unidirectional'"),
    (("bigbird",), dict(different_layout_per_head=1), TypeError, "different_layout_per_head must be True or False"),
    (("longformer",), dict(), ValueError, "kind must be one of 'dense', 'fixed', 'bigbird'"),
    (("fixed",), dict(num_local_blocks=4, num_global_blocks=3), ValueError, "num_local_blocks (4) must be a multiple of num_global_blocks (3)"),
    (("fixed",), dict(num_different_global_patterns=2), ValueError, "different_layout_per_head=True"),
    (("fixed",), dict(num_different_global_patterns=5, different_layout_per_head=True), ValueError, "num_different_global_patterns must be <= "),
    (("fixed",), dict(horizontal_global_attention=True, attention="unidirectional"), ValueError, "horizontal_global_attention"),
    (("bslongformer",), dict(global_block_end_indices=[1, 2]), ValueError, "global_block_end_indices must have one entry"),
    (("variable",), dict(global_block_indices=[3], global_block_end_indices=[3]), ValueError, "global_block_end_indices[0]=3 must be > global_block_indices[0]=3"),
    (("variable",), dict(local_window_blocks=[4, 0]), ValueError, "local_window_blocks[1]"),
    (("dilated_blocks",), dict(segment_lengths=[4], dilation_rates=[8]), ValueError, "dilation_rates[0]=8 is larger than its segment segment_lengths[0]=4 blocks"),
    (("dilated_blocks",), dict(segment_lengths=[4, 8], dilation_rates=[1]), ValueError, "same length"),
]


@pytest.mark.parametrize("args, change, error, message", BAD_SPARSE)
def test_bad_sparse_specs_name_the_field(args, change, error, message):
    kwargs = {"seq_len": 1024, "block_size": 64, "num_heads": 4, **change}
    with pytest.raises(error, match=re.escape(message)):
        SparseSpec(*args, **kwargs)


def test_spec_from_dict_rejects_unknown_kinds():
    with pytest.raises(ValueError, match="kind must be 'dilated' or one of"):
        spec_from_dict({"kind": "nope", "seq_len": 3})


def test_dilated_specs_hold_no_length():
    """Contract 1: one dilated spec serves every length, so it has no seq_len."""
    with pytest.raises(TypeError, match="seq_len"):
        DilatedSpec(seq_len=64, segment_lengths=(16,), dilation_rates=(1,), num_heads=2)  # type: ignore[call-arg]
    assert "seq_len" not in DilatedSpec((16,), (1,), 2).fields()


def test_every_consumer_reads_the_kind_registry():
    """A sparse kind is one entry of SPARSE_KINDS: the spec, the generator, the
    spec text grammar and the command line's help all come from it."""
    from patternstore import generate
    from patternstore.cli import GRAMMAR
    from patternstore.kinds import SPARSE_KINDS
    from patternstore.spectext import KINDS, LIST_FIELDS, format_spec, kind_fields, parse_spec

    for name, kind in SPARSE_KINDS.items():
        assert name in KINDS and f"{name:<15}{kind.help}"[:40] in GRAMMAR.replace("\n", " ")
        allowed, required = kind_fields(name)
        assert set(allowed) == {"seq_len", "block_size", "num_heads", "seed"} | {f.name for f in kind.params}
        assert required == ("seq_len", "block_size")
        assert {f.name for f in kind.params if f.is_list} <= LIST_FIELDS
        spec = SparseSpec(name, 256, 16, 2)
        assert dict(spec.params) == {f.name: f.default for f in kind.params}
        assert parse_spec(format_spec(spec, defaults=False)) == spec
        assert generate(spec)["kv_num_blocks"].shape == (spec.layout_heads, 16)
    from patternstore.layouts import LAYOUT_BUILDERS

    assert LAYOUT_BUILDERS.keys() == SPARSE_KINDS.keys()  # one builder per kind, same names


# ------------------------------------------------------------------ ranges
INT32_MAX = 2**31 - 1
# Every int field of every kind, at its upper bound + 1 and at 2**64 (which
# msgpack cannot pack): refused at construction, naming the field.
INT_FIELDS = [("dilated", name) for name in ("num_heads", "segment_lengths", "dilation_rates")] + [
    (kind, f.name) for kind in sorted(SPARSE_KINDS)
    for f in (*SPARSE_BASE_FIELDS, *SPARSE_KINDS[kind].params)
    if hasattr(f.check, "maximum")
]


def _with(kind: str, name: str, value: int):
    if kind == "dilated":
        fields = {**DILATED_OK, name: (value, value) if name != "num_heads" else value}
        return DilatedSpec(**fields)
    is_list = name in ("global_block_indices", "global_block_end_indices", "local_window_blocks",
                       "segment_lengths", "dilation_rates")
    return SparseSpec(kind, **{"seq_len": 1024, "block_size": 64, name: (value,) if is_list else value})


@pytest.mark.parametrize("kind, name", INT_FIELDS)
def test_every_int_field_has_a_range_checked_at_construction(kind, name):
    maximum = 2**63 - 1 if name == "seed" else (1 << 30 if name == "block_size" else INT32_MAX)
    for value in (maximum + 1, 2**64, 10**40):
        with pytest.raises(ValueError, match=rf"{name}(\[\d\])? must be an int in \[\d, {maximum}\]"):
            _with(kind, name, value)


def test_the_largest_seed_and_sizes_build_keys():
    assert SparseSpec("bigbird", INT32_MAX, 1 << 30, seed=2**63 - 1).key.startswith("bigbird-v2-")
    assert DilatedSpec((INT32_MAX,), (INT32_MAX,), INT32_MAX).key.startswith("dilated-v2-")


@pytest.mark.parametrize("kind", ["bigbird", "variable"])
def test_random_blocks_beyond_the_row_are_refused_and_a_full_row_is_not(kind):
    with pytest.raises(ValueError, match=r"num_random_blocks must be <= the number of blocks \(16\)"):
        SparseSpec(kind, 256, 16, num_random_blocks=17)
    pattern = generate(SparseSpec(kind, 256, 16, num_random_blocks=16))
    assert pattern["kv_num_blocks"].tolist() == [[16] * 16]  # every block of every row


HUGE = 10**9
CLIPPED = [  # a count far wider than the 16-block row: the layout of the row-wide count, at its cost
    ("local", dict(num_sliding_window_blocks=HUGE), dict(num_sliding_window_blocks=33)),
    ("bigbird", dict(num_sliding_window_blocks=HUGE, num_global_blocks=HUGE), dict(num_sliding_window_blocks=33,
                                                                                   num_global_blocks=16)),
    ("fixed", dict(num_local_blocks=HUGE, num_global_blocks=HUGE), dict(num_local_blocks=16, num_global_blocks=16)),
    ("variable", dict(local_window_blocks=(HUGE,)), dict(local_window_blocks=(16,))),
]


@pytest.mark.parametrize("kind, huge, row_wide", CLIPPED, ids=[c[0] for c in CLIPPED])
def test_counts_wider_than_the_row_cost_what_the_row_costs(kind, huge, row_wide):
    for attention in ("bidirectional", "unidirectional"):
        big = generate(SparseSpec(kind, 256, 16, 2, attention=attention, **huge))  # seconds if unbounded: hours
        fits = generate(SparseSpec(kind, 256, 16, 2, attention=attention, **row_wide))
        assert all(torch.equal(big[n], fits[n]) for n in ("kv_num_blocks", "kv_indices"))


# ------------------------------------------------------------------ DeepSpeed drop-in
# DeepSpeed 0.x's sparsity configs and the keyword arguments each takes
# (deepspeed/ops/sparse_attention/sparsity_config.py), beside num_heads and block.
DEEPSPEED = {
    "DenseSparsityConfig": {"different_layout_per_head": True},
    "FixedSparsityConfig": {"different_layout_per_head": True, "num_local_blocks": 4, "num_global_blocks": 2,
                            "attention": "unidirectional", "horizontal_global_attention": False,
                            "num_different_global_patterns": 2},
    "VariableSparsityConfig": {"different_layout_per_head": True, "num_random_blocks": 1,
                               "local_window_blocks": (4, 2), "global_block_indices": (0, 5),
                               "global_block_end_indices": (2, 6), "attention": "bidirectional",
                               "horizontal_global_attention": True},
    "BigBirdSparsityConfig": {"different_layout_per_head": True, "num_random_blocks": 1,
                              "num_sliding_window_blocks": 3, "num_global_blocks": 1, "attention": "unidirectional"},
    "BSLongformerSparsityConfig": {"different_layout_per_head": True, "num_sliding_window_blocks": 3,
                                   "global_block_indices": (0,), "global_block_end_indices": (2,),
                                   "attention": "bidirectional"},
    "LocalSlidingWindowSparsityConfig": {"num_sliding_window_blocks": 5, "attention": "bidirectional"},
}


@pytest.mark.parametrize("config", sorted(DEEPSPEED))
def test_every_deepspeed_parameter_is_accepted_by_its_kind(config):
    (kind,) = [k for k in SPARSE_KINDS.values() if k.deepspeed == config]
    spec = SparseSpec(kind.name, 1024, 64, 4, **DEEPSPEED[config])
    assert {name: spec.params[name] for name in DEEPSPEED[config]} == DEEPSPEED[config]
    assert all(len(line.splitlines()) == 1 for line in kind.departures)


@pytest.mark.parametrize("kind", ["dense", "bslongformer"])
def test_different_layout_per_head_has_no_effect_where_heads_never_differ(kind):
    per_head = SparseSpec(kind, 1024, 64, 4, different_layout_per_head=True)
    shared = SparseSpec(kind, 1024, 64, 4)
    assert per_head.layout_heads == shared.layout_heads == 1
    assert per_head.key != shared.key  # a parameter of the spec all the same
    assert all(torch.equal(generate(per_head)[n], generate(shared)[n]) for n in ("kv_num_blocks", "kv_indices"))
