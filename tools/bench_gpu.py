"""GPU benchmark (issue 12 section 6): dilated and block-sparse attention on
CUDA against dense SDPA, a gather-then-flash peer and FlexAttention.

    python tools/bench_gpu.py [--budget-s S] [--quick] [--device cuda|cpu] [--out-dir DIR]

Full run (CUDA): bf16, batch 1, 16 heads, head_dim 128 (then 64).
- Dilated: segments 2048/4096/8192/16384 with rates 1/2/4/8 (longnet
  scheme), non-causal, lengths 16K..1M; forward and forward+backward.
  Candidates, interleaved in one process (A B C A B C ...), medians of CUDA
  event timings:
  ``ours`` (ImprovedDilatedAttention, the kernel layer's default CUDA half
  kernel), ``ours-flash`` or ``ours-cudnn`` (the same with the other fused
  half kernel set in ``attention.kernels.CUDA_HALF_KERNEL``: the measurement
  behind the default),
  ``gather-flash`` (what torchscale does: gather each branch's dilated rows
  with ``index_select``, FlashAttention per branch, scatter back, merge by
  log-sum-exp weights computed without gradient) and ``sdpa`` /
  ``sdpa-flash`` / ``sdpa-cudnn`` (dense ``F.scaled_dot_product_attention``:
  default dispatch, FlashAttention forced, cuDNN forced; forward+backward
  without the default) at lengths where dense is affordable; the ratio to
  dense is taken against the fastest of them.
  Useful work (docs/design.md section 6): 4 * head_dim * selected query-key
  pairs per branch and head, counted here from the design's rules (not from
  the module's plan); dense: 4 * d * n^2 * heads; forward+backward counts 3x
  the forward (tools/bench_attention.py's convention; ratios do not depend on
  it). Every TFLOP/s figure is also divided by a bf16 8192^3 matmul timed in
  the same run (``efficiency``).
  Peak memory of a forward: ``max_memory_allocated`` above what was
  allocated before the call (inputs), over the output's size (target <= 1.5).
- Block-sparse: bigbird, bslongformer, local (block 128, DeepSpeed defaults:
  > 97% block sparsity at 32K), lengths 32K..256K: ``ours``
  (BlockSparseAttention), ``flex-cbm`` (compiled ``flex_attention`` on a
  ``create_block_mask`` mask whose mask_mod reads the same layout as a block
  table) and ``sdpa-mask`` (SDPA with the dense boolean mask, where it fits in
  a quarter of the free memory); forward, and forward+backward against flex.
  First output of a fresh process (``subprocess``) with the layout already in
  the store (``ours``) against ``create_block_mask`` + flex: the time from
  before the module (or mask) is made to the output, after imports and input
  creation, which are the same for both.

``--budget-s``: the run keeps to it by dropping the largest cases (each job is
skipped when its estimated cost, extrapolated from the previous length, does
not fit in the time left to its section). Results are written after every
case (partial results survive a timeout) to tools/results/gpu.json and, when
``$OUT`` is set or ``--out-dir`` given, there too; a plot to gpu.png.

``--quick``: a CPU smoke run (float32, tiny sizes, flex uncompiled, forward
only for flex) that proves the script end to end without a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "tools" / "results"
K = 1024


class Config:
    """Sizes of one run (``full`` on CUDA, ``quick`` on the CPU)."""

    def __init__(self, quick: bool) -> None:
        self.quick = quick
        if quick:
            self.dtype_name = "float32"
            self.heads, self.head_dims = 2, (32, 16)
            self.segments, self.rates = (64, 128), (1, 2)
            self.lengths = {32: (256, 512), 16: (256,)}
            self.dense_forward_max, self.dense_backward_max = 512, 512
            self.sparse_block, self.sparse_lengths = 16, (256, 512)
            self.sparse_dense_mask_max = 512
            self.matmul_size = 512
            self.case_seconds = 0.3  # timed seconds per candidate and case
        else:
            self.dtype_name = "bfloat16"
            self.heads, self.head_dims = 16, (128, 64)
            self.segments, self.rates = (2048, 4096, 8192, 16384), (1, 2, 4, 8)
            self.lengths = {128: tuple(16 * K << i for i in range(7)), 64: tuple(16 * K << i for i in range(5))}
            self.dense_forward_max, self.dense_backward_max = 128 * K, 64 * K
            self.sparse_block, self.sparse_lengths = 128, (32 * K, 64 * K, 128 * K, 256 * K)
            self.sparse_dense_mask_max = 64 * K
            self.matmul_size = 8192
            self.case_seconds = 0.5
        self.sparse_kinds = ("bigbird", "bslongformer", "local")
        self.sparse_head_dim = self.head_dims[0]


# ------------------------------------------------------------ results
class Report:
    """The JSON document, rewritten after every case."""

    def __init__(self, paths: list[Path], meta: dict) -> None:
        self.paths = paths
        self.data: dict[str, Any] = {**meta, "matmul": {}, "dilated": [], "sparse": [], "first_output": [],
                                     "summary": {}, "skipped": [], "errors": []}

    def add(self, section: str, row: dict) -> None:
        self.data[section].append(row)
        self.write()

    def write(self) -> None:
        text = json.dumps(self.data, indent=1, default=str)
        for path in self.paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(path)


def log(message: str) -> None:
    print(f"[bench_gpu {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------- timing
def make_timer(torch, device):
    """fn -> seconds of one call: CUDA events on CUDA, a host clock on the CPU."""
    if device.type == "cuda":
        def timed(fn: Callable[[], Any]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
    else:
        def timed(fn: Callable[[], Any]) -> float:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
    return timed


def is_oom(error: BaseException) -> bool:
    return "out of memory" in str(error).lower()


def free_memory(torch) -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def interleaved(torch, timed, candidates: dict[str, Callable[[], Any]], case_seconds: float, report: Report,
                context: dict) -> dict[str, list[float]]:
    """Two untimed calls of each candidate (compile, plan lookup, caches), then
    rounds of one timed call each (A B C A B C ...). A candidate that fails
    (out of memory, an error) is dropped and the failure recorded."""
    alive = dict(candidates)
    estimate: dict[str, float] = {}
    for name, fn in list(alive.items()):
        try:
            fn()
            estimate[name] = timed(fn)
        except Exception as error:  # noqa: BLE001 - recorded, the run goes on
            kind = "oom" if is_oom(error) else "error"
            report.data["errors"].append({**context, "candidate": name, "failure": kind,
                                          "message": str(error).splitlines()[0][:300] if str(error) else repr(error)})
            log(f"{context} {name}: {kind}: {str(error).splitlines()[0][:200] if str(error) else repr(error)}")
            del alive[name]
            free_memory(torch)
    times: dict[str, list[float]] = {name: [] for name in alive}
    if not alive:
        return times
    per_round = sum(estimate.values())
    rounds = max(3, min(20, int(case_seconds * len(alive) / max(per_round, 1e-6))))
    for _ in range(rounds):
        for name, fn in alive.items():
            times[name].append(timed(fn))
    return times


# ------------------------------------------------------ dilated helpers
def selected_pairs(n: int, heads: int, segments, rates) -> int:
    """Query-key pairs the longnet scheme selects, summed over branches and
    heads, from docs/design.md section 2: segment s = min(w, n); head j has
    offset j // ceil(heads / r); each segment selects positions o, o + r, ...
    inside it (the last segment may be shorter)."""
    total = 0
    for w, r in zip(segments, rates):
        s = min(w, n)
        full, tail = divmod(n, s)
        group = -(-heads // r)
        for j in range(heads):
            o = j // group
            per_segment = len(range(o, s, r))
            in_tail = len(range(o, tail, r))
            total += full * per_segment**2 + in_tail**2
    return total


def flash_with_lse(torch, q, k, v):
    """FlashAttention on (B, H, M, d) -> (out, lse); autograd flows through out."""
    if q.device.type == "cuda":
        out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)
        return out, lse
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False)


def gather_flash_dilated(torch, q, k, v, segments, rates):
    """The peer (torchscale's algorithm): per branch and head group, gather the
    dilated rows with index_select, FlashAttention over each segment's rows,
    scatter the outputs into a full-size branch output, then weight branches
    by softmax of their log-sum-exps (computed without gradient, as torchscale
    does). (b, n, h, d) in and out; n a multiple of every min(w, n)."""
    b, n, h, d = q.shape
    outs, lses = [], []
    for w, r in zip(segments, rates):
        s = min(w, n)
        t = n // s
        group = -(-h // r)
        out = q.new_zeros(b, n, h, d)
        lse = torch.full((b, n, h), -math.inf, dtype=torch.float32, device=q.device)
        for o in range(r):
            heads = slice(o * group, min(h, (o + 1) * group))
            hg = heads.stop - heads.start
            if hg <= 0:
                continue
            within = torch.arange(o, s, r, device=q.device)
            m = within.numel()
            index = (torch.arange(t, device=q.device)[:, None] * s + within[None]).flatten()
            parts = [x.index_select(1, index)[:, :, heads].reshape(b * t, m, hg, d).transpose(1, 2) for x in (q, k, v)]
            o_part, l_part = flash_with_lse(torch, *parts)
            out[:, index, heads] = o_part.transpose(1, 2).reshape(b, t * m, hg, d)
            lse[:, index, heads] = l_part.float().reshape(b, t, hg, m).transpose(2, 3).reshape(b, t * m, hg)
        outs.append(out)
        lses.append(lse)
    with torch.no_grad():
        weights = torch.softmax(torch.stack(lses), dim=0)
    result = sum(wt.unsqueeze(-1).to(q.dtype) * o for wt, o in zip(weights, outs))
    return result


# ----------------------------------------------------- dilated section
def dilated_cost_estimate(report: Report, cfg: Config, head_dim: int, n: int) -> float:
    """Seconds length ``n`` will take, from the medians at a shorter length:
    each candidate runs about 6 times (2 untimed, 3 rounds, the memory
    check); dilated work grows linearly, dense quadratically; 3 s of set-up."""
    estimate = 0.0
    for m in {r["length"] for r in report.data["dilated"] if r["head_dim"] == head_dim and r["length"] < n}:
        rows = [r for r in report.data["dilated"] if r["head_dim"] == head_dim and r["length"] == m and "median_s" in r]
        linear = sum(r["median_s"] for r in rows if not r["candidate"].startswith("sdpa")) * n / m
        dense = sum(r["median_s"] for r in rows if r["candidate"].startswith("sdpa")) * (n / m) ** 2
        estimate = max(estimate, 6 * (linear + (dense if n <= cfg.dense_forward_max else 0.0)) + 3)
    return estimate


def priority_order(lengths) -> list[int]:
    """The shortest, the longest (the 1M target), then from the middle
    outwards: when the budget runs short, what is dropped is in between."""
    lengths = sorted(lengths)
    order = [lengths[0], lengths[-1]]
    rest = lengths[1:-1]
    while rest:
        middle = rest.pop(len(rest) // 2)
        order.append(middle)
    return list(dict.fromkeys(order))


def run_dilated(torch, F, cfg: Config, device, dtype, timed, report: Report, deadline: float, head_dim: int) -> None:
    from attention import ImprovedDilatedAttention

    try:
        from attention import kernels
    except ImportError:
        kernels = None
    heads = cfg.heads
    module = ImprovedDilatedAttention(cfg.segments, cfg.rates)
    matmul_tflops = report.data["matmul"].get("tflops")
    for n in priority_order(cfg.lengths[head_dim]):
        estimate = dilated_cost_estimate(report, cfg, head_dim, n)
        if time.monotonic() + estimate > deadline:
            report.data["skipped"].append({"section": "dilated", "head_dim": head_dim, "length": n,
                                           "reason": f"budget (estimated {estimate:.0f} s)"})
            report.write()
            log(f"dilated d={head_dim}: skipping n={n} (budget: estimated {estimate:.0f} s)")
            continue
        started = time.monotonic()
        try:
            q, k, v = (torch.randn(1, n, heads, head_dim, device=device, dtype=dtype) for _ in range(3))
            grad_out = torch.randn(1, n, heads, head_dim, device=device, dtype=dtype)
        except Exception as error:  # noqa: BLE001
            report.data["errors"].append({"section": "dilated", "head_dim": head_dim, "length": n,
                                          "failure": "oom" if is_oom(error) else "error", "message": str(error)[:300]})
            break
        pairs = selected_pairs(n, heads, cfg.segments, cfg.rates)
        useful = {"dilated": 4.0 * head_dim * pairs, "dense": 4.0 * head_dim * n * n * heads}

        def sdpa(q, k, v, backend=None):
            args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            if backend is None:
                return F.scaled_dot_product_attention(*args).transpose(1, 2)
            from torch.nn.attention import sdpa_kernel

            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(*args).transpose(1, 2)

        def with_half_kernel(name: str, fn):
            def call(*args):
                previous = kernels.CUDA_HALF_KERNEL
                kernels.CUDA_HALF_KERNEL = name
                try:
                    return fn(*args)
                finally:
                    kernels.CUDA_HALF_KERNEL = previous
            return call

        functions: dict[str, tuple[Callable, str]] = {"ours": (module, "dilated")}
        if device.type == "cuda" and kernels is not None and hasattr(kernels, "CUDA_HALF_KERNEL"):
            # The other fused half kernel (cuDNN <-> flash): the measurement behind the default.
            other = "cuda_flash" if kernels.CUDA_HALF_KERNEL == "cuda_cudnn" else "cuda_cudnn"
            if other in getattr(kernels, "KERNELS", {}):
                functions[f"ours-{other[5:]}"] = (with_half_kernel(other, module), "dilated")
        if all(n % min(w, n) == 0 for w in cfg.segments):
            functions["gather-flash"] = (lambda q, k, v: gather_flash_dilated(torch, q, k, v, cfg.segments, cfg.rates),
                                         "dilated")
        if "gather-flash" in functions and n == cfg.lengths[head_dim][0]:
            # The peer must compute the same function: its output against ours.
            with torch.no_grad():
                ours_out = module(q, k, v).float()
                peer_out = functions["gather-flash"][0](q, k, v).float()
            error = float((peer_out - ours_out).norm() / ours_out.norm())
            report.data.setdefault("peer_check", []).append(
                {"head_dim": head_dim, "length": n, "relative_difference_gather_flash_vs_ours": error})
            log(f"dilated d={head_dim} n={n}: gather-flash vs ours relative difference {error:.1e}")
            del ours_out, peer_out
        dense_forward = n <= cfg.dense_forward_max
        dense_backward = n <= cfg.dense_backward_max
        if dense_forward:
            functions["sdpa"] = (sdpa, "dense")
            if device.type == "cuda":
                from torch.nn.attention import SDPBackend

                functions["sdpa-flash"] = (lambda q, k, v: sdpa(q, k, v, SDPBackend.FLASH_ATTENTION), "dense")
                functions["sdpa-cudnn"] = (lambda q, k, v: sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION), "dense")

        for mode in ("forward", "forward+backward"):
            candidates = {}
            for name, (fn, work) in functions.items():
                if work == "dense" and mode == "forward+backward" and (
                        not dense_backward or (name == "sdpa" and "sdpa-flash" in functions)):
                    continue
                if mode == "forward":
                    def call(fn=fn):
                        with torch.no_grad():
                            return fn(q, k, v)
                else:
                    q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)

                    def call(fn=fn):
                        return torch.autograd.grad(fn(q, k, v), (q, k, v), grad_out)
                candidates[name] = call
            context = {"section": "dilated", "head_dim": head_dim, "length": n, "mode": mode}
            times = interleaved(torch, timed, candidates, cfg.case_seconds, report, context)
            factor = 1.0 if mode == "forward" else 3.0
            for name, samples in times.items():
                median = statistics.median(samples)
                tflops = useful[functions[name][1]] * factor / median / 1e12
                report.add("dilated", {
                    **context, "candidate": name, "median_s": median, "times_s": samples,
                    "useful_tflop": useful[functions[name][1]] * factor / 1e12, "useful_tflops": tflops,
                    "efficiency_vs_matmul": tflops / matmul_tflops if matmul_tflops else None,
                })
                log(f"dilated d={head_dim} n={n} {mode:16s} {name:12s} {median * 1e3:9.2f} ms  {tflops:8.3g} TFLOP/s")
            for x in (q, k, v):
                x.requires_grad_(False)
        # Peak memory of one forward above what exists before it (inputs).
        if device.type == "cuda":
            for name in ("ours", "gather-flash"):
                if name not in functions:
                    continue
                try:
                    free_memory(torch)
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                    with torch.no_grad():
                        out = functions[name][0](q, k, v)
                    torch.cuda.synchronize()
                    peak = torch.cuda.max_memory_allocated() - before
                    output_bytes = out.numel() * out.element_size()
                    del out
                    report.add("dilated", {"section": "dilated", "head_dim": head_dim, "length": n, "mode": "memory",
                                           "candidate": name, "peak_above_inputs_bytes": peak,
                                           "output_bytes": output_bytes, "peak_over_output": peak / output_bytes})
                    log(f"dilated d={head_dim} n={n} memory {name}: peak above inputs {peak / output_bytes:.2f}x output")
                except Exception as error:  # noqa: BLE001
                    report.data["errors"].append({"section": "dilated", "head_dim": head_dim, "length": n,
                                                  "mode": "memory", "candidate": name,
                                                  "failure": "oom" if is_oom(error) else "error",
                                                  "message": str(error)[:300]})
        del q, k, v, grad_out
        free_memory(torch)
        log(f"dilated d={head_dim} n={n}: {time.monotonic() - started:.1f} s (estimated {estimate:.1f} s)")


# ------------------------------------------------------ sparse helpers
def block_table(torch, spec, device):
    """bool [H, nb, nb] of active block pairs, from the layout's CSR."""
    from patternstore import generate

    pattern = generate(spec)
    counts, indices = pattern["kv_num_blocks"], pattern["kv_indices"]
    layout_heads, nb = counts.shape
    table = torch.zeros(layout_heads * nb, nb, dtype=torch.bool)
    rows = torch.repeat_interleave(torch.arange(layout_heads * nb), counts.flatten().long())
    table[rows, indices.long()] = True
    return table.view(layout_heads, nb, nb).to(device)


def table_mask_mod(table, block_size: int, causal: bool):
    """A mask_mod that reads the layout as a block table (what a user of
    create_block_mask writes); per-head tables are indexed by head."""
    per_head = table.shape[0] > 1

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = table[h if per_head else 0, q_idx // block_size, kv_idx // block_size]
        if causal:
            allowed = allowed & (kv_idx <= q_idx)
        return allowed
    return mask_mod


def sparse_spec(cfg: Config, kind: str, n: int):
    from patternstore import SparseSpec

    return SparseSpec(kind, seq_len=n, block_size=cfg.sparse_block, num_heads=cfg.heads)


_FLEX = {}


def compiled_flex(torch, device):
    """flex_attention, compiled on CUDA (uncompiled on the CPU: the smoke run
    skips the CPU C++ compile)."""
    if device.type not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX[device.type] = torch.compile(flex_attention) if device.type == "cuda" else flex_attention
    return _FLEX[device.type]


def make_cbm(torch, table, cfg: Config, n: int, device, causal: bool):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(table_mask_mod(table, cfg.sparse_block, causal), None, None, n, n,
                             device=str(device), BLOCK_SIZE=cfg.sparse_block, _compile=device.type == "cuda")


# ------------------------------------------------------ sparse section
def run_sparse(torch, F, cfg: Config, device, dtype, timed, report: Report, deadline: float) -> None:
    d, heads = cfg.sparse_head_dim, cfg.heads
    # Priority order: forward at the shortest length (the dense-mask target),
    # then at the longest (the fresh-process target), then the rest;
    # forward+backward last.
    lengths = list(cfg.sparse_lengths)
    order = list(dict.fromkeys([(lengths[0], "forward"), (lengths[-1], "forward"),
                                *[(n, "forward") for n in lengths[1:-1]]]))
    if device.type == "cuda":  # flex has no CPU backward
        order += list(dict.fromkeys([(lengths[0], "forward+backward"), (lengths[-1], "forward+backward")]))
    # (length, mode, kind) -> (wall seconds, timed seconds): compiles and
    # set-up do not grow with the length, the timed calls about linearly.
    costs: dict[tuple[int, str, str], tuple[float, float]] = {}
    for n, mode in order:
        for kind in cfg.sparse_kinds:
            smaller = [wall - work + work * n / m for (m, md, kd), (wall, work) in costs.items()
                       if md == mode and kd == kind and m <= n]
            estimate = max(smaller) if smaller else 0.0
            if time.monotonic() + estimate > deadline:
                report.data["skipped"].append({"section": "sparse", "length": n, "mode": mode, "kind": kind,
                                               "reason": f"budget (estimated {estimate:.0f} s)"})
                report.write()
                log(f"sparse: skipping {kind} n={n} {mode} (budget: estimated {estimate:.0f} s)")
                continue
            started, timed_before = time.monotonic(), timed_seconds(report)
            run_sparse_case(torch, F, cfg, device, dtype, timed, report, kind, n, mode, d, heads)
            costs[(n, mode, kind)] = (time.monotonic() - started, timed_seconds(report) - timed_before)


def timed_seconds(report: Report) -> float:
    return sum(sum(row.get("times_s", ())) for row in report.data["sparse"])


def run_sparse_case(torch, F, cfg, device, dtype, timed, report, kind, n, mode, d, heads) -> None:
    from attention import BlockSparseAttention

    context = {"section": "sparse", "kind": kind, "length": n, "mode": mode, "head_dim": d}
    try:
        module = BlockSparseAttention(kind, block_size=cfg.sparse_block)
        spec = sparse_spec(cfg, kind, n)
        causal = spec.params["attention"] == "unidirectional"
        table = block_table(torch, spec, device)
        active = float(table.float().mean())
        cbm = make_cbm(torch, table, cfg, n, device, causal)
        flex = compiled_flex(torch, device)
        q, k, v = (torch.randn(1, n, heads, d, device=device, dtype=dtype) for _ in range(3))
        grad_out = torch.randn(1, n, heads, d, device=device, dtype=dtype)
    except Exception as error:  # noqa: BLE001
        report.data["errors"].append({**context, "failure": "oom" if is_oom(error) else "error",
                                      "message": str(error)[:300]})
        log(f"sparse {kind} n={n}: set-up failed: {error}")
        free_memory(torch)
        return

    def flex_call(q, k, v):
        out = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=cbm)
        return out.transpose(1, 2)

    functions: dict[str, Callable] = {"ours": module, "flex-cbm": flex_call}
    dense_mask = None
    if mode == "forward" and n <= cfg.sparse_dense_mask_max:
        free = torch.cuda.mem_get_info()[0] if device.type == "cuda" else 1 << 62
        # bool mask plus SDPA's additive copy in the input dtype
        if n * n * (1 + torch.finfo(dtype).bits // 8) < free // 4:
            position = torch.arange(n, device=device)
            blocks = position // cfg.sparse_block
            dense_mask = table[:, blocks][:, :, blocks]  # [H, n, n]
            if causal:
                dense_mask &= position[None, :] <= position[:, None]

            def sdpa_mask(q, k, v):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                      attn_mask=dense_mask[None]).transpose(1, 2)
            functions["sdpa-mask"] = sdpa_mask
    candidates = {}
    for name, fn in functions.items():
        if mode == "forward":
            def call(fn=fn):
                with torch.no_grad():
                    return fn(q, k, v)
        else:
            for x in (q, k, v):
                x.requires_grad_(True)

            def call(fn=fn):
                return torch.autograd.grad(fn(q, k, v), (q, k, v), grad_out)
        candidates[name] = call
    times = interleaved(torch, timed, candidates, cfg.case_seconds, report, context)
    for name, samples in times.items():
        median = statistics.median(samples)
        report.add("sparse", {**context, "candidate": name, "median_s": median, "times_s": samples,
                              "active_block_fraction": active})
        log(f"sparse {kind:12s} n={n} {mode:16s} {name:10s} {median * 1e3:9.2f} ms (active blocks {active:.3f})")
    del q, k, v, grad_out, dense_mask, cbm, table, candidates, functions
    free_memory(torch)


# ---------------------------------------------- first output, fresh process
def run_first_output(cfg: Config, args, report: Report, deadline: float) -> None:
    done_lengths = sorted({row["length"] for row in report.data["sparse"] if row["candidate"] == "ours"})
    if not done_lengths:
        report.data["skipped"].append({"section": "first_output", "reason": "no sparse length ran"})
        return
    n = done_lengths[-1]  # the layout is in the store and flex's kernels in the compile caches
    ran = {row["kind"] for row in report.data["sparse"] if row["candidate"] == "ours" and row["length"] == n}
    for kind in [kind for kind in cfg.sparse_kinds if kind in ran]:
        for which in ("ours", "flex-cbm"):
            remaining = deadline - time.monotonic()
            # A pair is what gives a ratio: the second process of a kind whose
            # first one ran may overrun the section (the next one gets less).
            pair_open = which == "flex-cbm" and any(
                r["kind"] == kind and r["length"] == n for r in report.data["first_output"])
            if pair_open:
                remaining = max(remaining, 60.0)
            if remaining < 20:
                report.data["skipped"].append({"section": "first_output", "kind": kind, "candidate": which,
                                               "reason": "budget"})
                continue
            command = [sys.executable, str(Path(__file__).resolve()), "--child", which, "--kind", kind,
                       "--length", str(n), "--device", args.device] + (["--quick"] if cfg.quick else [])
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p)
            wall = time.monotonic()
            try:
                done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO,
                                      timeout=min(180, remaining))
            except subprocess.TimeoutExpired:
                report.data["errors"].append({"section": "first_output", "kind": kind, "candidate": which,
                                              "failure": "timeout"})
                continue
            wall = time.monotonic() - wall
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode != 0 or not lines:
                report.data["errors"].append({"section": "first_output", "kind": kind, "candidate": which,
                                              "failure": f"exit {done.returncode}", "message": done.stderr[-600:]})
                log(f"first output {kind} {which}: failed (exit {done.returncode}): {done.stderr[-300:]}")
                continue
            row = {"section": "first_output", "kind": kind, "length": n, "candidate": which,
                   "process_wall_s": wall, **json.loads(lines[-1])}
            report.add("first_output", row)
            log(f"first output {kind} n={n} {which:9s} {row['first_output_s']:.3f} s (process {wall:.1f} s)")


