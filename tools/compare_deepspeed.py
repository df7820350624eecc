"""Our block-sparse layouts against DeepSpeed's sparsity configs, block for block.

    DS_BUILD_OPS=0 pip install 'deepspeed==0.16.0'
    python tools/compare_deepspeed.py [--max-blocks N] [--out PATH]

DeepSpeed is not a dependency of the project: this tool alone reads it. It
loads only ``deepspeed/ops/sparse_attention/sparsity_config.py`` (which
imports torch and random) from the installed package, without importing
``deepspeed`` itself. Releases up to at least 0.16.0 ship that file; 0.19.8
no longer does. Without it the tool exits with status 1 and says so.

Grid: every kind with a DeepSpeed config (``SPARSE_KINDS[kind].deepspeed``),
every DeepSpeed parameter of that config at several values (global indices
and ranges past the shorter lengths, both directions, one layout or one per
head), only configs DeepSpeed's constructor accepts; 4 heads, block 16,
every length of 1..``--max-blocks`` blocks. Each case builds both layouts as
0/1 ``[heads, nb, nb]`` matrices and sorts the case into one category:

- ``agree``: equal, every block of every head;
- ``documented:causal_rule``: unidirectional, ours equals DeepSpeed's with
  its future blocks dropped (``patternstore.kinds``: the causal rule applies
  to the whole layout);
- ``documented:fixed_partial_window``: fixed, unidirectional, a partial last
  window, and the layouts differ only in the columns where DeepSpeed puts
  its global blocks (from ``min(complete windows, nb - num_global_blocks)``
  on; ``kinds``: fixed);
- ``unexplained``: any other difference (examples kept);
- ``deepspeed_refuses`` / ``ours_refuses`` / ``both_refuse``: one side or
  both raise at this length (DeepSpeed's message kept per reason).

Random blocks (bigbird, variable with ``num_random_blocks`` > 0) come from
different generators (DeepSpeed's ``random.sample``, our counter-based
hash), so there the deterministic part (the same config with no random
blocks) is compared as above and the random blocks by property: each row
holds the deterministic blocks and at most ``num_random_blocks`` more, and
the mean count of extra blocks per row of each side is reported against its
expectation (``k * (pool - d) / pool`` per row, pool = the blocks a row draws
from, d = its deterministic blocks in the pool).

Writes tools/results/deepspeed_compare.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import random
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import torch

import benchlib
from patternstore.generate import generate
from patternstore.kinds import SPARSE_KINDS
from patternstore.specs import SparseSpec

HEADS, BLOCK = 4, 16
EXAMPLES = 3
INSTALL = "DS_BUILD_OPS=0 pip install 'deepspeed==0.16.0'"


def load_sparsity_config() -> tuple[ModuleType, str]:
    """DeepSpeed's ``sparsity_config`` module and DeepSpeed's version, without importing ``deepspeed``."""
    found = importlib.util.find_spec("deepspeed")
    if found is None or not found.submodule_search_locations:
        sys.exit(f"compare_deepspeed: DeepSpeed is not installed; install it for this tool only: {INSTALL}")
    root = Path(found.submodule_search_locations[0])
    path = root / "ops" / "sparse_attention" / "sparsity_config.py"
    if not path.is_file():
        sys.exit(f"compare_deepspeed: this DeepSpeed ({root}) has no {path.relative_to(root.parent)} "
                 f"(removed in later releases); install one that has it: {INSTALL}")
    spec = importlib.util.spec_from_file_location("_deepspeed_sparsity_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    version_file = root / "git_version_info_installed.py"
    version = "unknown"
    if version_file.is_file():
        for line in version_file.read_text().splitlines():
            if line.startswith("version="):
                version = line.split("=", 1)[1].strip().strip("'\"")
    return module, version


# ---------------------------------------------------------------- the grid
GLOBALS = (  # (global_block_indices, global_block_end_indices): some past the shorter lengths
    ((0,), None), ((0, 5, 40), None), ((3, 70), None), ((0, 10), (2, 20)), ((1, 60), (4, 100)),
)


def _product(**axes: tuple) -> Iterator[dict[str, Any]]:
    for values in itertools.product(*axes.values()):
        yield dict(zip(axes, values))


def grid() -> Iterator[tuple[str, dict[str, Any]]]:
    """``(kind, DeepSpeed keyword arguments)`` for every config of the grid DeepSpeed's constructor accepts."""
    yield from (("dense", p) for p in _product(different_layout_per_head=(False, True)))
    for p in _product(num_local_blocks=(1, 2, 4, 8), num_global_blocks=(1, 2, 4),
                      attention=("bidirectional", "unidirectional"), horizontal_global_attention=(False, True),
                      num_different_global_patterns=(1, 2, 4), different_layout_per_head=(False, True)):
        ratio = p["num_local_blocks"] // p["num_global_blocks"]
        if (p["num_local_blocks"] % p["num_global_blocks"] or p["num_different_global_patterns"] > ratio
                or (p["num_different_global_patterns"] > 1 and not p["different_layout_per_head"])
                or (p["horizontal_global_attention"] and p["attention"] == "unidirectional")):
            continue
        yield "fixed", p
    yield from (("bigbird", p) for p in _product(
        num_random_blocks=(0, 1, 3), num_sliding_window_blocks=(1, 3, 5, 7), num_global_blocks=(0, 1, 2, 4),
        attention=("bidirectional", "unidirectional"), different_layout_per_head=(False, True)))
    for window, (starts, ends), attention, per_head in itertools.product(
            (1, 3, 5), GLOBALS, ("bidirectional", "unidirectional"), (False, True)):
        yield "bslongformer", {"num_sliding_window_blocks": window, "global_block_indices": starts,
                               "global_block_end_indices": ends, "attention": attention,
                               "different_layout_per_head": per_head}
    for random_blocks, windows, (starts, ends), attention, horizontal, per_head in itertools.product(
            (0, 2), ((4,), (1, 2, 4), (2, 8)), GLOBALS, ("bidirectional", "unidirectional"), (False, True),
            (False, True)):
        if horizontal and attention == "unidirectional":
            continue
        yield "variable", {"num_random_blocks": random_blocks, "local_window_blocks": windows,
                           "global_block_indices": starts, "global_block_end_indices": ends,
                           "attention": attention, "horizontal_global_attention": horizontal,
                           "different_layout_per_head": per_head}
    yield from (("local", p) for p in _product(num_sliding_window_blocks=(1, 2, 3, 5, 8),
                                               attention=("bidirectional", "unidirectional")))


