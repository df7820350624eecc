"""Benchmark: one training step of a tiny transformers Llama on the CPU,
eager and ``torch.compile(model, fullgraph=True)``, with
``attn_implementation`` sdpa, ``patternstore_dilated`` and
``patternstore_sparse``.

    PYTHONPATH=. python tools/bench_train_step.py [--quick] [--threads 1]

The model: 2 layers, hidden 256, 4 heads of 64, intermediate 512, vocab
1024, float32, batch 2 of 1024 tokens (``--quick``: 512), the second row
left-padded by 100 tokens (a padding mask, as a batch of unequal texts).
dilated: segments 256/512, rates 1/2; sparse: bigbird, block 64, 1 random,
3 sliding-window and 1 global block, unidirectional. A step is forward,
loss, backward and an SGD step (the optimizer eager).

- tokens/s: batch * length / the median step, the six candidates timed in
  interleaved rounds (A B C ... A B C ...) with a 1024^3 fp32 ``torch.mm``
  as one more candidate (tools/benchlib.py); compiled/eager is the median
  of same-round ratios.
- attention share: the time inside the attention calls of a step over the
  step, from ``torch.profiler`` (3 steps after a warm one): the outermost
  ``scaled_dot_product`` ops for sdpa, the ``attention::`` ops for the
  patternstore ones (the eager modules' kernels; compiled, the layer's
  opaque op and its backward), forward and backward together.
- compile seconds: the first compiled step (trace, inductor, the step).

Writes tools/results/train_step.json (``--quick``: train_step_quick.json) and
prints a table.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import torch

import benchlib  # noqa: E402
import attention.hf as hf  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

IMPLEMENTATIONS = {
    "sdpa": ("sdpa", None),
    "dilated": (hf.DILATED, {"segment_lengths": [256, 512], "dilation_rates": [1, 2]}),
    "sparse": (hf.SPARSE, {"kind": "bigbird", "block_size": 64, "num_random_blocks": 1,
                           "num_sliding_window_blocks": 3, "num_global_blocks": 1, "attention": "unidirectional"}),
}
BATCH, PAD, VOCAB = 2, 100, 1024


def model_for(name: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    impl, settings = IMPLEMENTATIONS[name]
    extra = {} if settings is None else {"patternstore_attention": settings}
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                         pad_token_id=0, attn_implementation=impl, **extra)
    return LlamaForCausalLM(config).train()


def step_of(model: torch.nn.Module, forward: Callable, ids: torch.Tensor, mask: torch.Tensor) -> Callable[[], Any]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    labels = ids.masked_fill(mask == 0, -100)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        forward(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
    return step


def attention_share(step: Callable[[], Any], name: str, repeats: int = 3) -> float:
    """Seconds inside the outermost attention ops over the seconds of ``repeats`` steps."""
    from torch.profiler import ProfilerActivity, profile

    step()
    wanted = (lambda key: "scaled_dot_product" in key) if name == "sdpa" else (lambda key: key.startswith("attention::"))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        total = time.perf_counter() - start

    def outermost(event: Any) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if wanted(parent.name):
                return False
            parent = parent.cpu_parent
        return True
    inside = sum(e.cpu_time_total for e in prof.events() if wanted(e.name) and outermost(e)) / 1e6
    return inside / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="512 tokens instead of 1024")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf.register()
    length = 512 if args.quick else 1024
    ids = torch.randint(1, VOCAB, (BATCH, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, :PAD], mask[1, :PAD] = 0, 0

    steps, compile_s = {}, {}
    for name in IMPLEMENTATIONS:
        eager = model_for(name)
        steps[f"{name} eager"] = step_of(eager, eager, ids, mask)
        model = model_for(name)
        compiled = step_of(model, torch.compile(model, fullgraph=True), ids, mask)
        start = time.perf_counter()
        compiled()
        compile_s[name] = time.perf_counter() - start
        steps[f"{name} compiled"] = compiled
    runs = benchlib.interleave(steps, timed=benchlib.timer("cpu"), rounds=args.rounds,
                               reference=benchlib.matmul(1024))
    shares = {name: attention_share(step, name.split()[0]) for name, step in steps.items()}

    rows = []
    for name in steps:
        impl = name.split()[0]
        row = {"candidate": name, **runs.row(name), "tokens_per_s": BATCH * length / runs.median(name),
               "attention_share": shares[name],
               "vs_sdpa_same_mode": runs.ratio(name, f"sdpa {name.split()[1]}")}
        if name.endswith("compiled"):
            row["compiled_over_eager"] = runs.ratio(name, f"{impl} eager")
            row["first_step_s"] = compile_s[impl]
        rows.append(row)
    config = {"batch": BATCH, "length": length, "left_padding_row_1": PAD, "layers": 2, "hidden": 256, "heads": 4,
              "head_dim": 64, "dtype": "float32", "rounds": args.rounds,
              "settings": {name: settings for name, (_, settings) in IMPLEMENTATIONS.items()}}
    report = benchlib.Report([benchlib.RESULTS / ("train_step_quick.json" if args.quick else "train_step.json")],
                             "train_step", config,
                             threads=args.threads)
    for row in rows:
        report.add(**row)
    print(f"{'candidate':<18} {'tokens/s':>9} {'median ms':>10} {'attn share':>10} {'time/sdpa':>9} {'comp/eager':>10}")
    for row in rows:
        print(f"{row['candidate']:<18} {row['tokens_per_s']:>9.0f} {row['median_s'] * 1e3:>10.1f} "
              f"{row['attention_share']:>10.2f} {row['vs_sdpa_same_mode']:>9.2f} "
              f"{row.get('compiled_over_eager', float('nan')):>10.2f}")


if __name__ == "__main__":
    main()
