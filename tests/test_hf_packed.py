"""Hugging Face padding-free training (attention.hf.packed): tiny float64
models fed transformers' own ``DataCollatorWithFlattening`` batches, in
every form it has (restarting position_ids, with or without a cache; the
flash kwargs cu_seq_lens_q/k, with or without position_ids), give each
document's logits exactly as the document run alone through the same
model, and the loss, gradients and optimizer steps of the padded batch of
the same documents. Masks that are neither causal, bidirectional nor packed
are still refused, naming what was asked."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")  # installed by `make test` (the test extra)

import attention.hf.registration as hf  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from transformers.masking_utils import create_causal_mask  # noqa: E402
from hf_tiny import FORMS, documents, float64_loss, flattened, loss_and_grads, padded  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 64
DILATED = {"segment_lengths": [4, 8], "dilation_rates": [1, 2]}
BIGBIRD = {"kind": "bigbird", "block_size": 4, "num_random_blocks": 1, "num_sliding_window_blocks": 3,
           "num_global_blocks": 1, "attention": "unidirectional"}
IMPLEMENTATIONS = {"dilated": (hf.DILATED, DILATED), "sparse": (hf.SPARSE, BIGBIRD)}
LENGTHS = (9, 1, 14, 6, 3)  # one token alone; none a multiple of a segment or block's worth everywhere
# (collator arguments, forward arguments): every form the collator produces
# Without position_ids the model numbers the packed row 0..total-1: rotary embeddings are relative, but
# transformers computes their phases in float32, so a document's logits move by float32 rounding.
TOLERANCE = {form: 1e-5 if form == "flash_kwargs_only" else 1e-10 for form in FORMS}


@pytest.fixture(autouse=True, scope="module")
def registered():
    hf.register()


def tiny_model(arch: str, impl: str, settings: dict, seed: int = 0, layers: int = 2):
    """A float64 model of ``arch`` (2 layers, or an even ``layers``): "llama", "qwen2", or "qwen2-sliding"
    (sliding-window layers, dense, alternating with full-attention layers)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=None,
                  eos_token_id=None, attn_implementation=impl)
    if arch == "llama":
        config = LlamaConfig(**common, patternstore_attention=settings)
        return LlamaForCausalLM(config).double().eval()
    if arch == "qwen2":
        config = Qwen2Config(**common, use_sliding_window=False, patternstore_attention=settings)
    else:
        config = Qwen2Config(**common, use_sliding_window=True, sliding_window=5, max_window_layers=0,
                             layer_types=["sliding_attention", "full_attention"] * (layers // 2),
                             patternstore_attention={"full_attention": settings, "sliding_attention": "dense"})
    return Qwen2ForCausalLM(config).double().eval()


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen2-sliding"])
@torch.no_grad()
def test_each_document_gets_its_logits_alone(arch, impl, form):
    model = tiny_model(arch, *IMPLEMENTATIONS[impl])
    docs = documents(LENGTHS, vocab=VOCAB)
    logits = model(**flattened(docs, form)).logits[0]
    start = 0
    for doc in docs:
        alone = model(torch.tensor([doc]), use_cache=False).logits[0]
        torch.testing.assert_close(logits[start:start + len(doc)], alone, rtol=0, atol=TOLERANCE[form],
                                   msg=f"{len(doc)}")
        start += len(doc)
    # the check can fail: the same tokens as one unpacked sequence attend across documents
    whole = model(torch.tensor([sum(docs, [])]), use_cache=False).logits[0]
    assert not torch.allclose(whole[len(docs[0]):], logits[len(docs[0]):], rtol=0, atol=1e-6)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_loss_and_gradients_equal_the_padded_batch(arch, impl, form):
    model = tiny_model(arch, *IMPLEMENTATIONS[impl]).train()
    docs = documents(LENGTHS, seed=1, vocab=VOCAB)
    want_hf_loss, want_loss, want = loss_and_grads(model, padded(docs))
    hf_loss, loss, got = loss_and_grads(model, flattened(docs, form))
    torch.testing.assert_close(hf_loss, want_hf_loss, rtol=2e-6, atol=0)  # float32, summed in another order
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=TOLERANCE[form] / 10)
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=TOLERANCE[form] * 10, atol=TOLERANCE[form] / 10, msg=name)


