"""Train a small Llama with LongNet dilated attention on long-range recall.

    python examples/train_long_llama.py [--seq-len 8192] [--steps 300] [--batch 4]

A Llama built from a config (no download) with
``attn_implementation="patternstore_dilated"`` (attention.hf) learns a
synthetic task: a "value" token (one of 16) is planted, as a run of 8 copies,
in the first quarter of a sequence of random filler tokens; 16 QUERY markers
in the last quarter (the last one ends the sequence) must each answer the
value, at least half the sequence (thousands of tokens) later. Only those
answers are scored, and no answer ever follows a marker, so nothing can be
copied from nearby. A model without long-range attention cannot beat chance
(1/16, loss ln 16 = 2.77).

Attention: branches (segment, rate) = (512, 1), (2048, 2), (8192, 8) over 8
heads ("longnet" scheme: every branch on every head, head j of the rate-8
branch on positions = j mod 8); the last branch spans the whole sequence, so
the query reaches the planted run through whichever head its position falls
on, and the run of 8 copies puts one copy on every residue.

Steps: (1) precompute the pattern with ``patternstore precompute`` (the
store is then warm for every process that trains or serves the model);
(2) train with AdamW, a progress bar shows loss and accuracy; (3) answer
fresh sequences with ``model.generate`` (KV cache: the decode path) and print
one; (4) write the loss curve (PNG) and metrics (JSON) to tools/results/.
Runs on a GPU when one is present (bfloat16 autocast), else on the CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

import attention.hf as hf
from patternstore.specs import DilatedSpec
from patternstore.spectext import format_spec

REPO = Path(__file__).resolve().parents[1]
SEGMENTS, RATES, HEADS = (512, 2048, 8192), (1, 2, 8), 8
PAD, QUERY = 0, 1
VALUES = range(2, 18)            # the 16 tokens that can be planted
FILLER = (18, 64)                # filler tokens [18, 64)
VOCAB = FILLER[1]
RUN = 8                          # copies of the value in a row: one on every residue mod 8
QUERIES = 16                     # scored QUERY markers per sequence (the answer never follows one)


def query_positions(seq_len: int) -> torch.Tensor:
    """Where the QUERY markers sit: QUERIES positions spread over the last
    quarter, the last one at the end of the sequence."""
    return torch.linspace(seq_len * 3 // 4, seq_len - 1, QUERIES).long()


def batch(size: int, seq_len: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (size, seq_len), answers (size,), planted positions (size,)): the
    value planted in the first quarter, QUERY markers in the last quarter
    (``query_positions``), at least seq_len / 2 tokens later."""
    ids = torch.randint(*FILLER, (size, seq_len), generator=generator)
    answers = torch.randint(VALUES.start, VALUES.stop, (size,), generator=generator)
    positions = torch.randint(0, seq_len // 4 - RUN, (size,), generator=generator)
    for row in range(size):
        ids[row, positions[row] : positions[row] + RUN] = answers[row]
    ids[:, query_positions(seq_len)] = QUERY
    return ids, answers, positions


def curriculum(seq_len: int, steps: int, enabled: bool) -> list[int]:
    """Sequence length of every step: with ``enabled``, the first half of
    the steps doubles the length from 64 in equal stages (the planted run is
    a large share of a short sequence, so the model finds the mechanism
    quickly; it is content-based and carries over to longer sequences), the
    second half trains at ``seq_len``. A run at 1024 tokens without it stayed
    at chance for 290 steps."""
    if not enabled or seq_len <= 64:
        return [seq_len] * steps
    stages = [64 << i for i in range(max(0, (seq_len // 64).bit_length() - 1)) if 64 << i < seq_len]
    warm = steps // 2
    return [stages[i * len(stages) // warm] if i < warm else seq_len for i in range(steps)]


def precompute(num_heads: int) -> None:
    """``patternstore precompute`` of the model's one pattern (length-free)."""
    spec = DilatedSpec(segment_lengths=SEGMENTS, dilation_rates=RATES, num_heads=num_heads, scheme="longnet")
    command = [sys.executable, "-m", "patternstore", "precompute", "--spec", format_spec(spec)]
    print("$", " ".join(command[2:]), flush=True)
    subprocess.run(command, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--eval", type=int, default=32, help="fresh sequences answered by generate at the end")
    parser.add_argument("--no-curriculum", action="store_true",
                        help="train at --seq-len from the first step (default: a length curriculum)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop training after this long (the steps run are recorded)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, default=REPO / "tools" / "results" / "train_long_llama")
    args = parser.parse_args()
    if args.seq_len < 4 * RUN:
        parser.error(f"--seq-len must be >= {4 * RUN}")

    precompute(HEADS)
    hf.register()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=HEADS // 2,   # grouped-query attention
        max_position_embeddings=args.seq_len + 8, pad_token_id=PAD,
        # A long-context RoPE base (Llama 3's): more of each head's dimensions stay
        # nearly position-independent across thousands of tokens, so content can match.
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, bos_token_id=None, eos_token_id=None,
        attn_implementation=hf.DILATED,
        patternstore_attention={"segment_lengths": list(SEGMENTS), "dilation_rates": list(RATES)},
    )
    model = LlamaForCausalLM(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    generator = torch.Generator().manual_seed(args.seed)

    losses, accuracies = [], []
    start = time.perf_counter()
    lengths = curriculum(args.seq_len, args.steps, enabled=not args.no_curriculum)
    bar = tqdm(range(args.steps), desc=f"train up to {args.seq_len} tokens", unit="step")
    model.train()
    for step in bar:
        seq_len = lengths[step]
        queries = query_positions(seq_len).to(device)
        if args.max_minutes is not None and time.perf_counter() - start > 60 * args.max_minutes:
            bar.close()
            print(f"stopped after {len(losses)} steps (--max-minutes {args.max_minutes})")
            break
        ids, answers, _ = batch(args.batch, seq_len, generator)
        ids, answers = ids.to(device), answers.to(device)
        with autocast:
            # Logits only at the QUERY markers, every one scored against the planted value.
            hidden = model.model(ids).last_hidden_state[:, queries]
            logits = model.lm_head(hidden).float()
        targets = answers[:, None].expand(-1, QUERIES)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        accuracies.append((logits[:, -1].argmax(-1) == answers).float().mean().item())
        window = slice(-20, None)
        bar.set_postfix(len=seq_len, loss=f"{sum(losses[window]) / len(losses[window]):.3f}",
                        acc=f"{sum(accuracies[window]) / len(accuracies[window]):.2f}")
    train_seconds = time.perf_counter() - start

    # Answer fresh sequences with generate (prefill, then the cached decode path).
    model.eval()
    ids, answers, positions = batch(args.eval, args.seq_len, torch.Generator().manual_seed(args.seed + 1))
    correct, sample = 0, None
    with torch.no_grad(), autocast:
        for row in range(args.eval):
            out = model.generate(ids[row : row + 1].to(device), max_new_tokens=2, do_sample=False)
            answer = int(out[0, args.seq_len])
            correct += answer == int(answers[row])
            sample = sample or (row, int(positions[row]), int(answers[row]), out[0, args.seq_len:].tolist())
    accuracy = correct / args.eval
    row, position, planted, generated = sample
    print(f"\nsequence {row}: value {planted} planted at {position}..{position + RUN - 1}, "
          f"{args.seq_len - 1 - position} tokens before the query; generate answered {generated[0]} "
          f"(then {generated[1]})")
    print(f"recall accuracy by generate over {args.eval} fresh sequences: {accuracy:.3f} (chance {1 / len(VALUES):.3f})")

    metrics = {
        "seq_len": args.seq_len, "curriculum": not args.no_curriculum, "lengths": lengths[: len(losses)],
        "steps": len(losses), "steps_requested": args.steps, "batch": args.batch, "lr": args.lr, "device": str(device),
        "segments": SEGMENTS, "rates": RATES, "heads": HEADS, "kv_heads": HEADS // 2,
        "train_seconds": train_seconds, "seconds_per_step": train_seconds / max(1, len(losses)),
        "first_20_loss": sum(losses[:20]) / len(losses[:20]), "last_20_loss": sum(losses[-20:]) / len(losses[-20:]),
        "last_20_train_accuracy": sum(accuracies[-20:]) / len(accuracies[-20:]),
        "generate_accuracy": accuracy, "eval_sequences": args.eval, "chance_accuracy": 1 / len(VALUES),
        "losses": losses, "accuracies": accuracies,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(metrics, indent=1) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install 'patternstore[bench]')")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(losses, lw=0.8, alpha=0.5, label="loss (batch)")
    smooth = [sum(losses[max(0, i - 19) : i + 1]) / len(losses[max(0, i - 19) : i + 1]) for i in range(len(losses))]
    ax.plot(smooth, lw=2, label="loss (20-step mean)")
    ax.axhline(math.log(len(VALUES)), color="gray", ls="--", lw=1, label="chance (ln 16)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy of the answer")
    ax.set_title(f"Llama + patternstore_dilated, recall at {args.seq_len} tokens "
                 f"(generate accuracy {accuracy:.2f})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.output.with_suffix(".png"), dpi=120)
    print(f"wrote {args.output.with_suffix('.png')} and {args.output.with_suffix('.json')}")


if __name__ == "__main__":
    main()
