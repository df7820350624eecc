"""Attention sinks (gpt-oss's ``s_aux``) in the full-attention layers of a
compiled Hugging Face model: the traced ops take them.

- ``torch.compile(model, fullgraph=True)`` of a tiny gpt-oss (a sliding
  layer, then a full-attention one) under full-coverage settings (a pattern
  that covers every pair, so the result must be the model's own attention):
  the logits of a left-padded batch equal ``attn_implementation="eager"``,
  and the graph hands the full layer's sinks to its op; a float64 training
  step's loss and every gradient, the sinks' included, equal the eager
  step's. Both implementations; inductor for one training step (it asserts
  the strides the fake kernels promise and compiles the sinks' gradient),
  aot_eager for the rest (the same trace, no code generation: about 20 s
  less per compile on this CPU).
- The training op with sinks on a padded batch (left padding and a hole):
  its output and the gradients of query, key, value and sinks equal the
  eager module's, float64, no compile.
(``torch.export`` with sinks: tests/test_hf_compile.py.)
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")  # installed by `make test` (the test extra)

import attention.hf.registration as hf  # noqa: E402
from attention.hf.modules import DILATED, SPARSE, attention_module, frozen  # noqa: E402
from attention.hf.padding import attend_padded  # noqa: E402
from attention.hf.traced import traced_module_key  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from hf_tiny import VOCAB, gpt_oss_config, recording  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:this model's config carries patternstore_attention")]

COVERING = {  # settings whose pattern covers every pair: the result must equal full attention
    DILATED: {"segment_lengths": [64], "dilation_rates": [1]},
    SPARSE: {"kind": "dense", "block_size": 8, "attention": "unidirectional"},
}
IMPLS = pytest.mark.parametrize("impl", [DILATED, SPARSE], ids=["dilated", "sparse"])


@pytest.fixture(autouse=True)
def fresh(fresh_dynamo):
    hf.register()


def tiny_gpt_oss(impl: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(gpt_oss_config("eager", COVERING[impl])).to(dtype)
    for layer in model.model.layers:  # sinks start at 0; random ones make them matter
        torch.nn.init.normal_(layer.self_attn.sinks, std=1.0)
    return model


@IMPLS
@torch.no_grad()
def test_compiled_logits_of_a_padded_batch_equal_eager_attention(impl):
    model = tiny_gpt_oss(impl, torch.float32).eval()
    ids = torch.randint(1, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding, as generate pads
    want = model(input_ids=ids, attention_mask=mask).logits
    model.set_attn_implementation(impl)
    graphs = []
    got = torch.compile(model, fullgraph=True, backend=recording(graphs))(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
    (graph,) = graphs
    calls = [node for node in graph.graph.nodes if str(node.target) == "attention.hf_attend_padded"]
    assert len(calls) == 1 and calls[0].args[6] is not None  # the full layer's op, given its sinks


@pytest.mark.parametrize("impl, backend", [(DILATED, "inductor"), (SPARSE, "aot_eager")], ids=["dilated", "sparse"])
def test_a_compiled_training_step_has_the_eager_loss_and_gradients_sinks_included(impl, backend):
    model = tiny_gpt_oss(impl, torch.float64).train()
    ids = torch.randint(1, VOCAB, (2, 20), generator=torch.Generator().manual_seed(2))  # unpadded: eager's
    # float64 padded rows are NaN (min + score overflows to -inf)

    def step(forward):
        model.zero_grad()
        out = forward(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids))
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want_loss, want = step(model)
    model.set_attn_implementation(impl)
    loss, got = step(torch.compile(model, fullgraph=True, backend=backend))
    # transformers' eager softmax runs in float32 even for float64 models: its precision bounds these.
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
    assert set(got) == set(want) and all(f"model.layers.{i}.self_attn.sinks" in got for i in range(2))
    for n, grad in want.items():
        torch.testing.assert_close(got[n], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item(), msg=n)
    assert got["model.layers.1.self_attn.sinks"].abs().min() > 0  # every head's sink takes part


@IMPLS
def test_the_training_op_with_sinks_on_a_padded_batch_has_the_eager_modules_gradients(impl):
    """Padded query rows: out 0, no share of the sinks' gradient; a hole: the row's own key mask."""
    heads, kv_heads, length, dim = 4, 2, 12, 8
    g = torch.Generator().manual_seed(3)
    q = torch.randn(3, length, heads, dim, generator=g, dtype=torch.float64).transpose(1, 2)
    k, v = (torch.randn(3, length, kv_heads, dim, generator=g, dtype=torch.float64).transpose(1, 2) for _ in range(2))
    sinks = torch.randn(heads, generator=g, dtype=torch.float64)
    weights = torch.randn(3, length, heads, dim, generator=g, dtype=torch.float64)
    mask = torch.ones(3, length, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, 6] = 0  # a hole after the first token

    def run(attend):
        inputs = [x.detach().requires_grad_() for x in (q, k, v, sinks)]
        out = attend(*inputs)
        return (out, *torch.autograd.grad((out * weights).sum(), inputs))

    key = traced_module_key(impl, frozen(COVERING[impl]), 0.3, 0.0, (heads, kv_heads, dim, dim), True)
    got = run(lambda q, k, v, s: torch.ops.attention.hf_attend_lse(q, k, v, mask, key, True, s)[0])
    module = attention_module(impl, COVERING[impl], 0.3, 0.0)
    want = run(lambda q, k, v, s: attend_padded(module, q, k, v, mask, True, s))
    for name, a, b in zip(("out", "query", "key", "value", "sinks"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
