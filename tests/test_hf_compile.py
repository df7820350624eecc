"""Whole-model ``torch.compile(model, fullgraph=True)`` of a tiny
transformers Llama with each patternstore implementation: a padded prefill
into a static cache and a decode step equal the eager model, and a new
padding pattern at the same shapes runs without a recompile (the padded
row still gets what it gets alone); a compiled training step with padding
has the eager gradients; an exported program with dynamic batch and length
runs other shapes and paddings as eager (and a gpt-oss one, with attention
sinks in its full-attention layer). A compile test compiles a prefill
and a decode graph (about 20 s each with inductor on a quiet CPU), so there
are few."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")  # installed by `make test` (the test extra)

import attention.hf.registration as hf  # noqa: E402
from transformers import GptOssForCausalLM, LlamaForCausalLM, StaticCache  # noqa: E402

from hf_tiny import PATTERNS, VOCAB, gpt_oss_config, llama_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT, CACHE = 13, 24


@pytest.fixture(autouse=True, scope="module")
def registered():
    hf.register()


def tiny_llama(impl: str, settings: dict, *, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(impl, settings, layers)).eval()


def left_padded(pads: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of ``len(pads)`` rows of PROMPT tokens, row b's first ``pads[b]`` padding."""
    ids = torch.randint(1, VOCAB, (len(pads), PROMPT), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        ids[row, :pad], mask[row, :pad] = 0, 0
    return ids, mask


def prefill_and_step(forward, model, ids, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill logits into a fresh static cache, then one decode step's logits."""
    cache = StaticCache(config=model.config, max_cache_len=CACHE)
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)  # what generate computes from the mask
    prefill = forward(input_ids=ids, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                      use_cache=True).logits
    next_ids = prefill[:, -1].argmax(-1, keepdim=True)
    mask = torch.cat([mask, torch.ones_like(next_ids)], dim=1)
    step = forward(input_ids=next_ids, attention_mask=mask, position_ids=position_ids[:, -1:] + 1,
                   past_key_values=cache, use_cache=True).logits
    return prefill, step


# Inductor for dilated; the sparse run checks the same trace (one opaque op
# per layer) with aot_eager, which skips the code generation (seconds, not
# tens of seconds, on this CPU).
@pytest.mark.parametrize("pattern, backend", [("dilated", "inductor"), ("bigbird", "aot_eager")])
@torch.no_grad()
def test_fullgraph_compile_of_the_model_equals_eager_and_padding_never_recompiles(pattern, backend, fresh_dynamo):
    model = tiny_llama(*PATTERNS[pattern], layers=1)  # the two-layer graph is checked below, without inductor
    hf.register()  # a cold start: no module built yet, so the first trace builds them (outside the graph)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    for round_, pads in enumerate([[0, 4], [5, 0]]):
        ids, mask = left_padded(pads, seed=round_)
        if round_ == 0:  # compiles the prefill and the decode graph
            got_prefill, got_step = prefill_and_step(compiled, model, ids, mask)
        else:  # another padding pattern, the same shapes
            with torch.compiler.set_stance("fail_on_recompile"):
                got_prefill, got_step = prefill_and_step(compiled, model, ids, mask)
        want_prefill, want_step = prefill_and_step(model, model, ids, mask)
        real = mask.bool()
        torch.testing.assert_close(got_prefill[real], want_prefill[real], rtol=0, atol=1e-5, msg=f"pads {pads}")
        torch.testing.assert_close(got_step, want_step, rtol=0, atol=1e-5, msg=f"pads {pads}")
        # The padded row gets what it gets alone (eager, unpadded).
        row = max(range(2), key=lambda b: pads[b])
        alone_prefill, alone_step = prefill_and_step(model, model, ids[row:row + 1, pads[row]:],
                                                     mask[row:row + 1, pads[row]:])
        torch.testing.assert_close(got_prefill[row, pads[row]:], alone_prefill[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(got_step[row], alone_step[0], rtol=0, atol=1e-5)


@torch.no_grad()
def test_the_traced_graph_holds_one_opaque_op_per_layer_and_no_other_patternstore_call(fresh_dynamo):
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    model = tiny_llama(*PATTERNS["dilated"], layers=2)
    hf.register()  # cold: the modules are built while tracing, outside the graph
    ids, mask = left_padded([0, 4], seed=11)
    torch.compile(model, fullgraph=True, backend=recording_backend)(input_ids=ids, attention_mask=mask, use_cache=False)
    (graph,) = graphs
    ours = [str(node.target) for node in graph.graph.nodes if str(node.target).startswith(("attention.", "patternstore."))]
    assert ours == ["attention.hf_attend_padded"] * 2, ours  # one per layer: the modules run inside it
    assert not [node for node in graph.graph.nodes if node.op == "call_module"]


def test_a_compiled_training_step_with_padding_has_the_eager_gradients(fresh_dynamo):
    model = tiny_llama(*PATTERNS["dilated"], layers=1).train()
    ids, mask = left_padded([0, 3], seed=8)
    labels = ids.masked_fill(mask == 0, -100)

    def grads(forward):
        model.zero_grad()
        forward(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    want = grads(model)
    got = grads(torch.compile(model, fullgraph=True, backend="aot_eager"))
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5, msg=name)


class Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, mask):
        return self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def tiny_gpt_oss(impl: str, settings: dict) -> torch.nn.Module:
    """A sliding layer and a full-attention one with attention sinks (random: zeros would change nothing)."""
    torch.manual_seed(0)
    model = GptOssForCausalLM(gpt_oss_config(impl, settings)).eval()
    for layer in model.model.layers:
        torch.nn.init.normal_(layer.self_attn.sinks, std=1.0)
    return model


@pytest.mark.parametrize("model", ["llama", "gpt-oss"])
@torch.no_grad()
def test_export_with_dynamic_batch_and_length_runs_other_shapes_and_paddings_as_eager(model, fresh_dynamo):
    """gpt-oss: its full-attention layer's op takes the layer's sinks."""
    wrapped = Logits(tiny_llama(*PATTERNS["dilated"], layers=1) if model == "llama" else
                     tiny_gpt_oss(*PATTERNS["bigbird"]))
    ids, mask = left_padded([0, 4], seed=9)
    batch, length = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("length", min=2, max=64)
    program = torch.export.export(wrapped, (ids, mask), dynamic_shapes=({0: batch, 1: length},) * 2).module()
    (op,) = [node for node in program.graph.nodes if str(node.target) == "attention.hf_attend_padded.default"]
    sinks = op.args[6] if len(op.args) > 6 else op.kwargs.get("sinks")
    assert (sinks is not None) == (model == "gpt-oss"), op.args
    hf.register()  # the exported op finds its module again after the cache is emptied
    ids, mask = left_padded([2, 0, 7], seed=10)
    ids, mask = ids[:, :11], mask[:, :11]
    real = mask.bool()
    torch.testing.assert_close(program(ids, mask)[real], wrapped(ids, mask)[real], rtol=0, atol=1e-5)
