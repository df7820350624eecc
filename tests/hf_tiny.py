"""The tiny Llama (and gpt-oss) the compiled Hugging Face tests build, and the two
patterns they run (full coverage is not needed: the references are the
same model eager or padded); the collator's padding-free batches, the
padded batch and the float64 loss the padding-free tests compare against;
a backend that records the graphs a compile makes."""

from __future__ import annotations

import torch
from transformers import GptOssConfig, LlamaConfig
from transformers.data.data_collator import DataCollatorWithFlattening

import attention.hf as hf

VOCAB = 96
PATTERNS = {
    "dilated": (hf.DILATED, {"segment_lengths": [4, 8], "dilation_rates": [1, 2]}),
    "bigbird": (hf.SPARSE, {"kind": "bigbird", "block_size": 4, "num_random_blocks": 1,
                            "num_sliding_window_blocks": 3, "num_global_blocks": 1, "attention": "unidirectional"}),
}


def llama_config(impl: str, settings: dict, layers: int) -> LlamaConfig:
    """2 heads of kv over 4 query heads, hidden 32: every path (GQA, padding) in milliseconds."""
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=None, eos_token_id=None,
        attn_implementation=impl, patternstore_attention=settings,
    )


# DataCollatorWithFlattening's forms: (collator arguments, forward arguments).
FORMS = {
    "position_ids": ({}, {"use_cache": False}),  # transformers' packed mask
    "position_ids_with_cache": ({}, {}),  # use_cache=True: transformers skips its packed mask
    "flash_kwargs": ({"return_flash_attn_kwargs": True}, {}),
    "flash_kwargs_only": ({"return_flash_attn_kwargs": True, "return_position_ids": False}, {"use_cache": False}),
}


def documents(lengths, seed: int = 0, vocab: int = VOCAB) -> list[list[int]]:
    """Random token ids in 1..vocab-1, one list per document length."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


def flattened(docs: list[list[int]], form: str) -> dict:
    """The real collator's batch, with the form's forward arguments."""
    collator_args, forward_args = FORMS[form]
    batch = DataCollatorWithFlattening(**collator_args)([{"input_ids": d} for d in docs])
    return {**batch, **forward_args}


def recording(graphs: list):
    """aot_eager, appending each graph module it is given to ``graphs``."""
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return aot_eager(graph_module, example_inputs)
    return backend


def padded(docs: list[list[int]]) -> dict:
    """The same documents as a right-padded batch: attention_mask, labels -100 on padding."""
    width = max(map(len, docs))
    ids = torch.zeros(len(docs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, doc in enumerate(docs):
        ids[row, :len(doc)] = torch.tensor(doc)
        mask[row, :len(doc)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def float64_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' causal-LM loss (next-token targets, -100 ignored, the mean
    over targets) kept in float64: its own ``loss`` casts the logits to float32."""
    targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


def loss_and_grads(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(transformers' loss, the float64 loss, the float64 loss's parameter gradients)."""
    model.zero_grad()
    out = model(**batch)
    loss = float64_loss(out.logits, batch["labels"])
    loss.backward()
    return out.loss.detach(), loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def gpt_oss_config(impl: str, settings: dict) -> GptOssConfig:
    """gpt-oss (attention sinks, ``s_aux``), the Llama's sizes: a sliding layer
    (window 8) then a full-attention one; experts as batched matmuls (the
    eager experts loop over the experts a batch hits: data-dependent, no
    full graph)."""
    return GptOssConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=64, pad_token_id=0,
        bos_token_id=None, eos_token_id=None, experts_implementation="batched_mm", attn_implementation=impl,
        patternstore_attention=settings,
    )
