"""Benchmark: a padding-free Hugging Face training step against the padded
batch of the same documents (issue 25, item 6).

    PYTHONPATH=. python tools/bench_hf_packed.py [--rounds N] [--threads 2]

CPU, float32, a tiny transformers Llama (2 layers, hidden 128, 4 heads of
32, intermediate 256, vocab 1024), 16 documents of lengths drawn uniformly
from 64..512 (fixed seed). A step is forward, loss, backward and an SGD
step, for ``patternstore_dilated`` (segments 128/256, rates 1/2) and
``patternstore_sparse`` (bigbird, block 64, 1 random, 3 sliding-window and
1 global block, unidirectional):
- packed: ``DataCollatorWithFlattening``'s batch (one row, position_ids
  restarting per document; the model's default ``use_cache``);
- padded: the documents right-padded to the longest, with attention_mask and
  labels -100 on the padding.
Both compute the same loss (tests/test_hf_packed.py). The four candidates
and a 1024^3 fp32 matmul are timed in interleaved rounds (A B C D ...,
tools/benchlib.py); tokens/s counts real tokens only; packed/padded is the
median of same-round ratios. Results: tools/results/hf_packed_cpu.json.
"""

from __future__ import annotations

import argparse

import torch

import benchlib
import attention.hf as hf
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.data.data_collator import DataCollatorWithFlattening

IMPLEMENTATIONS = {
    "dilated": (hf.DILATED, {"segment_lengths": [128, 256], "dilation_rates": [1, 2]}),
    "sparse": (hf.SPARSE, {"kind": "bigbird", "block_size": 64, "num_random_blocks": 1,
                           "num_sliding_window_blocks": 3, "num_global_blocks": 1, "attention": "unidirectional"}),
}
DOCUMENTS, SHORTEST, LONGEST, VOCAB = 16, 64, 512, 1024


def model_for(name: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    impl, settings = IMPLEMENTATIONS[name]
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                         pad_token_id=0, attn_implementation=impl, patternstore_attention=settings)
    return LlamaForCausalLM(config).train()


def documents(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(SHORTEST, LONGEST + 1, (DOCUMENTS,), generator=g).tolist()
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


def padded(docs: list[list[int]]) -> dict:
    ids = torch.zeros(len(docs), max(map(len, docs)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, doc in enumerate(docs):
        ids[row, :len(doc)], mask[row, :len(doc)] = torch.tensor(doc), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def step_of(model: torch.nn.Module, batch: dict):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf.register()
    docs = documents()
    tokens = sum(map(len, docs))
    batches = {"packed": DataCollatorWithFlattening()([{"input_ids": d} for d in docs]), "padded": padded(docs)}
    steps = {f"{name} {form}": step_of(model_for(name), batch)
             for name in IMPLEMENTATIONS for form, batch in batches.items()}
    runs = benchlib.interleave(steps, timed=benchlib.timer("cpu"), rounds=args.rounds,
                               reference=benchlib.matmul(1024))
    padded_tokens = batches["padded"]["input_ids"].numel()
    config = {"documents": DOCUMENTS, "lengths": [len(d) for d in docs], "real_tokens": tokens,
              "padded_tokens": padded_tokens, "padding_fraction": 1 - tokens / padded_tokens, "layers": 2,
              "hidden": 128, "heads": 4, "head_dim": 32, "dtype": "float32", "rounds": args.rounds,
              "settings": {name: settings for name, (_, settings) in IMPLEMENTATIONS.items()}}
    report = benchlib.Report([benchlib.RESULTS / "hf_packed_cpu.json"], "hf_packed", config, threads=args.threads)
    print(f"{tokens} real tokens, padded batch {tuple(batches['padded']['input_ids'].shape)} "
          f"(padding fraction {config['padding_fraction']:.2f})")
    print(f"{'candidate':<16} {'tokens/s':>9} {'median ms':>10} {'matmuls':>8} {'packed/padded':>13}")
    for name in steps:
        impl, form = name.split()
        row = {"candidate": name, **runs.row(name), "real_tokens_per_s": tokens / runs.median(name)}
        if form == "packed":
            row["time_over_padded"] = runs.ratio(name, f"{impl} padded")
        report.add(**row)
        print(f"{name:<16} {row['real_tokens_per_s']:>9.0f} {row['median_s'] * 1e3:>10.1f} "
              f"{row['matmul_units']:>8.1f} {row.get('time_over_padded', float('nan')):>13.2f}")


if __name__ == "__main__":
    main()