@pytest.mark.parametrize("form", ["position_ids_with_cache", "flash_kwargs"])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_optimizer_steps_equal_the_padded_batches(impl, form):
    packed_model = tiny_model("llama", *IMPLEMENTATIONS[impl]).train()
    padded_model = copy.deepcopy(packed_model)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (packed_model, padded_model)]
    for step in range(3):
        docs = documents(LENGTHS, seed=10 + step, vocab=VOCAB)
        for model, optimizer, batch in zip((packed_model, padded_model), optimizers,
                                           (flattened(docs, form), padded(docs))):
            optimizer.zero_grad()
            float64_loss(model(**batch).logits, batch["labels"]).backward()
            optimizer.step()
    for (name, got), want in zip(packed_model.named_parameters(), padded_model.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9, msg=name)
    assert not torch.equal(packed_model.lm_head.weight, tiny_model("llama", *IMPLEMENTATIONS[impl]).lm_head.weight)


def test_a_custom_mask_is_still_refused_naming_it():
    model = tiny_model("llama", hf.DILATED, DILATED)
    embeds = torch.zeros(1, 6, 32, dtype=torch.float64)

    def first_two(batch_idx, head_idx, q_idx, kv_idx):
        return kv_idx < 2

    with pytest.raises(ValueError, match="another mask .*or_mask"):
        create_causal_mask(config=model.config, inputs_embeds=embeds, attention_mask=None, cache=None,
                           or_mask_function=first_two)
    restarting = torch.tensor([[0, 1, 2, 0, 1, 2]])  # packed, and an and-mask on top: not a packed mask
    with pytest.raises(ValueError, match="another mask .*and_mask"):
        create_causal_mask(config=model.config, inputs_embeds=embeds, attention_mask=None, cache=None,
                           position_ids=restarting, and_mask_function=first_two)
    mask = create_causal_mask(config=model.config, inputs_embeds=embeds, attention_mask=None, cache=None,
                              position_ids=restarting)  # packed alone: taken
    assert mask.shape == (1, 1, 1, 6) and bool(mask.all())


@pytest.mark.parametrize("kwargs, message", [
    ({"cu_seq_lens_q": torch.tensor([0, 3, 6], dtype=torch.int32)}, "come together.*cu_seq_lens_q"),
    ({"cu_seq_lens_q": torch.tensor([0, 3, 6], dtype=torch.int32),
      "cu_seq_lens_k": torch.tensor([0, 2, 6], dtype=torch.int32)}, "cu_seq_lens_k must equal cu_seq_lens_q"),
    ({"cu_seq_lens_q": torch.tensor([0, 3, 5]), "cu_seq_lens_k": torch.tensor([0, 3, 5])},
     "cu_seqlens must end at the sequence length 6"),
])
def test_bad_flash_kwargs_name_the_field(kwargs, message):
    model = tiny_model("llama", hf.DILATED, DILATED)
    with pytest.raises(ValueError, match=message):
        model(torch.randint(1, VOCAB, (1, 6)), use_cache=False, **kwargs)


def test_flash_kwargs_with_padding_are_refused():
    model = tiny_model("llama", hf.SPARSE, BIGBIRD)
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seq_lens_q .*takes no padding"):
        model(torch.randint(1, VOCAB, (1, 6)), attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1]]),
              cu_seq_lens_q=cu, cu_seq_lens_k=cu, use_cache=False)


@torch.no_grad()
def test_a_mask_used_again_with_other_position_ids_is_read_again():
    """A layer keeps what it found in position_ids on the mask for the forward's other layers; the same
    mask with other (or in-place changed) position_ids is read again, never answered from the old ones."""
    from types import SimpleNamespace

    layer = SimpleNamespace(config=SimpleNamespace(patternstore_attention=DILATED), is_causal=True)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, 10, 8, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(1, 1, 1, 10, dtype=torch.bool)

    def attend(position_ids):
        return hf.dilated_attention_forward(layer, q, k, v, mask, position_ids=position_ids)[0]

    def alone(start, end):
        return hf.dilated_attention_forward(layer, q[:, :, start:end], k[:, :, start:end], v[:, :, start:end],
                                            None)[0]

    one = torch.arange(10)[None]
    two = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])
    torch.testing.assert_close(attend(one), alone(0, 10), rtol=0, atol=1e-12)
    torch.testing.assert_close(attend(two), torch.cat([alone(0, 4), alone(4, 10)], dim=1), rtol=0, atol=1e-12)
    two[0, 4:] = torch.arange(4, 10)  # in place: one document again
    torch.testing.assert_close(attend(two), alone(0, 10), rtol=0, atol=1e-12)


