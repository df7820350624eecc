"""Every public attention module inside what real PyTorch programs do (issue 10
item 3), each result compared with a float64 reference, never just "it ran".

Programs: ``torch.no_grad``; ``torch.inference_mode`` on a cold store and on
a disk-warm one (a fresh ``PatternStore`` on a directory another store
wrote), each followed by a training step; ``torch.autocast`` (CPU bfloat16);
float16 / bfloat16 / float64 inputs; inputs non-contiguous in every dimension
(step-2 slices of every dim, a tensor stored as (b, d, n, h) or (b, e, n), a
strided last dim); ``torch.utils.checkpoint`` (reentrant and not);
``copy.deepcopy`` and pickle of modules built on a store; ``torch.save`` +
``torch.load`` and ``torch.export`` (cold store) + ``torch.export.save`` /
``load`` run in one fresh process; a ``spawn`` worker that receives the
modules; threads sharing one module at several lengths; a read-only store
directory holding a precomputed store; ``torch.func.grad`` / ``vjp`` on a
cold store; double backward and ``torch.jit.script`` (clear errors) for the
modules tests/test_dilated.py and tests/test_sparse.py do not already cover;
``DistributedDilatedAttention`` at world size 1 (gloo), copied and pickled;
shape inference on the ``meta`` device (shapes and dtypes only).

The reference of a module is the same module class with the same parameters
in float64 whose attention is the dense float64 definition:
``dense_dilated_attention`` (attention/dense_reference.py) for the dilated modules,
the dense masked softmax over the layout's block pairs (tests/test_sparse.py's
``allowed_pairs`` / ``reference_attention``) for the block-sparse ones.
"""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import attention.sparse.layouts as sparse_layouts
from attention.caches import BoundedCache
from attention import (
    BlockSparseAttention,
    DilatedAttention,
    DistributedDilatedAttention,
    ImprovedDilatedAttention,
    ImprovedMultiheadDilatedAttention,
    MultiheadBlockSparseAttention,
    MultiheadDilatedAttention,
    MultiheadWrapper,
)
from attention.dense_reference import dense_dilated_attention
from patternstore import PatternStore, SparseSpec, generate
from test_maintenance import _refuse_writes, _snapshot
from test_sparse import allowed_pairs, reference_attention

pytestmark = pytest.mark.usefixtures("one_thread")

SEGMENTS, RATES = (8, 16), (1, 2)          # n = 40: a short last segment in both branches
HEADS, HEAD_DIM, EMBED = 4, 16, 64
BLOCK = 8                                   # n = 40: 5 blocks
SPARSE_KIND, SPARSE_PARAMS = "bslongformer", dict(num_sliding_window_blocks=3, global_block_indices=(1,))
LENGTH = 40

# Tolerances against the float64 reference, by the dtype the module computes
# in: a few units of the dtype's epsilon (2**-23, 2**-10, 2**-7) times the
# sums of a projection, an attention row and a LayerNorm; float64 differs from
# the reference by summation order only. ``atol`` is for values of magnitude 1
# and scales with the largest reference value of the comparison, for
# gradients with the largest of all the call's gradients: parameter gradients
# are sums over batch and positions whose rounding errors grow with their
# terms, even where the terms cancel (the key bias's gradient is exactly 0).
TOLERANCES = {
    torch.float64: dict(rtol=1e-9, atol=1e-9),
    torch.float32: dict(rtol=2e-4, atol=2e-5),
    torch.float16: dict(rtol=1e-2, atol=5e-3),
    torch.bfloat16: dict(rtol=8e-2, atol=4e-2),
}


# ------------------------------------------------------------ references
class DenseDilated(nn.Module):
    """The dense float64 definition of the dilated modules' attention."""

    def forward(self, q, k, v, is_causal=False, key_padding_mask=None):
        return dense_dilated_attention(q, k, v, SEGMENTS, RATES, is_causal=is_causal,
                                       key_padding_mask=key_padding_mask)