def child(args) -> None:
    """One fresh process: time from before the module or mask is made to the
    first output, after imports and input creation (the same for both)."""
    started = time.perf_counter()
    import torch

    cfg = Config(args.quick)
    device = torch.device(args.device)
    dtype = getattr(torch, cfg.dtype_name)
    torch.manual_seed(0)
    n, d, heads = args.length, cfg.sparse_head_dim, cfg.heads
    q, k, v = (torch.randn(1, n, heads, d, device=device, dtype=dtype) for _ in range(3))
    if device.type == "cuda":
        torch.cuda.synchronize()
    from attention import BlockSparseAttention  # imports outside the timed region
    from torch.nn.attention.flex_attention import create_block_mask  # noqa: F401

    result: dict[str, Any] = {"import_and_inputs_s": time.perf_counter() - started}
    if args.child == "flex-cbm":
        # Without a store the layout must be generated: timed apart, not counted.
        t = time.perf_counter()
        spec = sparse_spec(cfg, args.kind, n)
        table = block_table(torch, spec, device)
        result["layout_generation_s"] = time.perf_counter() - t
        causal = spec.params["attention"] == "unidirectional"
    t0 = time.perf_counter()
    with torch.no_grad():
        if args.child == "ours":
            out = BlockSparseAttention(args.kind, block_size=cfg.sparse_block)(q, k, v)
        else:
            cbm = make_cbm(torch, table, cfg, n, device, causal)
            out = compiled_flex(torch, device)(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               block_mask=cbm).transpose(1, 2)
        if device.type == "cuda":
            torch.cuda.synchronize()
    result["first_output_s"] = time.perf_counter() - t0
    result["output_finite"] = bool(torch.isfinite(out).all())
    print(json.dumps(result), flush=True)


