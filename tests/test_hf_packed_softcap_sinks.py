"""Padding-free batches (transformers' ``DataCollatorWithFlattening``) of
models that soft-cap their scores (Gemma 2) or add attention sinks
(gpt-oss), each mixing a sliding-window layer (dense, under the model's own
mask) with a full-attention layer (dilated or block-sparse at full-coverage
settings), as tiny random float64 configs built in code:

- every form the collator produces (restarting position_ids with and
  without a cache, the flash kwargs ``cu_seq_lens_q/k``) gives each
  document the logits of that document run alone through the same model
  (so the soft-cap and the sinks are applied per document, in the sliding
  layers too, and no document sees another; the documents alone equal the
  model's eager attention in tests/test_hf_mixed.py, whose eager softmax
  runs in float32);
- the loss and every parameter's gradient (the sinks' included) equal
  those of the padded batch of the same documents.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")  # installed by `make test` (the test extra)

import attention.hf as hf  # noqa: E402
from hf_tiny import VOCAB, documents, flattened, loss_and_grads, padded  # noqa: E402
from transformers import AutoModelForCausalLM, Gemma2Config, GptOssConfig  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:this model's config carries patternstore_attention"),
              pytest.mark.filterwarnings("ignore:.*RoPE scaling factor")]

WINDOW = 8
LENGTHS = (9, 1, 14, 6, 3, 20)  # two documents longer than the window: it slides inside them
# hf_tiny.FORMS but "flash_kwargs_only", whose positions 0..total-1 move logits by float32 rotary rounding
# (tests/test_hf_packed.py holds that form to 1e-5).
FORMS = ("position_ids", "position_ids_with_cache", "flash_kwargs")
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=None, eos_token_id=None,
             sliding_window=WINDOW, attention_dropout=0.0)
MODELS = {
    # Large weights and a cap of 2 put the scores where tanh bends (tests/test_hf_mixed.py checks that
    # removing the cap, or the sinks, changes the logits of these configs).
    "gemma2": (Gemma2Config, dict(head_dim=8, attn_logit_softcapping=2.0, final_logit_softcapping=None,
                                  initializer_range=1.0, query_pre_attn_scalar=8)),
    "gpt-oss": (GptOssConfig, dict(head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                                   layer_types=["sliding_attention", "full_attention"],
                                   experts_implementation="eager")),  # grouped_mm takes no float64
}
COVERING = {  # a pattern over every pair: each document's result must be full attention's
    hf.DILATED: {"segment_lengths": [64], "dilation_rates": [1]},
    hf.SPARSE: {"kind": "dense", "block_size": 8, "attention": "unidirectional"},
}
# (collator arguments, forward arguments)


@pytest.fixture(autouse=True, scope="module")
def registered():
    hf.register()


def build(name: str, impl: str):
    """A float64 model of ``name`` running ``impl`` (full coverage; sliding layers dense)."""
    config_class, kwargs = MODELS[name]
    torch.manual_seed(0)
    config = config_class(**{**SMALL, **kwargs}, attn_implementation=impl, patternstore_attention=COVERING[impl])
    model = AutoModelForCausalLM.from_config(config).double().eval()
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    if name == "gpt-oss":  # sinks initialised to 0 by default; random ones make them matter
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.self_attn.sinks, std=1.0)
    return model


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("impl", [hf.DILATED, hf.SPARSE], ids=["dilated", "sparse"])
@pytest.mark.parametrize("name", MODELS)
@torch.no_grad()
def test_each_document_gets_its_logits_alone(name, impl, form):
    model = build(name, impl)
    docs = documents(LENGTHS, seed=0)
    logits = model(**flattened(docs, form)).logits[0]
    whole = model(torch.tensor([sum(docs, [])]), use_cache=False).logits[0]
    start = 0
    for doc in docs:
        alone = model(torch.tensor([doc]), use_cache=False).logits[0]
        torch.testing.assert_close(logits[start:start + len(doc)], alone, rtol=1e-10, atol=1e-10, msg=str(len(doc)))
        start += len(doc)
    # the check can fail: the same tokens as one unpacked sequence attend across documents
    assert not torch.allclose(whole[len(docs[0]):], logits[len(docs[0]):], rtol=0, atol=1e-6)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name, impl", [("gemma2", hf.DILATED), ("gpt-oss", hf.SPARSE)])
def test_loss_and_gradients_equal_the_padded_batch(name, impl, form):
    model = build(name, impl).train()
    docs = documents(LENGTHS, seed=1)
    _, want_loss, want = loss_and_grads(model, padded(docs))
    _, loss, got = loss_and_grads(model, flattened(docs, form))
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=1e-11)
    if name == "gpt-oss":
        assert all(want[f"model.layers.{i}.self_attn.sinks"].abs().max() > 1e-4 for i in range(2))
    for param, grad in want.items():
        # Gemma's RMSNorm computes in float32: its weights' gradients are float32 sums over the tokens,
        # which the padded and the packed layout add in another order.
        float32 = name == "gemma2" and param.endswith("norm.weight")
        rtol, atol = (1e-6, 1e-6 * float(grad.abs().max())) if float32 else (1e-9, 1e-11)
        torch.testing.assert_close(got[param], grad, rtol=rtol, atol=atol, msg=param)