class DenseSparse(nn.Module):
    """The dense float64 definition of the block-sparse modules' attention,
    over the generated (not stored) layout of the call's length."""

    def forward(self, q, k, v, is_causal=False, key_padding_mask=None):
        n, h = k.shape[1], q.shape[2]
        spec = SparseSpec(SPARSE_KIND, seq_len=n, block_size=BLOCK, num_heads=h, **SPARSE_PARAMS)
        pattern = generate(spec)
        pairs = allowed_pairs(pattern["kv_num_blocks"], pattern["kv_indices"], n, BLOCK, is_causal, h)
        return reference_attention(q, k, v, pairs, key_padding_mask)


# -------------------------------------------------------------- modules
@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Optional[PatternStore]], nn.Module]  # seeded: equal parameters at every build
    dense: Callable[[], nn.Module]
    multihead: bool
    is_causal: bool

    def __str__(self) -> str:
        return self.name


def _seeded(make):
    def build(store=None):
        torch.manual_seed(0)
        return make(store)
    return build


CASES = [
    Case("DilatedAttention", _seeded(lambda s: DilatedAttention(SEGMENTS, RATES, store=s)), DenseDilated,
         False, True),
    Case("ImprovedDilatedAttention", _seeded(lambda s: ImprovedDilatedAttention(SEGMENTS, RATES, store=s)),
         DenseDilated, False, True),
    Case("MultiheadDilatedAttention",
         _seeded(lambda s: MultiheadDilatedAttention(EMBED, HEADS, SEGMENTS, RATES, store=s)), DenseDilated,
         True, True),
    Case("ImprovedMultiheadDilatedAttention",
         _seeded(lambda s: ImprovedMultiheadDilatedAttention(EMBED, HEADS, SEGMENTS, RATES, store=s)),
         DenseDilated, True, True),
    Case("MultiheadWrapper",
         _seeded(lambda s: MultiheadWrapper(EMBED, HEADS, ImprovedDilatedAttention(SEGMENTS, RATES, store=s),
                                            layer_norm=False)),
         DenseDilated, True, True),
    Case("BlockSparseAttention",
         _seeded(lambda s: BlockSparseAttention(SPARSE_KIND, block_size=BLOCK, store=s, **SPARSE_PARAMS)),
         DenseSparse, False, False),
    Case("MultiheadBlockSparseAttention",
         _seeded(lambda s: MultiheadBlockSparseAttention(EMBED, HEADS, SPARSE_KIND, block_size=BLOCK, store=s,
                                                         **SPARSE_PARAMS)),
         DenseSparse, True, False),
]
BY_NAME = {case.name: case for case in CASES}
all_cases = pytest.mark.parametrize("case", CASES, ids=str)


def reference_module(case: Case, dtype: torch.dtype) -> nn.Module:
    """float64, the parameters the module under test holds in ``dtype``
    (rounded the same way), the dense attention inside."""
    if not case.multihead:
        return case.dense()
    module = case.build(None).to(dtype).double()
    module.attention = case.dense()
    return module


def inputs(case: Case, n: int = LENGTH, dtype: torch.dtype = torch.float32, seed: int = 0) -> list[Tensor]:
    """(query,) of (2, n, EMBED) for a multi-head layer (self-attention), else
    q, k, v of (2, n, HEADS, HEAD_DIM)."""
    g = torch.Generator().manual_seed(seed)
    shape, count = ((2, n, EMBED), 1) if case.multihead else ((2, n, HEADS, HEAD_DIM), 3)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(count)]


def call(case: Case, module: nn.Module, xs) -> Tensor:
    out = module(*xs, is_causal=case.is_causal)
    return out[0] if case.multihead else out


def parameters(module: nn.Module) -> list[Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


def assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype, what: str = "output",
                 scale: Optional[float] = None) -> None:
    assert actual.shape == expected.shape, what
    assert torch.isfinite(actual).all(), f"{what}: not finite"
    tolerance = TOLERANCES[dtype]
    scale = max(1.0, expected.abs().max().item() if scale is None else scale)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tolerance["rtol"],
                               atol=tolerance["atol"] * scale, msg=lambda m: f"{what}: {m}")