# -------------------------------------------------------------- summary
def summarize(report: Report, cfg: Config) -> dict:
    data = report.data
    summary: dict[str, Any] = {"dilated": [], "sparse": [], "first_output": []}
    rows = {}
    for row in data["dilated"]:
        rows[(row["head_dim"], row["length"], row["mode"], row["candidate"])] = row
    for (d, n, mode, name), row in sorted(rows.items()):
        if name != "ours" or mode == "memory":
            continue
        entry = {"head_dim": d, "length": n, "mode": mode, "ours_tflops": row["useful_tflops"]}
        peer = rows.get((d, n, mode, "gather-flash"))
        if peer:
            entry["speedup_vs_gather_flash"] = peer["median_s"] / row["median_s"]
            entry["faster_than_peer"] = entry["speedup_vs_gather_flash"] > 1.0
        for other in ("ours-cudnn", "ours-flash"):
            if (d, n, mode, other) in rows:
                entry["other_half_kernel"] = other
                entry["other_over_default_time"] = rows[(d, n, mode, other)]["median_s"] / row["median_s"]
        dense = [rows[(d, n, mode, c)]["useful_tflops"] for c in ("sdpa", "sdpa-flash", "sdpa-cudnn")
                 if (d, n, mode, c) in rows]
        if dense:
            entry["dense_tflops"] = max(dense)
            entry["tflops_ratio_vs_dense"] = row["useful_tflops"] / max(dense)
            entry["target_ratio"] = 0.8 if mode == "forward" else 0.7
            entry["target_met"] = entry["tflops_ratio_vs_dense"] >= entry["target_ratio"]
        memory = rows.get((d, n, "memory", "ours"))
        if memory and mode == "forward":
            entry["peak_over_output"] = memory["peak_over_output"]
            entry["memory_target_met"] = memory["peak_over_output"] <= 1.5
        summary["dilated"].append(entry)
    longest = max(cfg.lengths[cfg.head_dims[0]])
    summary["longest_forward_backward_done"] = (cfg.head_dims[0], longest, "forward+backward", "ours") in rows
    sparse = {}
    for row in data["sparse"]:
        sparse[(row["kind"], row["length"], row["mode"], row["candidate"])] = row
    for (kind, n, mode, name), row in sorted(sparse.items()):
        if name != "ours":
            continue
        entry = {"kind": kind, "length": n, "mode": mode, "active_block_fraction": row["active_block_fraction"]}
        flex = sparse.get((kind, n, mode, "flex-cbm"))
        if flex:
            entry["time_over_flex_cbm"] = row["median_s"] / flex["median_s"]
            entry["within_5_percent"] = entry["time_over_flex_cbm"] <= 1.05
        dense = sparse.get((kind, n, mode, "sdpa-mask"))
        if dense:
            entry["speedup_vs_sdpa_mask"] = dense["median_s"] / row["median_s"]
        summary["sparse"].append(entry)
    first = {(r["kind"], r["length"], r["candidate"]): r for r in data["first_output"]}
    for (kind, n, name), row in sorted(first.items()):
        other = first.get((kind, n, "flex-cbm"))
        if name == "ours" and other:
            summary["first_output"].append({
                "kind": kind, "length": n, "ours_s": row["first_output_s"], "flex_cbm_s": other["first_output_s"],
                "speedup": other["first_output_s"] / row["first_output_s"],
            })
    data["summary"] = summary
    report.write()
    return summary