# ---------------------------------------------------------------- the two layouts
def ours(kind: str, params: dict[str, Any], nb: int, seed: int) -> torch.Tensor:
    """Our layout as 0/1 ``[HEADS, nb, nb]`` (its random blocks from ``seed``)."""
    pattern = generate(SparseSpec(kind, nb * BLOCK, BLOCK, HEADS, seed=seed, **params))
    counts, indices = pattern["kv_num_blocks"], pattern["kv_indices"]
    rows = torch.repeat_interleave(torch.arange(counts.numel()), counts.flatten().long())
    dense = torch.zeros(counts.numel(), nb, dtype=torch.int64)
    dense[rows, indices.long()] = 1
    return dense.view(counts.shape[0], nb, nb).expand(HEADS, nb, nb)


def deepspeed(module: ModuleType, kind: str, params: dict[str, Any], nb: int, seed: int) -> torch.Tensor:
    """DeepSpeed's layout ``[HEADS, nb, nb]`` (its random blocks seeded by ``seed``)."""
    config = getattr(module, SPARSE_KINDS[kind].deepspeed)
    listed = {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}
    random.seed(seed)
    return config(num_heads=HEADS, block=BLOCK, **listed).make_layout(nb * BLOCK)


def build(fn: Any, *args: Any) -> tuple[torch.Tensor | None, str]:
    try:
        return fn(*args), ""
    except ValueError as error:
        return None, f"{type(error).__name__}: {error}"


def classify(kind: str, params: dict[str, Any], nb: int, mine: torch.Tensor, theirs: torch.Tensor) -> str:
    if torch.equal(mine, theirs):
        return "agree"
    if params.get("attention") == "unidirectional":
        causal = torch.tril(theirs)
        if torch.equal(mine, causal):
            return "documented:causal_rule"
        local, num_global = params.get("num_local_blocks", 0), params.get("num_global_blocks", 0)
        # DeepSpeed places a partial last window's global blocks at its start, clipped to nb - num_global.
        first_moved = max(0, min(nb - nb % local, nb - num_global)) if local else nb
        if kind == "fixed" and nb % local and not (mine != causal)[..., :first_moved].any():
            return "documented:fixed_partial_window"
    return "unexplained"


def extras(layout: torch.Tensor, det: torch.Tensor, pool: torch.Tensor, k: int) -> tuple[float, float, int]:
    """(mean extra blocks per row, its expectation, rows holding > k extras or missing a deterministic block)."""
    extra = (layout.bool() & ~det.bool()).sum(-1).double()
    in_pool = (det.bool() & (torch.arange(det.shape[-1]) < pool[:, None])).sum(-1).double()
    expected = torch.where(pool >= k, k * (pool - in_pool) / pool, (pool - in_pool).double())
    bad = int(((extra > k) | (det.bool() & ~layout.bool()).any(-1)).sum())
    return float(extra.mean()), float(expected.expand_as(extra).mean()), bad