@pytest.mark.parametrize("use_cache", [False, True])
@torch.no_grad()
def test_several_packed_rows_each_keep_their_documents(use_cache):
    """position_ids of shape (batch, length), each row packed its own way: one module call per row."""
    model = tiny_model("llama", hf.SPARSE, BIGBIRD)
    docs = documents(LENGTHS, seed=5, vocab=VOCAB)
    rows = [[docs[0], docs[1], docs[3]], [docs[2][:13], docs[4]]]  # 9 + 1 + 6 and 13 + 3 tokens
    ids = torch.tensor([sum(row, []) for row in rows])
    positions = torch.tensor([[p for doc in row for p in range(len(doc))] for row in rows])
    logits = model(ids, position_ids=positions, use_cache=use_cache).logits
    for b, row in enumerate(rows):
        start = 0
        for doc in row:
            alone = model(torch.tensor([doc]), use_cache=False).logits[0]
            torch.testing.assert_close(logits[b, start:start + len(doc)], alone, rtol=0, atol=1e-10)
            start += len(doc)


@pytest.mark.parametrize("form", ["flash_kwargs", "flash_kwargs_only"])
@pytest.mark.parametrize("arch", ["llama", "qwen2-sliding"])
@torch.no_grad()
def test_flash_kwargs_are_read_on_the_host_once_per_forward(arch, form, monkeypatch):
    """Every layer (full and dense) takes the first layer's read of cu_seq_lens_q / _k; a new batch's
    tensors, and tensors changed in place, are read again and never answered from the old read."""
    import attention.hf.packed as hf_packed

    reads = []
    read = hf_packed._read_bounds
    monkeypatch.setattr(hf_packed, "_read_bounds", lambda cu_q, cu_k: reads.append(cu_q.tolist()) or read(cu_q, cu_k))
    model = tiny_model(arch, *IMPLEMENTATIONS["dilated"], layers=4)
    docs = documents(LENGTHS, vocab=VOCAB)

    def check(batch_docs, batch, count):
        logits = model(**batch).logits[0]
        assert len(reads) == count, reads
        start = 0
        for doc in batch_docs:
            alone = model(torch.tensor([doc]), use_cache=False).logits[0]
            torch.testing.assert_close(logits[start:start + len(doc)], alone, rtol=0, atol=TOLERANCE[form])
            start += len(doc)
        return logits

    check(docs, flattened(docs, form), 1)
    other = [docs[2], docs[0], docs[4], docs[1], docs[3]]  # the next batch: other boundaries
    batch = flattened(other, form)
    check(other, batch, 2)
    # The same tensors changed in place to the first batch's split (over the other batch's tokens).
    first = flattened(docs, form)
    batch["cu_seq_lens_q"].copy_(first["cu_seq_lens_q"])
    batch["cu_seq_lens_k"].copy_(first["cu_seq_lens_k"])
    changed = model(**batch).logits
    assert len(reads) == 3 and reads[-1] == first["cu_seq_lens_q"].tolist()
    fresh = {**batch, "cu_seq_lens_q": first["cu_seq_lens_q"], "cu_seq_lens_k": first["cu_seq_lens_k"]}
    torch.testing.assert_close(changed, model(**fresh).logits, rtol=0, atol=0)


def test_a_packed_batch_runs_under_inference_mode():
    """Inference tensors count no versions: nothing is kept on them, and every layer reads them."""
    model = tiny_model("qwen2-sliding", *IMPLEMENTATIONS["sparse"])
    docs = documents(LENGTHS, seed=4, vocab=VOCAB)
    with torch.inference_mode():
        for form in ("position_ids_with_cache", "flash_kwargs"):
            batch = {name: value.clone() if isinstance(value, torch.Tensor) else value
                     for name, value in flattened(docs, form).items()}  # inference tensors
            logits = model(**batch).logits[0]
            start = 0
            for doc in docs:
                alone = model(torch.tensor([doc]), use_cache=False).logits[0]
                torch.testing.assert_close(logits[start:start + len(doc)], alone, rtol=0, atol=1e-10)
                start += len(doc)