def length_label(n: int) -> str:
    return f"{n // K}K" if n >= K else str(n)


def print_summary(summary: dict, report: Report) -> None:
    data = report.data
    print(f"\n== bench_gpu summary: {data['device_name']}, torch {data['torch']}, "
          f"{data['elapsed_s']:.0f} s, matmul {data['matmul'].get('tflops', float('nan')):.0f} TFLOP/s")
    for e in summary["dilated"]:
        parts = [f"dilated d={e['head_dim']} n={length_label(e['length'])} {e['mode']}: {e['ours_tflops']:.3g} TFLOP/s"]
        if "tflops_ratio_vs_dense" in e:
            parts.append(f"{e['tflops_ratio_vs_dense']:.2f} of dense (target {e['target_ratio']})")
        if "speedup_vs_gather_flash" in e:
            parts.append(f"{e['speedup_vs_gather_flash']:.2f}x gather-flash")
        if "other_over_default_time" in e:
            parts.append(f"{e['other_half_kernel']}/ours time {e['other_over_default_time']:.2f}")
        if "peak_over_output" in e:
            parts.append(f"peak {e['peak_over_output']:.2f}x output")
        print("  " + ", ".join(parts))
    print(f"  ours forward+backward at the longest length: {'done' if summary['longest_forward_backward_done'] else 'NOT done'}")
    for e in summary["sparse"]:
        parts = [f"sparse {e['kind']} n={length_label(e['length'])} {e['mode']}"]
        if "time_over_flex_cbm" in e:
            parts.append(f"time/flex {e['time_over_flex_cbm']:.3f}")
        if "speedup_vs_sdpa_mask" in e:
            parts.append(f"{e['speedup_vs_sdpa_mask']:.1f}x sdpa-mask")
        print("  " + ", ".join(parts))
    for e in summary["first_output"]:
        print(f"  first output {e['kind']} n={length_label(e['length'])}: ours {e['ours_s']:.2f} s, "
              f"create_block_mask+flex {e['flex_cbm_s']:.2f} s, {e['speedup']:.1f}x")
    print(f"  skipped: {len(data['skipped'])}, errors: {len(data['errors'])}")
    for error in data["errors"][:8]:
        print(f"  error: {json.dumps(error)[:200]}")


