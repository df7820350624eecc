"""The GPU benchmark: bench_attention, bench_memory, bench_first_call --fused,
bench_sparse, bench_packed_dilated and bench_packed_sparse with ``--device
cuda`` within one time budget, gathered into tools/results/gpu.json and gpu.png.

    python tools/bench_gpu.py [--budget-s S] [--device cuda|cpu] [--quick]
                              [--cuda-tests PYTEST_LOG] [--results DIR] [--out-dir DIR]

Each benchmark runs in its own process (an out-of-memory crash or a hang
loses one section, not the run) with a share of the budget; what a section
leaves unused rolls over to the next. A process still running 30 s past its
share (or past the whole budget) is killed; the JSON it wrote after each
case is kept, so the run ends within the budget plus 30 s.
Shapes and candidates are the benchmarks' ``gpu`` presets (see each
script): bf16, dilated attention at 16K..1M, the per-branch path ("fast")
and the fused path ("flex", natural and residue order) against dense SDPA
and a gather-flash peer, with the path-choice table; peak memory at 1M
(then 64K, 256K) for fast, flex and flex in ordered mode; the fused path's
first output in a fresh process at 1M against create_block_mask;
block-sparse against FlexAttention; packed documents (``cu_seqlens``, 16
documents of 2K..128K and 256 of 256..8K) in dilated attention (packed,
the fused flex path, padded, a loop, one unpacked sequence) and in
block-sparse attention (packed, padded, loop, unpacked). Sections run in
that order (issue 18's dilated figures first; the packed sections, 0.05 of
the budget each, take what is left).

gpu.json: ``device_name``, ``date``, ``torch``, ``commit``; ``cuda_tests``
``{"passed", "failed", "skipped"}`` read from the pytest log of the CUDA
tests (``--cuda-tests``; errors count as failed); ``sections``: each
benchmark's own JSON. Resume: when gpu.json already holds a run of this
commit, each benchmark gets its section back (``--resume``) and runs only
the cases it lacks, so a second run completes what the first could not.

``--quick``: tiny sizes (``--device cpu`` checks the driver end to end).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib

TOOLS = Path(__file__).resolve().parent
# (section, script, budget share, arguments besides --device/--dtype/--budget-s/--out/--resume)
SECTIONS = (
    ("attention", "bench_attention.py", 0.35, ["--preset", "gpu"]),
    ("memory", "bench_memory.py", 0.15, ["--lengths", "1048576", "65536", "262144",
                                         "--implementation", "flex-ordered", "flex", "fast"]),
    ("first_output", "bench_first_call.py", 0.20, ["--fused"]),
    ("sparse", "bench_sparse.py", 0.20, []),
    # Packed documents (cu_seqlens), issue 25's benchmarks: 0.05 each taken from attention and sparse.
    ("packed_dilated", "bench_packed_dilated.py", 0.05, []),
    ("packed_sparse", "bench_packed_sparse.py", 0.05, ["--skip-blockmask"]),
)
QUICK_MEMORY = ["--lengths", "2048", "--implementation", "fast", "flex-ordered"]
KILL_AFTER_S = 30.0
MIN_SECTION_S = 20.0


def cuda_tests(log: Path) -> dict | None:
    """{"passed", "failed", "skipped"} from pytest's last summary line (errors counted as failed)."""
    if not log.is_file():
        return None
    lines = [line for line in log.read_text(errors="replace").splitlines()
             if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    if not lines:
        return None
    counts = {word: int(number) for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", lines[-1])}
    return {"passed": counts.get("passed", 0),
            "failed": counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0),
            "skipped": counts.get("skipped", 0)}


def run_section(script: str, arguments: list[str], out: Path, resume: Path | None, budget_s: float,
                kill_s: float) -> dict:
    """One benchmark process, killed after ``kill_s``; its JSON (possibly partial) and how it ended."""
    command = [sys.executable, str(TOOLS / script), *arguments, "--budget-s", f"{budget_s:.0f}", "--out", str(out)]
    if resume is not None:
        command += ["--resume", str(resume)]
    print(f"[bench_gpu] {' '.join(command[1:])}", flush=True)
    started = time.monotonic()
    # Its own process group, so that a kill also ends the workers it started.
    process = subprocess.Popen(command, stdout=sys.stdout, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=kill_s)
        ended = "ok" if process.returncode == 0 else f"exit {process.returncode}: {stderr[-600:]}"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        ended = f"killed after {kill_s:.0f} s"
    data = json.loads(out.read_text()) if out.is_file() else {}
    return {**data, "process": {"ended": ended, "wall_s": time.monotonic() - started}}


def plot(sections: dict, paths: list[Path], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    rows = sections.get("attention", {}).get("rows", [])
    for ax, mode in zip(axes[:2], ("forward", "forward+backward")):
        for key in sorted({(r["candidate"], r["head_dim"]) for r in rows if r["mode"] == mode}):
            points = sorted((r["length"], r["useful_tflops"]) for r in rows
                            if r["mode"] == mode and (r["candidate"], r["head_dim"]) == key and not r.get("causal"))
            if points and points[0][1] > 0:  # residue-permute does no useful work: not on this axis
                ax.plot(*zip(*points), marker="o", label=f"{key[0]} d={key[1]}")
        ax.set(xscale="log", xlabel="sequence length", ylabel="useful TFLOP/s", title=f"dilated, {mode}")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=7)
    sparse = [r for r in sections.get("sparse", {}).get("rows", []) if "flex-cbm" in r.get("ours_over", {})]
    axes[2].bar(range(len(sparse)), [r["ours_over"]["flex-cbm"] for r in sparse])
    axes[2].axhline(1.05, color="red", linestyle="--", label="target 1.05")
    axes[2].set_xticks(range(len(sparse)), [f"{r['kind']}\n{r['length'] // 1024}K {r['mode'][:3]}" for r in sparse],
                       fontsize=6)
    axes[2].set(ylabel="ours time / flex(create_block_mask) time", title="block-sparse")
    axes[2].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    for path in paths:
        fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=300.0, help="wall-clock budget of all the benchmarks")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--cuda-tests", type=Path, default=None, help="pytest log of the CUDA tests")
    parser.add_argument("--results", type=Path, default=benchlib.RESULTS, help="where gpu.json and gpu.png go")
    parser.add_argument("--out-dir", type=Path, default=None, help="a second folder for gpu.json and gpu.png")
    args = parser.parse_args()
    paths = [args.results / "gpu.json"] + ([args.out_dir / "gpu.json"] if args.out_dir else [])
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    machine = benchlib.machine(args.device)
    earlier = json.loads(paths[0].read_text()) if paths[0].is_file() else {}
    same_commit = earlier.get("commit") == machine["commit"]
    report = benchlib.Report(paths, "tools/bench_gpu.py", {"budget_s": args.budget_s, "quick": args.quick,
                             "dtype": dtype}, device=args.device)
    for key in ("rows", "failures", "skipped"):  # the sections hold these
        del report.data[key]
    # The earlier run's sections stay until they are rerun: a run killed mid-way loses none of them.
    report.data.update(device_name=machine.get("device_name", machine["cpu"]), date=machine["date"],
                       torch=machine["torch"], commit=machine["commit"],
                       sections=dict(earlier.get("sections", {})) if same_commit else {})
    tests = cuda_tests(args.cuda_tests) if args.cuda_tests else None
    report.data["cuda_tests"] = tests or (earlier.get("cuda_tests") if same_commit else None)
    report.write()
    deadline = time.monotonic() + args.budget_s
    tmp = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    try:
        for i, (name, script, share, extra) in enumerate(SECTIONS):
            resume = None
            if same_commit and name in earlier.get("sections", {}):
                resume = tmp / f"{name}-earlier.json"
                resume.write_text(json.dumps(earlier["sections"][name]))
            left = deadline - time.monotonic()
            if left < MIN_SECTION_S:  # not worth a process start: the earlier run's section, if any, stays
                report.data["sections"][name] = {**earlier["sections"][name]} if resume else {}
                report.data["sections"][name]["process"] = {"ended": f"not started: {left:.0f} s of budget left"}
                continue
            budget_s = left * share / sum(s for _, _, s, _ in SECTIONS[i:])
            arguments = ["--device", args.device, *(QUICK_MEMORY if args.quick and name == "memory" else extra)]
            arguments += ["--dtype", dtype] + (["--quick"] if args.quick and name != "memory" else [])
            # The process start (imports, CUDA context: ~10 s) comes out of its share; the last
            # case may overrun, but never the whole run's budget by more than KILL_AFTER_S.
            kill_s = min(budget_s + KILL_AFTER_S, deadline + KILL_AFTER_S - time.monotonic())
            report.data["sections"][name] = run_section(script, arguments, tmp / f"{name}.json", resume,
                                                        max(budget_s - 10.0, 1.0), kill_s)
            report.write()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report.write()
    try:
        plot(report.data["sections"], [p.with_suffix(".png") for p in paths],
             f"{report.data['device_name']}, torch {report.data['torch']}, {dtype}")
    except (ImportError, ValueError, KeyError) as error:  # the figures are in the JSON; the plot is a view
        print(f"[bench_gpu] no plot: {error!r}")
    print(f"\n== bench_gpu summary: {report.data['device_name']}, torch {report.data['torch']}, "
          f"cuda tests {report.data['cuda_tests']}")
    for name, section in report.data["sections"].items():
        print(f"  {name}: {len(section.get('rows', []))} rows ({section.get('resumed_rows', 0)} resumed), "
              f"{len(section.get('skipped', []))} skipped, {len(section.get('failures', []))} failures, "
              f"process {section['process']['ended'][:200]}")
        for target, verdict in section.get("targets", {}).items():
            print(f"    target {target}: {'met' if verdict['met'] else 'NOT met'}")
        for row in section.get("choice_table", []):  # the rows a GPU session copies into the library's table
            print(f"    choice d={row['head_dim']} n={row['length']} causal={row['causal']} "
                  f"training={row['training']}: {row['winner']} (fast/flex {row['fast_over_flex']:.2f})")


if __name__ == "__main__":
    main()