def check(case: Case, module: nn.Module, xs, *, dtype: torch.dtype = torch.float32, backward: bool = True,
          run: Optional[Callable] = None, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``run(leaves)`` (default: the module's forward) against the reference:
    the output, and with ``backward`` the gradients of every input and
    parameter. ``xs`` keep their strides (the leaves are their detached
    views). Returns the output."""
    run = run or (lambda leaves: call(case, module, leaves))
    leaves = [x.detach().requires_grad_(backward) for x in xs]
    out = run(leaves)
    assert out.dtype == (out_dtype or xs[0].dtype)
    reference = reference_module(case, dtype)
    reference_leaves = [x.detach().double().requires_grad_(backward) for x in xs]
    expected = call(case, reference, reference_leaves)
    assert_close(out, expected, dtype)
    if backward:
        grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        for p in parameters(module):
            p.grad = None
        out.backward(grad_out.to(out.dtype))  # not autograd.grad: reentrant checkpointing refuses it
        got = [x.grad for x in leaves + parameters(module)]
        want = torch.autograd.grad(expected, reference_leaves + parameters(reference), grad_out)
        assert len(got) == len(want)
        scale = max(b.abs().max().item() for b in want)
        for i, (a, b) in enumerate(zip(got, want)):
            assert_close(a, b, dtype, f"gradient {i}", scale)
    return out


@all_cases
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_meta_tensors_give_the_shapes_and_dtypes(case, dtype, tmp_path):
    """Shape inference on the meta device (a module built under
    ``torch.device("meta")``, meta inputs): the output and every gradient
    have the shapes and dtypes of the real call, with no value read (the
    block-sparse lookup's entry count is data-dependent: the layout's shapes
    come from its CPU copy). Compared with the same call on real tensors."""
    store = PatternStore(tmp_path)
    real = [x.to(dtype).requires_grad_() for x in inputs(case)]
    real_module = case.build(store).to(dtype)
    want = call(case, real_module, real)
    want.sum().backward()
    with torch.device("meta"):
        module = case.build(store).to(dtype)
    leaves = [torch.empty_like(x, device="meta").requires_grad_() for x in real]
    out = call(case, module, leaves)
    assert (out.shape, out.dtype, out.device.type) == (want.shape, want.dtype, "meta")
    out.sum().backward()
    got, expected = leaves + parameters(module), real + parameters(real_module)
    assert len(got) == len(expected)
    for leaf, x in zip(got, expected):
        assert (leaf.grad.shape, leaf.grad.dtype, leaf.grad.device.type) == (x.grad.shape, x.grad.dtype, "meta")


@pytest.fixture
def fresh_sources(monkeypatch):
    """The block-sparse modules' per-process cache of layout sources, empty,
    as in a process that never built a module on these directories (a source
    keeps the first store given for its description)."""
    monkeypatch.setattr(sparse_layouts, "SOURCES", BoundedCache(sparse_layouts.MAX_SOURCES))


# --------------------------------------------------------- grad modes
@all_cases
def test_no_grad(case):
    module = case.build(None)
    with torch.no_grad():
        out = check(case, module, inputs(case), backward=False)
    assert not out.requires_grad


@all_cases
def test_inference_mode_on_a_cold_store_then_training(case, tmp_path, fresh_sources):
    """The first call of a process under inference mode takes new store
    entries; the module then trains with the right gradients."""
    store = PatternStore(tmp_path / "store")
    module = case.build(store)
    with torch.inference_mode():
        check(case, module, inputs(case), backward=False)
    assert store.stats()["generations"] >= 1
    check(case, module, inputs(case, seed=1))


@all_cases
def test_inference_mode_on_a_disk_warm_store_then_training(case, tmp_path, monkeypatch):
    directory = tmp_path / "store"
    call(case, case.build(PatternStore(directory)), inputs(case))  # another store instance writes the entries
    monkeypatch.setattr(sparse_layouts, "SOURCES", BoundedCache(sparse_layouts.MAX_SOURCES))
    store = PatternStore(directory)
    module = case.build(store)
    with torch.inference_mode():
        check(case, module, inputs(case), backward=False)
    stats = store.stats()
    assert stats["disk_hits"] >= 1 and stats["generations"] == 0
    check(case, module, inputs(case, seed=1))


# ------------------------------------------------------------- dtypes
@all_cases
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_input_dtypes(case, dtype):
    module = case.build(None).to(dtype)
    check(case, module, inputs(case, dtype=dtype), dtype=dtype)


@all_cases
def test_autocast_cpu_bfloat16(case):
    """Forward under ``torch.autocast("cpu", bfloat16)``, backward after it
    (the usual training loop): within bfloat16 of the float32 reference."""
    module = case.build(None)

    def run(leaves):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return call(case, module, leaves)

    # Linear layers run in bfloat16 under autocast: the multi-head output is bfloat16.
    check(case, module, inputs(case), dtype=torch.bfloat16, run=run,
          out_dtype=torch.bfloat16 if case.multihead else torch.float32)


# ----------------------------------------------------------- strides
def _every_dim_strided(x: Tensor) -> Tensor:
    wide = x.new_zeros([2 * s for s in x.shape])
    every = (slice(None, None, 2),) * x.dim()
    wide[every] = x
    return wide[every]


def _stored_last_dim_second(x: Tensor) -> Tensor:
    """x's values, stored as (b, d, n, h) (or (b, e, n)): the last dim is the
    second slowest."""
    order = (0, x.dim() - 1, *range(1, x.dim() - 1))
    inverse = [order.index(i) for i in range(x.dim())]
    return x.permute(order).contiguous().permute(inverse)


LAYOUTS = {
    "step-2-in-every-dim": _every_dim_strided,
    "stored-last-dim-second": _stored_last_dim_second,
    "last-dim-strided": lambda x: torch.stack([x, x], -1)[..., 0],
}


@all_cases
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_inputs_non_contiguous_in_every_dimension(case, layout):
    xs = [LAYOUTS[layout](x) for x in inputs(case)]
    assert not any(x.is_contiguous() for x in xs)
    if layout == "step-2-in-every-dim":   # no dimension has its contiguous stride
        assert all(s != c for x in xs for s, c in zip(x.stride(), torch.empty(x.shape).stride()))
    check(case, case.build(None), xs)


# -------------------------------------------------------- checkpoint
@all_cases
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_activation_checkpointing(case, use_reentrant):
    module = case.build(None)
    check(case, module, inputs(case),
          run=lambda leaves: checkpoint(lambda *xs: call(case, module, xs), *leaves, use_reentrant=use_reentrant))


# ---------------------------------------------------- copies, pickles
@all_cases
def test_deepcopy_and_pickle_of_a_module_on_a_store(case, tmp_path):
    """Layer cloning, EMA copies and pickling of a used module whose store
    is a ``PatternStore`` object: the copy computes the same function."""
    module = case.build(PatternStore(tmp_path / "store"))
    xs = inputs(case)
    expected = call(case, module, xs)
    for twin in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        torch.testing.assert_close(call(case, twin, xs), expected, rtol=0, atol=0)
        check(case, twin, inputs(case, n=57, seed=1))                       # a length the original never saw
        for a, b in zip(twin.parameters(), module.parameters()):
            assert a is not b and torch.equal(a, b)


FRESH_PROCESS = """
import sys, torch
import attention  # registers the patternstore:: operators before the programs load
folder = sys.argv[1]
torch.set_num_threads(1)
modules, inputs = torch.load(folder + "/modules.pt", weights_only=False)
outputs = {}
with torch.no_grad():
    for name, module in modules.items():
        xs, kwargs = inputs[name]
        program = torch.export.load(f"{folder}/{name}.pt2").module()
        outputs[name] = (module(*xs, **kwargs), program(*xs, **kwargs))
torch.save(outputs, folder + "/outputs.pt")
"""


def test_saved_modules_and_exported_programs_run_in_a_fresh_process(tmp_path):
    """Every module exported on a cold store (its own directory, nothing in
    it yet), ``torch.export.save``-d, and ``torch.save``-d: a fresh process
    (default store elsewhere) loads both and computes the eager output."""
    modules, all_inputs, expected = {}, {}, {}
    for case in CASES:
        store = PatternStore(tmp_path / case.name)
        module = case.build(store)
        xs = inputs(case)
        assert not store.stored_keys()                                   # cold
        program = torch.export.export(module, tuple(xs), {"is_causal": case.is_causal})
        torch.export.save(program, tmp_path / f"{case.name}.pt2")
        expected[case.name] = check(case, module, xs, backward=False)
        kwargs = {"is_causal": case.is_causal}
        torch.testing.assert_close(_first(program.module()(*xs, **kwargs)), expected[case.name], rtol=0, atol=0)
        modules[case.name] = module
        all_inputs[case.name] = (xs, kwargs)
    torch.save((modules, all_inputs), tmp_path / "modules.pt")
    env = {**os.environ, "PATTERNSTORE_DIR": str(tmp_path / "elsewhere"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(tmp_path)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    outputs = torch.load(tmp_path / "outputs.pt")
    for name, (module_out, program_out) in outputs.items():
        torch.testing.assert_close(_first(module_out), expected[name], rtol=0, atol=0, msg=f"{name}: torch.load")
        torch.testing.assert_close(_first(program_out), expected[name], rtol=0, atol=0, msg=f"{name}: export")
    assert sorted(outputs) == sorted(BY_NAME)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _spawned_worker(modules: dict, all_inputs: dict) -> dict:
    torch.set_num_threads(1)
    with torch.no_grad():
        return {name: call(BY_NAME[name], module, all_inputs[name]) for name, module in modules.items()}


def test_a_spawn_worker_receives_the_modules_and_computes_their_outputs(tmp_path):
    """A ``spawn`` pool worker (what DataLoader workers and process pools
    use) gets used modules, each on a store with a directory or on the
    default store, and returns their outputs."""
    modules, all_inputs, expected = {}, {}, {}
    for i, case in enumerate(CASES):
        module = case.build(PatternStore(tmp_path / case.name) if i % 2 else None)
        all_inputs[case.name] = inputs(case)
        expected[case.name] = check(case, module, all_inputs[case.name], backward=False)
        modules[case.name] = module
    with mp.get_context("spawn").Pool(1) as pool:
        outputs = pool.apply_async(_spawned_worker, (modules, all_inputs)).get(timeout=300)
    assert sorted(outputs) == sorted(expected)
    for name, out in outputs.items():
        torch.testing.assert_close(out, expected[name], rtol=0, atol=0, msg=name)


# ------------------------------------------------------------- threads
@all_cases
def test_threads_share_one_module_at_several_lengths(case, tmp_path, fresh_sources):
    """Eight calls at four lengths at once on one module and a cold store:
    each equals the same call made alone afterwards (bit for bit: the same
    kernels on the same inputs) and the reference."""
    module = case.build(PatternStore(tmp_path / "store"))
    lengths = [24, 40, 57, 64] * 2
    all_inputs = [inputs(case, n=n, seed=i) for i, n in enumerate(lengths)]
    with torch.no_grad(), ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda xs: call(case, module, xs), all_inputs))
    for xs, out in zip(all_inputs, together):
        with torch.no_grad():
            alone = check(case, module, xs, backward=False)
        torch.testing.assert_close(out, alone, rtol=0, atol=0)


# ------------------------------------------------------- read-only store
@all_cases
def test_a_read_only_store_directory_serves_precomputed_patterns_and_writes_nothing(case, tmp_path, monkeypatch):
    directory = tmp_path / "store"
    writer = case.build(PatternStore(directory))
    for n in (24, LENGTH):                                          # precompute
        call(case, writer, inputs(case, n=n))
    before = _snapshot(directory)
    monkeypatch.setattr(sparse_layouts, "SOURCES", BoundedCache(sparse_layouts.MAX_SOURCES))
    _refuse_writes(directory, monkeypatch)
    try:
        with pytest.warns(Warning, match="read-only"):
            store = PatternStore(directory)
        assert store.read_only
        module = case.build(store)
        check(case, module, inputs(case))                           # precomputed
        check(case, module, inputs(case, n=57, seed=1))             # not precomputed (sparse): kept in memory
        stats = store.stats()
        assert stats["disk_hits"] >= 1 and stats["corrupt"] == 0
    finally:
        directory.chmod(0o700)
    assert _snapshot(directory) == before


# ---------------------------------------------------------- torch.func
@all_cases
def test_torch_func_grad_and_vjp_on_a_cold_store(case, tmp_path, fresh_sources):
    """``torch.func.grad`` as the first call of a module on a cold store, then
    ``vjp``: the reference's autograd gradients."""
    module = case.build(PatternStore(tmp_path / "store"))
    xs = inputs(case, dtype=torch.float64)
    module.double()
    argnums = tuple(range(len(xs)))
    got = torch.func.grad(lambda *a: call(case, module, a).square().sum(), argnums=argnums)(*xs)
    reference = reference_module(case, torch.float64)
    leaves = [x.clone().requires_grad_() for x in xs]
    want = torch.autograd.grad(call(case, reference, leaves).square().sum(), leaves)
    for a, b in zip(got, want):
        assert_close(a, b, torch.float64, "torch.func.grad")
    out, pullback = torch.func.vjp(lambda *a: call(case, module, a), *xs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = call(case, reference, leaves)
    assert_close(out, expected, torch.float64)
    for a, b in zip(pullback(grad_out), torch.autograd.grad(expected, leaves, grad_out)):
        assert_close(a, b, torch.float64, "torch.func.vjp")


# Double backward and torch.jit.script of DilatedAttention and
# ImprovedDilatedAttention: tests/test_dilated.py; of the block-sparse
# functional core: tests/test_sparse.py. The other modules here.
OTHERS = [case for case in CASES if case.name not in ("DilatedAttention", "ImprovedDilatedAttention")]


@pytest.mark.parametrize("case", OTHERS, ids=str)
def test_double_backward_is_exact_on_the_reference_path_and_a_clear_error_on_the_fast_ones(case):
    module = case.build(None).double()
    xs = [x.requires_grad_() for x in inputs(case, dtype=torch.float64)]
    (g,) = torch.autograd.grad(call(case, module, xs).square().sum(), xs[0], create_graph=True)
    if case.name == "MultiheadDilatedAttention":                  # DilatedAttention inside: autograd-native
        reference = reference_module(case, torch.float64)
        leaves = [x.detach().clone().requires_grad_() for x in xs]
        (want,) = torch.autograd.grad(call(case, reference, leaves).square().sum(), leaves[0], create_graph=True)
        assert_close(g, want, torch.float64, "gradient")
        (gg,) = torch.autograd.grad(g.square().sum(), xs[0])
        (want_gg,) = torch.autograd.grad(want.square().sum(), leaves[0])
        assert_close(gg, want_gg, torch.float64, "second gradient")
    else:
        with pytest.raises(RuntimeError, match="double backward"):
            g.sum().backward()


@pytest.mark.parametrize("case", OTHERS, ids=str)
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_torch_jit_script_is_a_clear_error_naming_torch_compile(case):
    with pytest.raises(RuntimeError, match=r"torch\.jit\.script.*torch\.compile"):
        torch.jit.script(case.build(None))


# --------------------------------------------------------- distributed
def test_distributed_dilated_attention_at_world_size_one(tmp_path):
    """Gloo, one rank: the whole sequence is the rank's chunk, so it is
    DilatedAttention: with grad, under no_grad and inference mode, and after
    deepcopy and pickle of the used module."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1,
                            timeout=timedelta(seconds=60))
    try:
        case = BY_NAME["DilatedAttention"]
        module = DistributedDilatedAttention(SEGMENTS, RATES, store=PatternStore(tmp_path / "store"))
        n = 64                                   # the chunk: every segment length divides it
        check(case, module, inputs(case, n=n))
        with torch.no_grad():
            check(case, module, inputs(case, n=n, seed=1), backward=False)
        with torch.inference_mode():
            check(case, module, inputs(case, n=n, seed=2), backward=False)
        for twin in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
            check(case, twin, inputs(case, n=n, seed=3))
    finally:
        dist.destroy_process_group()
