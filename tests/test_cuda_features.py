"""What landed after the last GPU run, on a CUDA device against float64
references (issue 28):

- packed documents (``cu_seqlens``) through each dilated implementation,
  the fused packed path among them (one flex call over the documents'
  residue layouts, with its backward), and block-sparse attention (its flex
  BlockMask composed from the documents' own layouts), with padding inside
  documents, empty and one-token documents, GQA, causal or not;
- soft-capping and attention sinks in both module families, the sinks'
  gradient included;
- a compiled Hugging Face training step (``attention::hf_attend_lse`` saves
  out and lse; its backward reads them) against the eager step.

Marked ``cuda`` and skipped without a device; ``PATTERNSTORE_TEST_DEVICE=cpu``
runs them on the CPU, where block-sparse takes its gather path and the fused
packed path hands calls that need gradients to the bucketed one (so the
checks that the fused paths ran are CUDA-only). Error measure and bounds:
tests/device_checks.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import attention.dilated.packed as dilated_packed
from attention import BlockSparseAttention, DilatedAttention, ImprovedDilatedAttention
from attention.dense_reference import block_pairs, dense_attention, multiplicity
from device_checks import (DEVICE, GRADIENT_FACTOR, HAVE_CUDA, RELATIVE_ERROR, assert_close, device_tensor,
                           widened)
from patternstore import SparseSpec, generate

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE.type == "cuda" and not HAVE_CUDA,
                       reason="needs a CUDA device (PATTERNSTORE_TEST_DEVICE=cpu runs these checks on the CPU)"),
]
ON_CUDA = DEVICE.type == "cuda"
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 64
SEGMENTS, RATES = (32, 64, 128), (1, 2, 4)
DTYPES = [torch.bfloat16, torch.float32]


def boundaries(lengths: list[int]) -> Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def padding_inside(lengths: list[int], seed: int) -> Tensor:
    """(1, total) bool: about one key in eight padded, anywhere in any document."""
    return torch.rand(1, sum(lengths), generator=torch.Generator().manual_seed(seed)) < 0.125


def diagonal(lengths: list[int], blocks) -> Tensor:
    """(heads, total, total) float64: ``blocks(length)`` (heads, L, L) on the
    diagonal for each document, 0 across documents."""
    total = sum(lengths)
    weight = torch.zeros(HEADS, total, total, dtype=torch.float64)
    start = 0
    for length in lengths:
        if length:
            weight[:, start:start + length, start:start + length] = blocks(length)
        start += length
    return weight


def check_against(out: Tensor, want: Tensor, inputs: list[Tensor], references: list[Tensor], dtype: torch.dtype,
                  seed: int) -> None:
    """Output (rows with no key exactly 0), then the gradients of every input."""
    tolerance = RELATIVE_ERROR[dtype]
    assert out.dtype == dtype and out.device.type == DEVICE.type
    assert_close(out, want, tolerance, "output")
    dead = want.detach().abs().sum(-1) == 0
    assert (out.detach().cpu()[dead] == 0).all(), "a row with no key must output exactly 0"
    grad_out = device_tensor(*out.shape, dtype=dtype, generator=torch.Generator().manual_seed(seed), grad=False)
    got = torch.autograd.grad(out, inputs, grad_out)
    expected = torch.autograd.grad(want, references, widened(grad_out))
    floor = float(grad_out.double().norm())  # tests/test_cuda.py check_module says why
    for number, (a, b) in enumerate(zip(got, expected)):
        assert_close(a, b, tolerance * GRADIENT_FACTOR, f"gradient of input {number}", floor)


def packed_inputs(lengths: list[int], dtype: torch.dtype, seed: int) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    return [device_tensor(1, total, heads, HEAD_DIM, dtype=dtype, generator=generator)
            for heads in (HEADS, KV_HEADS, KV_HEADS)]


# ------------------------------------------------------- packed: dilated
# A document longer than every segment, an empty one, a one-token one,
# lengths that are multiples of nothing, a document exactly one segment long.
DILATED_DOCUMENTS = [300, 0, 1, 77, 531, 64, 200]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("implementation", ["fast", "reference", "flex"])
def test_packed_dilated_attention_matches_the_document_masked_reference(implementation, is_causal, dtype,
                                                                       monkeypatch):
    fused = []
    original = dilated_packed.packed_flex_attention
    monkeypatch.setattr(dilated_packed, "packed_flex_attention", lambda *a, **k: fused.append(1) or original(*a, **k))
    lengths = DILATED_DOCUMENTS
    module = DilatedAttention(SEGMENTS, RATES, implementation=implementation)
    q, k, v = packed_inputs(lengths, dtype, seed=1)
    pad = padding_inside(lengths, seed=2)
    out = module(q, k, v, is_causal=is_causal, key_padding_mask=pad.to(DEVICE),
                 cu_seqlens=boundaries(lengths).to(DEVICE))
    weight = diagonal(lengths, lambda n: multiplicity(n, HEADS, SEGMENTS, RATES, "longnet", is_causal))
    references = [widened(x) for x in (q, k, v)]
    want = dense_attention(*references, weight=weight, is_causal=is_causal, key_padding_mask=pad)
    check_against(out, want, [q, k, v], references, dtype, seed=3)
    if ON_CUDA:
        assert bool(fused) == (implementation == "flex"), "the fused packed path must serve flex on CUDA only"


def test_packed_improved_dilated_attention_in_half_precision_matches_the_reference():
    """The preset users run (fast, "auto"), float16, GQA, causal."""
    lengths = [129, 1, 0, 700, 33]
    q, k, v = packed_inputs(lengths, torch.float16, seed=4)
    out = ImprovedDilatedAttention(SEGMENTS, RATES)(q, k, v, is_causal=True, cu_seqlens=boundaries(lengths).to(DEVICE))
    references = [widened(x) for x in (q, k, v)]
    weight = diagonal(lengths, lambda n: multiplicity(n, HEADS, SEGMENTS, RATES, "longnet", True))
    check_against(out, dense_attention(*references, weight=weight, is_causal=True), [q, k, v], references,
                  torch.float16, seed=5)


# -------------------------------------------------- packed: block-sparse
# (kind, params, is_causal, document lengths): block 64, a multiple of
# FLEX_MIN_BLOCK, so CUDA takes the flex path over the composed BlockMask.
SPARSE_CASES = {
    "local-causal": ("local", {}, True, [640, 0, 64, 1, 200, 333]),
    "bslongformer": ("bslongformer", {"global_block_indices": [0]}, False, [300, 1, 0, 512, 65]),
    "bigbird-random": ("bigbird", {"num_random_blocks": 1}, False, [640, 0, 384, 257]),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(SPARSE_CASES))
def test_packed_block_sparse_attention_matches_the_document_masked_reference(case, dtype):
    kind, params, is_causal, lengths = SPARSE_CASES[case]
    module = BlockSparseAttention(kind, block_size=64, **params)
    q, k, v = packed_inputs(lengths, dtype, seed=6)
    pad = padding_inside(lengths, seed=7)
    out = module(q, k, v, is_causal=is_causal, key_padding_mask=pad.to(DEVICE),
                 cu_seqlens=boundaries(lengths).to(DEVICE))

    def own_layout(n: int) -> Tensor:  # the document's layout at its own length, as if alone
        spec = SparseSpec(kind, seq_len=n, block_size=64, num_heads=HEADS, **params)
        pattern = generate(spec)
        pairs = block_pairs(pattern["kv_num_blocks"], pattern["kv_indices"], n, 64).expand(HEADS, n, n)
        causal = is_causal or spec.params["attention"] == "unidirectional"
        return pairs & torch.ones(n, n, dtype=torch.bool).tril() if causal else pairs

    references = [widened(x) for x in (q, k, v)]
    want = dense_attention(*references, weight=diagonal(lengths, own_layout), key_padding_mask=pad)
    check_against(out, want, [q, k, v], references, dtype, seed=8)


# ------------------------------------------------ soft-capping and sinks
def soft_capped_module(family: str) -> torch.nn.Module:
    if family == "sparse":
        return BlockSparseAttention("bigbird", block_size=64, softcap=5.0)
    return DilatedAttention(SEGMENTS, RATES, implementation=family.split("-")[1], softcap=5.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", ["dilated-fast", "dilated-flex", "sparse"])
def test_soft_cap_and_sinks_match_the_reference_with_the_sinks_gradient(family, dtype):
    """Gemma 2's cap and gpt-oss's sinks at once: the kernel table sends the
    capped scores to a kernel that computes them (never silently to one
    that drops the cap), and each sink takes its gradient."""
    n = 700
    generator = torch.Generator().manual_seed(9)
    q = device_tensor(2, n, HEADS, HEAD_DIM, dtype=dtype, generator=generator)
    k, v = (device_tensor(2, n, KV_HEADS, HEAD_DIM, dtype=dtype, generator=generator) for _ in range(2))
    sinks = (torch.randn(HEADS, generator=generator, dtype=torch.float64) * 2).to(DEVICE, torch.float32)
    sinks.requires_grad_()
    module = soft_capped_module(family)
    out = module(q, k, v, is_causal=True, sinks=sinks)
    references = [widened(x) for x in (q, k, v, sinks)]
    if family == "sparse":
        spec = SparseSpec("bigbird", seq_len=n, block_size=64, num_heads=HEADS)
        pattern = generate(spec)
        weight = block_pairs(pattern["kv_num_blocks"], pattern["kv_indices"], n, 64).expand(HEADS, n, n)
    else:
        weight = multiplicity(n, HEADS, SEGMENTS, RATES, "longnet", True)
    want = dense_attention(*references[:3], weight=weight, is_causal=True, softcap=5.0, sinks=references[3])
    check_against(out, want, [q, k, v, sinks], references, dtype, seed=10)


# ---------------------------------------- Hugging Face compiled training
@pytest.mark.parametrize("pattern", ["dilated", "bigbird"])
def test_a_compiled_hf_training_step_equals_the_eager_step(pattern):
    """A tiny float32 Llama (2 layers, GQA), a left-padded batch: the loss
    and every parameter's gradient of ``torch.compile(model,
    fullgraph=True)`` (inductor on CUDA; aot_eager on the CPU dry run: the
    same trace without code generation) equal the eager step's."""
    pytest.importorskip("transformers")
    import attention.hf.registration as hf
    from hf_tiny import PATTERNS, VOCAB, llama_config
    from transformers import LlamaForCausalLM

    hf.register()
    ids = torch.randint(1, VOCAB, (2, 40), generator=torch.Generator().manual_seed(11))
    mask = torch.ones_like(ids)
    ids[1, :9], mask[1, :9] = 0, 0
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    labels = ids.masked_fill(mask == 0, -100)

    def step(compiled: bool) -> tuple[Tensor, dict[str, Tensor]]:
        torch.manual_seed(0)
        model = LlamaForCausalLM(llama_config(*PATTERNS[pattern], 2)).to(DEVICE).train()
        forward = model
        if compiled:
            torch._dynamo.reset()
            forward = torch.compile(model, fullgraph=True, backend="inductor" if ON_CUDA else "aot_eager")
        loss = forward(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        return loss.detach(), {name: p.grad for name, p in model.named_parameters()}

    want_loss, want_grads = step(compiled=False)
    got_loss, got_grads = step(compiled=True)
    tolerance = RELATIVE_ERROR[torch.float32]
    assert_close(got_loss, want_loss, tolerance, "loss")
    for name, grad in want_grads.items():
        assert_close(got_grads[name], grad, tolerance * GRADIENT_FACTOR, f"gradient of {name}")
