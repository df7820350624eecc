"""attention.hf on models that mix sliding-window and full-attention layers,
soft-cap their scores or add attention sinks: Gemma 2 (soft-cap), Gemma 3,
Mistral with its window, Qwen2 with ``use_sliding_window``, gpt-oss (sinks)
and Cohere 2, as tiny random configs built in code (2 layers, hidden 32,
windows of 8 tokens under 29-40-token sequences, so every window slides).

- Full-coverage settings (a pattern that covers every pair): logits of a
  left-padded batch, a float64 training step's gradients (sinks' included),
  and greedy generation
  with a static and a dynamic cache (sliding-window cache layers included)
  equal the model's own eager attention.
- Real settings: every attention call of a forward equals a float64 dense
  reference of that layer (tests/dense_reference.py): the window for
  sliding layers, the dilated or block-sparse pattern for full ones, the
  model's soft-cap and sinks in both.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")  # installed by `make test` (the test extra)

import attention.hf.registration as hf  # noqa: E402
from attention.sparse.module import BlockSparseAttention
from attention.dense_reference import block_pairs, dense_attention, multiplicity  # noqa: E402
from transformers import (  # noqa: E402
    AttentionInterface,
    AutoModelForCausalLM,
    Cohere2Config,
    Gemma2Config,
    Gemma3TextConfig,
    GptOssConfig,
    MistralConfig,
    Qwen2Config,
)

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:this model's config carries patternstore_attention"),
              pytest.mark.filterwarnings("ignore:.*RoPE scaling factor")]

VOCAB = 96
WINDOW = 8
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=None, eos_token_id=None,
             sliding_window=WINDOW)
MIXED = ["sliding_attention", "full_attention"]
MODELS = {
    # Large weights and a cap of 2 put the scores where tanh bends: removing the cap changes the logits.
    "gemma2": (Gemma2Config, dict(head_dim=8, attn_logit_softcapping=2.0, final_logit_softcapping=None,
                                  initializer_range=1.0, query_pre_attn_scalar=8)),
    "gemma3": (Gemma3TextConfig, dict(head_dim=8, layer_types=MIXED)),
    "mistral": (MistralConfig, {}),  # every layer slides
    "qwen2": (Qwen2Config, dict(use_sliding_window=True, max_window_layers=1)),  # layer 1 slides
    "gpt-oss": (GptOssConfig, dict(head_dim=8, num_local_experts=4, num_experts_per_tok=2, layer_types=MIXED,
                                   experts_implementation="eager")),  # grouped_mm takes no float64
    "cohere2": (Cohere2Config, dict(layer_types=MIXED)),
}
COVERING = {  # settings whose pattern covers every pair: the result must equal full attention
    hf.DILATED: {"segment_lengths": [64], "dilation_rates": [1]},
    hf.SPARSE: {"kind": "dense", "block_size": 8, "attention": "unidirectional"},
}
REAL = {
    hf.DILATED: {"segment_lengths": [8, 16], "dilation_rates": [1, 2]},
    hf.SPARSE: {"kind": "bigbird", "block_size": 4, "num_random_blocks": 1, "num_sliding_window_blocks": 3,
                "num_global_blocks": 1, "attention": "unidirectional"},
}


@pytest.fixture(autouse=True, scope="module")
def registered():
    hf.register()


def build(name: str, settings, dtype=torch.float32):
    config_class, kwargs = MODELS[name]
    torch.manual_seed(0)
    config = config_class(**{**SMALL, **kwargs}, attn_implementation="eager", patternstore_attention=settings)
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    if name == "gpt-oss":  # sinks initialised to 0 by default; random ones make them matter
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.self_attn.sinks, std=1.0)
    return model


def padded_batch(length: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (2, length), generator=torch.Generator().manual_seed(length))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding, as generate pads
    return ids, mask


def test_every_family_declares_the_layers_these_tests_mean():
    kinds = {}
    for name in MODELS:
        config = build(name, COVERING[hf.DILATED]).config
        kinds[name] = list(getattr(config, "layer_types", None) or ["sliding_attention"] * 2)
        assert config.sliding_window == WINDOW
    assert all("sliding_attention" in kind for kind in kinds.values())
    assert sum("full_attention" in kind for kind in kinds.values()) == 5  # all but Mistral mix the two


# ------------------------------------------------------------ full coverage
@pytest.mark.parametrize("impl", [hf.DILATED, hf.SPARSE], ids=["dilated", "sparse"])
@pytest.mark.parametrize("name", list(MODELS))
@torch.no_grad()
def test_full_coverage_logits_of_a_padded_batch_equal_eager(name, impl):
    model = build(name, COVERING[impl])
    ids, mask = padded_batch(29)
    want = model(ids, attention_mask=mask).logits
    model.set_attn_implementation(impl)
    got = model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["gemma2", "gpt-oss"])
@torch.no_grad()
def test_the_soft_cap_and_the_sinks_change_what_eager_computes(name):
    """The features the other tests check are not no-ops in these configs."""
    model = build(name, COVERING[hf.DILATED])
    ids, _ = padded_batch(29)
    want = model(ids).logits
    if name == "gemma2":
        model.config.attn_logit_softcapping = None
        for layer in model.model.layers:
            layer.self_attn.attn_logit_softcapping = None
    else:
        for layer in model.model.layers:
            torch.nn.init.constant_(layer.self_attn.sinks, -1e4)  # exp(-1e4) = 0: no sink
    assert (model(ids).logits - want).abs().max() > 1e-3


@pytest.mark.parametrize("name, impl", [("gemma2", hf.DILATED), ("gpt-oss", hf.SPARSE), ("qwen2", hf.DILATED)])
def test_full_coverage_training_gradients_equal_eager(name, impl):
    model = build(name, COVERING[impl], dtype=torch.float64).train()
    ids, _ = padded_batch(29)  # unpadded: eager's float64 padded rows are NaN (min + score overflows to -inf)

    def step():
        model.zero_grad()
        out = model(ids, labels=ids)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want_loss, want = step()
    model.set_attn_implementation(impl)
    loss, got = step()
    # transformers' eager softmax runs in float32 even for float64 models: its precision bounds these.
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
    assert set(got) == set(want)
    for n, grad in want.items():
        torch.testing.assert_close(got[n], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item(), msg=n)
    if name == "gpt-oss":
        assert all(model.model.layers[i].self_attn.sinks.grad.abs().max() > 0 for i in range(2))


@pytest.mark.parametrize("cache", ["static", "dynamic"])
@pytest.mark.parametrize("name, impl", [(name, (hf.DILATED, hf.SPARSE)[i % 2]) for i, name in enumerate(MODELS)])
@torch.no_grad()
def test_full_coverage_greedy_generation_equals_eager(name, impl, cache):
    model = build(name, COVERING[impl])
    ids, mask = padded_batch(13)  # 13 + 10 tokens: past the window of 8, so sliding caches drop tokens
    options = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, output_scores=True,
                   return_dict_in_generate=True)
    if cache == "static":
        options["cache_implementation"] = "static"
    want = model.generate(ids, **options)
    model.set_attn_implementation(impl)
    got = model.generate(ids, **options)
    assert torch.equal(got.sequences, want.sequences)
    for step_got, step_want in zip(got.scores, want.scores):
        torch.testing.assert_close(step_got, step_want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------ real settings
def reference_layer(impl: str, settings: dict, query, key, value, kwargs) -> torch.Tensor:
    """float64 dense reference of one call: (b, n, h, d_v)."""
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    n, h = q.shape[1], q.shape[2]
    weight = None
    window = kwargs.get("sliding_window")
    if window is None and impl == hf.DILATED:
        weight = multiplicity(n, h, settings["segment_lengths"], settings["dilation_rates"], "longnet", True)
    elif window is None:
        kind = BlockSparseAttention(**settings)
        counts, indices = kind.layouts.layout(n, h, torch.device("cpu"), True)
        weight = block_pairs(counts, indices, n, settings["block_size"])
    return dense_attention(q, k, v, weight=weight, is_causal=True, scale=kwargs["scaling"], window=window,
                           softcap=kwargs.get("softcap"), sinks=kwargs.get("s_aux"))


@pytest.mark.parametrize("impl", [hf.DILATED, hf.SPARSE], ids=["dilated", "sparse"])
@pytest.mark.parametrize("name", list(MODELS))
@torch.no_grad()
def test_every_layer_under_real_settings_equals_its_float64_reference(name, impl):
    model = build(name, REAL[impl], dtype=torch.float64)
    original = AttentionInterface._global_mapping[impl]
    calls = []

    def recorded(module, query, key, value, attention_mask, **kwargs):
        out, weights = original(module, query, key, value, attention_mask, **kwargs)
        calls.append((query, key, value, kwargs, out))
        return out, weights

    AttentionInterface.register(impl, recorded)
    try:
        model.set_attn_implementation(impl)
        model(torch.randint(1, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1)))
    finally:
        hf.register()
    assert len(calls) == 2
    windows = [kwargs.get("sliding_window") for *_, kwargs, _ in calls]
    assert WINDOW in windows
    for query, key, value, kwargs, out in calls:
        want = reference_layer(impl, REAL[impl], query, key, value, kwargs)
        torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
        if kwargs.get("sliding_window") is None:  # not full attention: the pattern is real
            full = dense_attention(*(x.transpose(1, 2) for x in (query, key, value)), is_causal=True,
                                   scale=kwargs["scaling"], softcap=kwargs.get("softcap"), sinks=kwargs.get("s_aux"))
            assert (out - full).abs().max() > 1e-3


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("settings", [
    {"full_attention": COVERING[hf.DILATED], "sliding_attention": "dense"},
    {"full_attention": COVERING[hf.DILATED]},
], ids=["both-named", "sliding-default"])
@torch.no_grad()
def test_a_mapping_by_layer_type_names_what_runs(settings):
    model = build("gemma3", settings)
    ids, mask = padded_batch(29)
    want = model(ids, attention_mask=mask).logits
    model.set_attn_implementation(hf.DILATED)
    torch.testing.assert_close(model(ids, attention_mask=mask).logits[mask.bool()], want[mask.bool()], rtol=1e-5,
                               atol=1e-5)
    assert hf.implementation_for(settings) == hf.DILATED


@torch.no_grad()
def test_full_attention_layers_may_run_dense_and_then_equal_eager_under_any_pattern():
    model = build("gemma2", {"full_attention": "dense"})
    ids, mask = padded_batch(29)
    want = model(ids, attention_mask=mask).logits
    model.set_attn_implementation(hf.SPARSE)
    got = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("settings, message", [
    ({"full_attention": REAL[hf.DILATED], "sliding_attention": REAL[hf.DILATED]}, r"\['sliding_attention'\].*window"),
    ({"full_attention": "sparse"}, r"\['full_attention'\].*settings"),
    ({"full_attention": REAL[hf.DILATED], "segment_lengths": [8]}, "mixes layer types"),
], ids=["pattern-for-sliding", "bad-entry", "mixed-keys"])
@torch.no_grad()
def test_a_wrong_mapping_names_the_field(settings, message):
    model = build("gemma2", settings)
    model.set_attn_implementation(hf.DILATED)
    with pytest.raises(ValueError, match=message):
        model(padded_batch(12)[0])


def test_a_layer_type_neither_full_nor_sliding_is_refused_naming_layer_types():
    config = SimpleNamespace(layer_types=["chunked_attention", "full_attention"],
                             patternstore_attention=REAL[hf.DILATED])
    with pytest.raises(ValueError, match="layer_types has 'chunked_attention'"):
        hf.padding_mask(1, 4, 4, config=config)
    q = torch.randn(1, 4, 4, 8)
    with pytest.raises(ValueError, match="layer_types has 'chunked_attention'"):
        hf.dilated_attention_forward(SimpleNamespace(config=config, is_causal=True), q, q, q, None)


def test_sinks_in_a_full_layer_on_the_traced_branch_equal_the_eager_call(monkeypatch):
    """The branch a compiled or exported layer takes (its ops, without a compile:
    tests/test_hf_sinks_compile.py compiles) merges the sinks: the training op
    gives the eager output and gradients (the sinks' included), the padded op the output."""
    model = build("gpt-oss", COVERING[hf.DILATED], dtype=torch.float64)
    model.set_attn_implementation(hf.DILATED)
    layer = model.model.layers[1].self_attn
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 6, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, 6, 8, generator=g, dtype=torch.float64)

    def call():
        inputs = (q.clone().requires_grad_(), k.clone().requires_grad_())
        out = hf.dilated_attention_forward(layer, *inputs, inputs[1], None, scaling=0.3, s_aux=layer.sinks)[0]
        return (out, *torch.autograd.grad(out.sin().sum(), (*inputs, layer.sinks)))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = call()
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the traced branch, without a compile
        got = call()
        with torch.no_grad():
            padded = hf.dilated_attention_forward(layer, q, k, k, None, scaling=0.3, s_aux=layer.sinks)[0]
    for name, a, b in zip(("out", "query", "key", "sinks"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(padded, want[0], rtol=1e-10, atol=1e-12)
    assert want[3].abs().min() > 0