def past_length(params: dict[str, Any], nb: int) -> bool:
    ends = params.get("global_block_end_indices") or ()
    return any(s >= nb for s in params.get("global_block_indices", ())) or any(e > nb for e in ends)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-blocks", type=int, default=64)
    parser.add_argument("--out", type=Path, default=benchlib.RESULTS / "deepspeed_compare.json")
    args = parser.parse_args()
    module, version = load_sparsity_config()
    torch.set_num_threads(1)
    start = time.perf_counter()
    totals: dict[str, dict[str, int]] = {}
    examples: dict[str, list[dict[str, Any]]] = {}
    refusals: dict[str, int] = {}
    past: dict[str, int] = {}
    rand = {"cases": 0, "rows_violating": 0, "ours_mean": 0.0, "ours_expected": 0.0,
            "deepspeed_mean": 0.0, "deepspeed_expected": 0.0}
    seed = 0
    for kind, params in grid():
        k = params.get("num_random_blocks", 0)
        det_params = {**params, "num_random_blocks": 0} if k else params
        for nb in range(1, args.max_blocks + 1):
            seed += 1
            mine, our_error = build(ours, kind, det_params, nb, seed)
            theirs, their_error = build(deepspeed, module, kind, det_params, nb, seed)
            if k and mine is not None and theirs is not None:
                full_mine, our_error = build(ours, kind, params, nb, seed)
                full_theirs, their_error = build(deepspeed, module, kind, params, nb, seed)
            if our_error and their_error:
                category = "both_refuse"
            elif their_error:
                category = "deepspeed_refuses"
                reason = their_error.split(",")[0]
                refusals[reason] = refusals.get(reason, 0) + 1
            elif our_error:
                category = "ours_refuses"
            else:
                category = classify(kind, params, nb, mine, theirs)
            if k and category not in ("both_refuse", "deepspeed_refuses", "ours_refuses"):
                category = f"random:{category}"
                rows = torch.arange(nb)
                causal_pool = rows + 1
                whole = torch.full((nb,), nb)
                uni = params["attention"] == "unidirectional"
                # DeepSpeed's bigbird draws causal rows from [0, row], its variable from the whole row.
                their_pool = causal_pool if uni and kind == "bigbird" else whole
                mean, expected, bad = extras(full_mine, mine, causal_pool if uni else whole, k)
                their_mean, their_expected, their_bad = extras(full_theirs, theirs, their_pool, k)
                rand["cases"] += 1
                rand["rows_violating"] += bad + their_bad
                rand["ours_mean"] += mean
                rand["ours_expected"] += expected
                rand["deepspeed_mean"] += their_mean
                rand["deepspeed_expected"] += their_expected
            per_kind = totals.setdefault(kind, {})
            per_kind[category] = per_kind.get(category, 0) + 1
            if past_length(params, nb):
                past[category] = past.get(category, 0) + 1
            if not category.endswith("agree") and len(examples.setdefault(category, [])) < EXAMPLES:
                example: dict[str, Any] = {"kind": kind, "num_blocks": nb, "params": params}
                if our_error or their_error:
                    example["ours"], example["deepspeed"] = our_error, their_error
                else:
                    where = (mine != theirs).nonzero()[:8].tolist()
                    example["diff_head_row_col_ours_deepspeed"] = [
                        [h, r, c, int(mine[h, r, c]), int(theirs[h, r, c])] for h, r, c in where]
                examples[category].append(example)
    for key in ("ours_mean", "ours_expected", "deepspeed_mean", "deepspeed_expected"):
        rand[key] = round(rand[key] / max(rand["cases"], 1), 4)
    overall: dict[str, int] = {}
    for per_kind in totals.values():
        for category, count in per_kind.items():
            overall[category] = overall.get(category, 0) + count
    result = {
        "machine": benchlib.machine(), "deepspeed": version, "heads": HEADS, "block": BLOCK,
        "lengths_blocks": [1, args.max_blocks], "cases": sum(overall.values()),
        "configs": sum(1 for _ in grid()), "overall": dict(sorted(overall.items())),
        "per_kind": totals, "global_indices_past_length": dict(sorted(past.items())), "random_blocks": rand,
        "deepspeed_refusal_reasons": refusals, "examples": examples,
        "seconds": round(time.perf_counter() - start, 1),
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("cases", "configs", "overall", "global_indices_past_length",
                                             "random_blocks", "seconds")}, indent=1))


if __name__ == "__main__":
    main()
