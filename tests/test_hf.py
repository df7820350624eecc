"""attention.hf inside a tiny transformers Llama built from a config (no
downloads): equality with SDPA where the pattern is dense, cached generation
equal to recomputing the whole sequence, padding, grouped-query attention,
a training step against the float64 dense reference, and the errors."""

from __future__ import annotations

import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")  # installed by `make test` (the test extra)

import attention.hf.modules as hf_modules  # noqa: E402
import attention.hf.registration as hf  # noqa: E402
from attention.dense_reference import dense_dilated_attention
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 96
DILATED = {"segment_lengths": [8, 16, 32], "dilation_rates": [1, 2, 4]}
LOCAL = {"kind": "local", "block_size": 4, "num_sliding_window_blocks": 2, "attention": "unidirectional"}
BIGBIRD = {"kind": "bigbird", "block_size": 4, "num_random_blocks": 1, "num_sliding_window_blocks": 3,
           "num_global_blocks": 1, "attention": "unidirectional"}
PATTERNS = {
    "dilated": (hf.DILATED, DILATED),
    "local": (hf.SPARSE, LOCAL),
    "bigbird": (hf.SPARSE, BIGBIRD),
}


@pytest.fixture(autouse=True, scope="module")
def registered():
    hf.register()


def tiny_llama(impl: str, settings: dict, *, kv_heads: int = 4, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=256, pad_token_id=0, bos_token_id=None,
        eos_token_id=None, attn_implementation=impl, patternstore_attention=settings, dtype=dtype,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def loss_and_grads(model, ids) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------ equal to sdpa
@pytest.mark.parametrize("impl, settings", [
    (hf.DILATED, {"segment_lengths": [64], "dilation_rates": [1]}),
    (hf.SPARSE, {"kind": "dense", "block_size": 8, "attention": "unidirectional"}),
    (hf.SPARSE, {"kind": "dense", "block_size": 8}),  # bidirectional layout, causal model
], ids=["dilated", "sparse-dense", "sparse-dense-bidirectional"])
@pytest.mark.filterwarnings("ignore:this model's config carries patternstore_attention")  # sdpa on purpose
def test_a_dense_pattern_equals_sdpa_in_logits_and_gradients(impl, settings):
    model = tiny_llama("sdpa", settings)
    ids = prompt(45, seed=1)  # not a multiple of the block size
    logits, loss, grads = loss_and_grads(model, ids)
    model.set_attn_implementation(impl)
    ours, our_loss, our_grads = loss_and_grads(model, ids)
    torch.testing.assert_close(ours, logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(our_loss, loss, rtol=0, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


# -------------------------------------------------------------- generation
def no_cache_greedy(model, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy decoding that runs the whole sequence again for every token."""
    logits = []
    for _ in range(new_tokens):
        step = model(ids, use_cache=False).logits[:, -1]
        logits.append(step)
        ids = torch.cat([ids, step.argmax(-1, keepdim=True)], dim=1)
    return ids, logits


def greedy(model, ids, new_tokens, **kwargs):
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         return_dict_in_generate=True, output_logits=True, **kwargs)
    return out.sequences, list(out.logits)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@torch.no_grad()
def test_cached_generation_equals_recomputing_the_whole_sequence(pattern, cache):
    impl, settings = PATTERNS[pattern]
    model = tiny_llama(impl, settings)
    ids = prompt(21, seed=2)  # 21 + 14 tokens cross segment and block boundaries
    expected_ids, expected_logits = no_cache_greedy(model, ids, 14)
    got_ids, got_logits = greedy(model, ids, 14, cache_implementation=cache)
    assert torch.equal(got_ids, expected_ids)
    for step, (got, expected) in enumerate(zip(got_logits, expected_logits)):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5, msg=f"step {step}")


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@torch.no_grad()
def test_padding_changes_no_real_token_of_a_full_forward(pattern, side):
    impl, settings = PATTERNS[pattern]
    model = tiny_llama(impl, settings)
    long, short = prompt(21, seed=3), prompt(13, seed=4)
    pad = torch.zeros(1, long.shape[1] - short.shape[1], dtype=torch.long)
    padded = torch.cat([pad, short], dim=1) if side == "left" else torch.cat([short, pad], dim=1)
    ids = torch.cat([long, padded])
    mask = (ids != 0).long()
    real = mask[1].bool()
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)  # what generate computes from the mask
    logits = model(ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
    torch.testing.assert_close(logits[0], model(long, use_cache=False).logits[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[1, real], model(short, use_cache=False).logits[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("pattern, cache", [("dilated", "dynamic"), ("dilated", "static"), ("bigbird", "dynamic")])
@torch.no_grad()
def test_a_left_padded_batch_gives_each_sequence_what_it_gets_alone(pattern, cache, monkeypatch):
    impl, settings = PATTERNS[pattern]
    model = tiny_llama(impl, settings)
    long, short = prompt(21, seed=3), prompt(13, seed=4)
    pad = long.shape[1] - short.shape[1]
    ids = torch.cat([long, torch.cat([torch.zeros(1, pad, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    shapes = []

    def recording_mask(*args, **kwargs):
        result = hf.padding_mask(*args, **kwargs)
        shapes.append(tuple(result.shape))
        return result

    monkeypatch.setitem(AttentionMaskInterface._global_mapping, impl, recording_mask)
    batch_ids, batch_logits = greedy(model, ids, 10, attention_mask=mask, cache_implementation=cache)
    for row, alone in ((0, long), (1, short)):
        alone_ids, alone_logits = greedy(model, alone, 10, cache_implementation=cache)
        assert torch.equal(batch_ids[row, ids.shape[1]:], alone_ids[0, alone.shape[1]:])
        for step, (got, expected) in enumerate(zip(batch_logits, alone_logits)):
            torch.testing.assert_close(got[row], expected[0], rtol=0, atol=1e-5, msg=f"row {row} step {step}")
    # Never a q_len x kv_len mask: (batch, 1, 1, filled keys); a static cache's is
    # (batch, 2, 1, cache length), one shape at every step (one compiled graph).
    if cache == "static":
        assert shapes and all(s[1:] == shapes[0][1:] for s in shapes) and shapes[0][1:3] == (2, 1)
    else:
        assert shapes and all(s[1:3] == (1, 1) for s in shapes)


# -------------------------------------------------------- grouped-query heads
def repeated_kv_copy(model):
    """The same model with 4 key/value heads: each of the 2 heads' k/v
    projection rows repeated for the 2 query heads it serves."""
    twin = tiny_llama(model.config._attn_implementation, model.config.patternstore_attention, kv_heads=4)
    state = model.state_dict()
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    for name, tensor in list(state.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            state[name] = tensor.view(2, head_dim, -1).repeat_interleave(2, dim=0).reshape(4 * head_dim, -1)
    twin.load_state_dict(state)
    return twin


@pytest.mark.parametrize("pattern", ["dilated", "bigbird"])
@torch.no_grad()
def test_grouped_query_attention_equals_repeated_keys(pattern):
    impl, settings = PATTERNS[pattern]
    model = tiny_llama(impl, settings, kv_heads=2)
    twin = repeated_kv_copy(model)
    ids = prompt(37, seed=5)
    torch.testing.assert_close(model(ids).logits, twin(ids).logits, rtol=0, atol=1e-5)
    got_ids, got_logits = greedy(model, ids[:, :20], 8)
    want_ids, want_logits = greedy(twin, ids[:, :20], 8)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(torch.stack(got_logits), torch.stack(want_logits), rtol=0, atol=1e-5)


def spy(monkeypatch, module, name: str) -> list[tuple]:
    """Record (result, *positional arguments) of every call of ``module.name``."""
    calls: list[tuple] = []
    original = getattr(module, name)

    def recording(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append((result, *args))
        return result

    monkeypatch.setattr(module, name, recording)
    return calls


def kernel_spy(monkeypatch) -> list[tuple]:
    """The (q, k, v, ...) of every call of attention.kernels.attend, wherever it is imported."""
    import attention.kernels.attend as kernels

    calls: list[tuple] = []
    original = kernels.attend

    def recording(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "attention" and getattr(module, "attend", None) is original:
            monkeypatch.setattr(module, "attend", recording)
    return calls


def decode_step(impl, settings):
    """One decode step straight through the registered function: 4 query
    heads over a cache of 2 key/value heads in transformers' layout."""
    layer = SimpleNamespace(config=SimpleNamespace(patternstore_attention=settings), is_causal=True)
    key, value = torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)  # (batch, kv_heads, cache, head_dim)
    query = torch.randn(2, 4, 1, 16)
    out, _ = AttentionInterface._global_mapping[impl](layer, query, key, value, None, scaling=0.25)
    assert out.shape == (2, 1, 4, 16)
    return key, value


@torch.no_grad()
def test_grouped_query_keys_reach_the_dilated_kernel_as_views_of_the_cache(monkeypatch):
    calls = kernel_spy(monkeypatch)
    key, value = decode_step(hf.DILATED, DILATED)
    assert calls, "no kernel call seen"
    cache = {key.untyped_storage().data_ptr(), value.untyped_storage().data_ptr()}
    for q, k, v, *_ in calls:
        assert k.untyped_storage().data_ptr() in cache  # a view of the cache: no repeat, no copy
        assert v.untyped_storage().data_ptr() in cache


@torch.no_grad()
def test_grouped_query_keys_reach_the_sparse_gather_uncopied_and_unrepeated(monkeypatch):
    import attention.sparse.tiles as sparse_tiles

    flattened = spy(monkeypatch, sparse_tiles, "flat")
    tiles = spy(monkeypatch, sparse_tiles, "attend")
    key, value = decode_step(hf.SPARSE, BIGBIRD)
    cache = {key.untyped_storage().data_ptr(), value.untyped_storage().data_ptr()}
    # Blocks are gathered from q and from the cache's keys and values, as views (no whole copy).
    assert [flat.untyped_storage().data_ptr() in cache for flat, *_ in flattened] == [False, True, True]
    assert tiles
    for _, qt, kt, vt, *_ in tiles:
        assert kt.shape[0] == vt.shape[0] == 2 * 2  # batch x kv_heads lanes: keys gathered once per kv head
        assert qt.shape[0] == 2 * 2                 # the 2 query heads of a lane share them


# ------------------------------------------------------------- training step
def dense_dilated_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """float64 dense reference of the dilated pattern (attention/dense_reference.py), keys repeated."""
    assert attention_mask is None
    settings = module.config.patternstore_attention
    groups = query.shape[1] // key.shape[1]
    q, k, v = (x.double().transpose(1, 2) for x in (query, key.repeat_interleave(groups, 1),
                                                      value.repeat_interleave(groups, 1)))
    out = dense_dilated_attention(q, k, v, settings["segment_lengths"], settings["dilation_rates"],
                                  is_causal=True, scale=scaling)
    return out.to(query.dtype), None


def test_a_training_step_has_a_finite_loss_and_the_reference_gradients():
    AttentionInterface.register("patternstore_test_dense", dense_dilated_forward)
    model = tiny_llama(hf.DILATED, {"segment_lengths": [8, 16], "dilation_rates": [1, 2]}, kv_heads=2).train()
    ids = prompt(40, seed=6)
    model.set_attn_implementation("patternstore_test_dense")
    _, ref_loss, ref_grads = loss_and_grads(model, ids)
    model.set_attn_implementation(hf.DILATED)
    _, loss, grads = loss_and_grads(model, ids)
    assert math.isfinite(loss.item())
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.step()
    assert model(ids, labels=ids).loss.item() < loss.item()


# ------------------------------------------------------------------- errors
def call(impl, settings, **kwargs):
    layer = SimpleNamespace(config=SimpleNamespace(patternstore_attention=settings), is_causal=True)
    q = torch.randn(1, 4, 8, 16)
    return AttentionInterface._global_mapping[impl](layer, q, q, q, None, **kwargs)


@pytest.mark.parametrize("impl, settings, message", [
    (hf.DILATED, None, "patternstore_attention"),
    (hf.DILATED, {"segment_lengths": [8]}, "patternstore_attention.*dilation_rates"),
    (hf.DILATED, {"segment_lengths": [8], "dilation_rates": [16]}, "patternstore_attention.*dilation_rates"),
    (hf.DILATED, {"segment_lengths": [8], "dilation_rates": [1], "colour": 3}, "patternstore_attention.*colour"),
    (hf.SPARSE, {"block_size": 8}, "patternstore_attention.*kind"),
    (hf.SPARSE, {"kind": "bigbird", "num_random_blocks": -1}, "patternstore_attention.*num_random_blocks"),
])
def test_missing_or_invalid_settings_name_the_config_attribute(impl, settings, message):
    with pytest.raises(ValueError, match=message):
        call(impl, settings)


@pytest.mark.parametrize("kwargs, message", [
    ({"sinks": torch.zeros(4)}, "s_aux"),
    ({"softcap": -1.0}, "softcap must be None or a finite number > 0"),
    ({"s_aux": torch.zeros(3)}, r"sinks must be None or a floating \(4,\) tensor"),
    ({"position_bias": torch.zeros(1)}, "position bias"),
    ({"output_attentions": True}, "output_attentions"),
])
def test_unsupported_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        call(hf.DILATED, DILATED, **kwargs)


def test_foreign_masks_raise():
    """(Packed sequences are taken: tests/test_hf_packed.py, with the refused custom masks.)"""
    layer = SimpleNamespace(config=SimpleNamespace(patternstore_attention=DILATED), is_causal=True)
    q = torch.randn(1, 4, 12, 16)
    additive = torch.zeros(1, 1, 12, 12)
    with pytest.raises(ValueError, match="2-D attention_mask"):
        hf.dilated_attention_forward(layer, q, q, q, additive)


def test_modules_are_built_once_per_settings():
    hf.register()  # empties the module cache
    for _ in range(3):
        call(hf.DILATED, DILATED, scaling=0.25)
        call(hf.DILATED, dict(DILATED), scaling=0.25)
    assert len(hf_modules._modules) == 1
    call(hf.SPARSE, BIGBIRD, scaling=0.25)
    assert len(hf_modules._modules) == 2


def test_the_library_imports_without_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import attention, patternstore\n"
        "try:\n    import attention.hf\nexcept ImportError as e:\n    print('hf:', e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "patternstore[hf]" in result.stdout