def plot(report: Report, paths: list[Path]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plot")
        return
    data = report.data
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    for ax, mode in zip(axes[:2], ("forward", "forward+backward")):
        for row_name in ("ours", "ours-cudnn", "ours-flash", "gather-flash", "sdpa", "sdpa-flash", "sdpa-cudnn"):
            for d in sorted({r["head_dim"] for r in data["dilated"]}):
                points = sorted((r["length"], r["useful_tflops"]) for r in data["dilated"]
                                if r["mode"] == mode and r["candidate"] == row_name and r["head_dim"] == d)
                if points:
                    ax.plot(*zip(*points), marker="o", label=f"{row_name} d={d}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("useful TFLOP/s")
        ax.set_title(f"dilated, {mode}")
        ax.legend(fontsize=7)
    summary = data["summary"].get("sparse", [])
    labels = [f"{e['kind']}\n{length_label(e['length'])} {e['mode'][:3]}" for e in summary if "time_over_flex_cbm" in e]
    values = [e["time_over_flex_cbm"] for e in summary if "time_over_flex_cbm" in e]
    axes[2].bar(range(len(values)), values)
    axes[2].axhline(1.05, color="red", linestyle="--", label="target 1.05")
    axes[2].set_xticks(range(len(values)), labels, fontsize=6)
    axes[2].set_ylabel("ours time / flex(create_block_mask) time")
    axes[2].set_title("block-sparse, steady state")
    axes[2].legend(fontsize=7)
    fig.suptitle(f"{data['device_name']}, torch {data['torch']}, {data['dtype']}")
    fig.tight_layout()
    for path in paths:
        fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny sizes")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--budget-s", type=float, default=300.0, help="wall-clock budget of the whole run")
    parser.add_argument("--out-dir", default=os.environ.get("OUT"), help="a second folder for JSON/PNG ($OUT)")
    parser.add_argument("--results", default=None,
                        help="where gpu.json and gpu.png go (default tools/results; --quick: a temporary folder)")
    parser.add_argument("--child", choices=("ours", "flex-cbm"), help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    begin = time.monotonic()
    deadline = begin + args.budget_s
    # A fresh store for this run (inherited by the fresh-process children):
    # the first call at each length generates and stores its layout.
    store_dir = tempfile.mkdtemp(prefix="bench-gpu-store-")
    os.environ["PATTERNSTORE_DIR"] = store_dir
    import torch
    import torch.nn.functional as F

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    cfg = Config(args.quick)
    dtype = getattr(torch, cfg.dtype_name)
    name = "quick" if cfg.quick else "gpu"
    results = Path(args.results or (tempfile.mkdtemp(prefix="bench-gpu-quick-") if cfg.quick else RESULTS))
    paths = [results / f"{name}.json"] + ([Path(args.out_dir) / f"{name}.json"] if args.out_dir else [])
    plots = [results / f"{name}.png"] + ([Path(args.out_dir) / f"{name}.png"] if args.out_dir else [])
    for option in ("cache_size_limit", "recompile_limit"):  # one compile per (kind, length) for flex
        if hasattr(torch._dynamo.config, option):
            setattr(torch._dynamo.config, option, 64)
    meta = {
        "benchmark": "tools/bench_gpu.py", "quick": cfg.quick, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "dtype": cfg.dtype_name, "batch": 1, "heads": cfg.heads, "head_dims": cfg.head_dims,
        "segments": cfg.segments, "rates": cfg.rates, "sparse_block": cfg.sparse_block,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "budget_s": args.budget_s,
        "notes": "forward+backward useful work = 3x forward; medians of interleaved rounds; "
                 "times in seconds; TFLOP/s = useful work / median",
    }
    report = Report(paths, meta)
    torch.manual_seed(0)
    timed = make_timer(torch, device)

    def matmul_tflops() -> float:
        size = cfg.matmul_size
        a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
        for _ in range(3):
            a @ b
        samples = [timed(lambda: a @ b) for _ in range(10)]
        return 2 * size**3 / statistics.median(samples) / 1e12

    report.data["matmul"] = {"size": cfg.matmul_size, "dtype": cfg.dtype_name, "tflops": matmul_tflops()}
    report.write()
    log(f"{report.data['device_name']}: matmul {report.data['matmul']['tflops']:.1f} TFLOP/s")

    # Sections with shares of the remaining budget (unused time rolls over).
    sections: list[tuple[str, float, Callable[[float], None]]] = [
        ("dilated", 0.33, lambda dl: run_dilated(torch, F, cfg, device, dtype, timed, report, dl, cfg.head_dims[0])),
        ("sparse", 0.37, lambda dl: run_sparse(torch, F, cfg, device, dtype, timed, report, dl)),
        ("first_output", 0.20, lambda dl: run_first_output(cfg, args, report, dl)),
        ("dilated-small-head", 0.10,
         lambda dl: run_dilated(torch, F, cfg, device, dtype, timed, report, dl, cfg.head_dims[1])),
    ]
    for i, (section, share, run) in enumerate(sections):
        remaining = deadline - time.monotonic()
        shares_left = sum(s for _, s, _ in sections[i:])
        section_deadline = time.monotonic() + remaining * share / shares_left
        log(f"section {section}: {section_deadline - time.monotonic():.0f} s")
        try:
            run(section_deadline)
        except Exception as error:  # noqa: BLE001 - one broken section must not lose the others
            import traceback

            report.data["errors"].append({"section": section, "failure": "exception",
                                          "message": traceback.format_exc()[-1500:]})
            log(f"section {section} failed: {error!r}")
            free_memory(torch)
        report.write()
    report.data["matmul"]["tflops_end"] = matmul_tflops()
    report.data["elapsed_s"] = time.monotonic() - begin
    summary = summarize(report, cfg)
    try:
        plot(report, plots)
    except Exception as error:  # noqa: BLE001 - the figures are in the JSON; the plot is a view of them
        log(f"plot failed: {error!r}")
    print_summary(summary, report)
    shutil.rmtree(store_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
