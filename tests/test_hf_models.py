"""attention.hf across models (tiny configs built in code, no downloads): a
saved model reloads with its attention through a plain ``from_pretrained``
(same logits), a config that carries the settings but runs another
implementation warns once naming the argument that restores it, families
without a window run, and DeepSeek-style multi-head latent attention (value head_dim != query/key
head_dim) equals SDPA where the pattern is dense."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")  # installed by `make test` (the test extra)

import attention.hf.registration as hf  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    DeepseekV3Config,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    Qwen2Config,
)

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=None, eos_token_id=None)
DILATED = {"segment_lengths": [4, 8], "dilation_rates": [1, 2]}
BIGBIRD = {"kind": "bigbird", "block_size": 4, "num_random_blocks": 1, "num_sliding_window_blocks": 3,
           "num_global_blocks": 1, "attention": "unidirectional"}


@pytest.fixture(autouse=True, scope="module")
def registered():
    hf.register()


def ids(length: int = 29, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


def build(config_class, model_class=AutoModelForCausalLM, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return model_class.from_config(config_class(**{**SMALL, **kwargs})).eval()


# --------------------------------------------------------------- round trip
@pytest.mark.parametrize("impl, settings", [(hf.DILATED, DILATED), (hf.SPARSE, BIGBIRD)], ids=["dilated", "bigbird"])
@torch.no_grad()
def test_a_saved_model_reloads_with_its_attention_through_plain_from_pretrained(impl, settings, tmp_path):
    model = build(LlamaConfig, attn_implementation=impl, patternstore_attention=settings)
    x = ids()
    logits = model(x).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["attn_implementation"] == impl and saved[hf.CONFIG_ATTRIBUTE] == settings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
        assert reloaded.config._attn_implementation == impl
        torch.testing.assert_close(reloaded(x).logits, logits, rtol=0, atol=0)
    assert not [w for w in caught if hf.CONFIG_ATTRIBUTE in str(w.message)]  # its own attention: no warning
    # Not a dense model in disguise: sdpa over the same weights differs.
    reloaded.set_attn_implementation("sdpa")
    with pytest.warns(UserWarning):
        assert (reloaded(x).logits - logits).abs().max() > 1e-3


@torch.no_grad()
def test_a_config_with_settings_that_runs_another_implementation_warns_once_naming_the_argument(tmp_path):
    model = build(LlamaConfig, attn_implementation=hf.DILATED, patternstore_attention=DILATED)
    x = ids()
    logits = model(x).logits
    model.save_pretrained(tmp_path)
    dense = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    with pytest.warns(UserWarning, match=r"attn_implementation='patternstore_dilated'") as caught:
        dense(x)
        dense(x)
    assert len([w for w in caught if hf.CONFIG_ATTRIBUTE in str(w.message)]) == 1
    restored = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation=hf.DILATED).eval()
    torch.testing.assert_close(restored(x).logits, logits, rtol=0, atol=0)


@torch.no_grad()
def test_a_new_config_warns_even_where_a_dead_config_held_its_id(monkeypatch):
    """Python reuses a dead object's id: the record of warned configs must
    not take a new config for an old one (the warning went missing in a
    test run once). Planted here as another object under the new config's id."""
    model = build(LlamaConfig, attn_implementation="sdpa", patternstore_attention=DILATED)
    stand_in = LlamaConfig()  # what a config warned about earlier, at the same address, looks like
    monkeypatch.setitem(hf._warned, id(model.config), stand_in)
    with pytest.warns(UserWarning, match=hf.CONFIG_ATTRIBUTE):
        model(ids())


# ------------------------------------------------- without a window (tests/test_hf_mixed.py: with one)
@pytest.mark.parametrize("config_class, kwargs", [
    (MistralConfig, {"sliding_window": None}),
    (Qwen2Config, {"use_sliding_window": False}),
], ids=["mistral-without-window", "qwen2-default"])
@torch.no_grad()
def test_the_same_families_without_a_window_run(config_class, kwargs):
    model = build(config_class, attn_implementation=hf.DILATED, patternstore_attention=DILATED, **kwargs)
    assert torch.isfinite(model(ids()).logits).all()


# ------------------------------------------------------------------- MLA
def deepseek(impl: str, settings: dict):
    """A tiny DeepSeek-V3: query/key head_dim 16 + 8 (nope + rope), value head_dim 16."""
    return build(
        DeepseekV3Config, attn_implementation=impl, patternstore_attention=settings, num_key_value_heads=4,
        kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
        first_k_dense_replace=2, n_shared_experts=1,
    )


@pytest.mark.parametrize("impl, settings", [
    (hf.DILATED, {"segment_lengths": [64], "dilation_rates": [1]}),
    (hf.SPARSE, {"kind": "dense", "block_size": 8, "attention": "unidirectional"}),
], ids=["dilated", "sparse-dense"])
def test_deepseek_latent_attention_equals_sdpa_in_logits_and_gradients(impl, settings):
    model = deepseek("sdpa", settings)
    x = ids(37)
    head_dims = {layer.self_attn.qk_head_dim for layer in model.model.layers}
    assert head_dims == {24} and model.config.v_head_dim == 16  # value head_dim != query/key head_dim

    def run():
        model.zero_grad()
        out = model(x, labels=x)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    with pytest.warns(UserWarning):  # the config carries settings while running sdpa
        want_logits, want_grads = run()
    model.set_attn_implementation(impl)
    logits, grads = run()
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
