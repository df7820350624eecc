"""Compiled training and dynamic shapes of a tiny transformers Llama with
each patternstore implementation, as a user writes them:

- ``torch.compile(model, fullgraph=True)`` training steps (forward, loss,
  backward, an SGD step), with and without a padding mask, give the eager
  step's loss, gradients and updated weights; the backward starts from what
  the forward saved (its out and log-sum-exp): no second forward. Inductor
  for one (it asserts the strides the fake kernels promise: the backward
  crashed there), aot_eager for the rest (the same trace, no code generation).
- ``torch.compile(model, dynamic=True)``, with and without ``fullgraph``: one
  graph for the whole model, no recompile across lengths and padding
  patterns, the eager logits.

Each compile costs seconds to tens of seconds on this CPU, so there are few."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")  # installed by `make test` (the test extra)

import attention.hf.registration as hf  # noqa: E402
import attention.hf.training as hf_training  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from hf_tiny import PATTERNS, VOCAB, llama_config, recording  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(autouse=True)
def fresh(fresh_dynamo):
    hf.register()


def tiny_llama(pattern: str, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(*PATTERNS[pattern], layers))


def batch(length: int, pads: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask): row b's first ``pads[b]`` tokens are padding."""
    ids = torch.randint(1, VOCAB, (len(pads), length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        ids[row, :pad], mask[row, :pad] = 0, 0
    return ids, mask


def training_step(model, forward, ids, mask):
    """One SGD step: (loss, gradients, weights after the step). (Adam's first
    step is lr * sign(grad): a gradient of 1e-9 rounded differently by
    inductor moves a weight by 2 lr.)"""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.01)
    labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    loss = forward(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    optimizer.step()
    return loss.detach(), grads, {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_same_step(got, want):
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("pattern, backend, padded", [
    ("dilated", "inductor", True), ("bigbird", "aot_eager", True),
    ("dilated", "aot_eager", False), ("bigbird", "aot_eager", False),
])
def test_a_compiled_training_step_equals_the_eager_step_without_a_second_forward(pattern, backend, padded,
                                                                                 monkeypatch):
    layers = 1 if backend == "inductor" else 2  # inductor's forward and backward code generation: the cost
    ids, mask = batch(16, [0, 5], seed=1)
    mask = mask if padded else None
    eager = tiny_llama(pattern, layers).train()
    want = training_step(eager, eager, ids, mask)

    calls = {"forward": 0, "backward": 0}

    def counted(name):
        original = getattr(hf_training, name)

        def wrapper(*args, **kwargs):
            calls[name.strip("_")] += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(hf_training, name, wrapper)

    counted("_forward"), counted("_backward")
    model = tiny_llama(pattern, layers).train()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    runs = 2 if padded else 1  # padded: row 1 runs on its own
    got_loss = compiled(input_ids=ids, attention_mask=mask, labels=ids if mask is None else
                        ids.masked_fill(mask == 0, -100)).loss
    assert calls == {"forward": layers * runs, "backward": 0}
    got_loss.backward()
    assert calls == {"forward": layers * runs, "backward": layers * runs}  # the backward ran no forward
    model.zero_grad()
    assert_same_step(training_step(model, compiled, ids, mask), want)


@pytest.mark.parametrize("pattern", ["dilated", "bigbird"])
@pytest.mark.parametrize("fullgraph", [True, False])
@torch.no_grad()
def test_dynamic_shapes_compile_one_graph_for_every_length_and_padding(pattern, fullgraph):
    model = tiny_llama(pattern).eval()
    graphs = []
    compiled = torch.compile(model, dynamic=True, fullgraph=fullgraph, backend=recording(graphs))
    cases = [(13, [0, 4]), (17, [0, 0]), (21, [6, 0]), (30, [2, 9]), (9, [0, 3])]
    for number, (length, pads) in enumerate(cases):
        ids, mask = batch(length, pads, seed=number)
        if number < 2:  # warm-up: the first two lengths
            got = compiled(input_ids=ids, attention_mask=mask).logits
        else:
            with torch.compiler.set_stance("fail_on_recompile"):
                got = compiled(input_ids=ids, attention_mask=mask).logits
        want = model(input_ids=ids, attention_mask=mask).logits
        real = mask.bool()
        torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-5, msg=f"{length} {pads}")
    # The whole model in one graph: no graph break, no recompile (dynamo also hands the backend one empty
    # graph of a wrapper frame, as it does with sdpa).
    assert len([g for g in graphs if any(node.op == "call_function" for node in g.graph.nodes)]) == 1


@torch.no_grad()
def test_a_compiled_call_without_mask_or_cache_names_the_mask_to_pass():
    """transformers cannot rule out packed sequences in a traced region without a mask and a cache (it
    passes its packed-sequence mask function): the error says what to pass, and passing it compiles."""
    model = tiny_llama("dilated").eval()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    ids, mask = batch(12, [0, 0], seed=3)
    with pytest.raises(Exception, match=r"pass attention_mask \(e.g. torch.ones_like\(input_ids\)\)"):
        compiled(input_ids=ids, use_cache=False)
    got = compiled(input_ids=ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(got, model(input_ids=ids, use_cache=False).logits, rtol=0, atol=1e-5)
