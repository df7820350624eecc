"""What a user pays for ``torch.compile`` in a fresh process.

    PYTHONPATH=. python tools/bench_first_call.py [--rounds 3]

Each measurement is a new interpreter that imports the library, builds one
module, runs one eager call, then ``torch.compile(module, fullgraph=True)``
and its first call (dynamo, AOT autograd, inductor and, on a cold cache, the
C++ build), then three steady compiled calls. Compile cost = first compiled
call - median steady call; nothing is warmed up beforehand, so the figure
includes importing dynamo and inductor, as a user's first compiled call does.

- cold: an empty ``TORCHINDUCTOR_CACHE_DIR`` (a new machine, a new container);
- warm: the directory the cold run filled (every later process of a user).

Rounds alternate cold and warm (cold, warm, cold, warm, ...), each cold round
with a new directory; medians are reported. CPU, float32, ``no_grad``, batch
1, 2K tokens, 8 heads of 64, 2 threads. Writes tools/results/first_call.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from benchlib import machine  # noqa: E402

CASES = {
    "dilated": "from attention import ImprovedDilatedAttention as M; module = M([512, 1024, 2048], [1, 2, 4])",
    "bigbird": "from attention import BlockSparseAttention as M; module = M('bigbird', block_size=128)",
}

CHILD = """
import json, sys, time
start = time.perf_counter()
import torch
torch.set_num_threads(2)
{build}
imported = time.perf_counter() - start
q, k, v = (torch.randn(1, 2048, 8, 64) for _ in range(3))
with torch.no_grad():
    t = time.perf_counter(); module(q, k, v, is_causal=True); eager = time.perf_counter() - t
    compiled = torch.compile(module, fullgraph=True)
    t = time.perf_counter(); compiled(q, k, v, is_causal=True); first = time.perf_counter() - t
    steady = []
    for _ in range(3):
        t = time.perf_counter(); compiled(q, k, v, is_causal=True); steady.append(time.perf_counter() - t)
steady = sorted(steady)[1]
print(json.dumps({{"import_and_build_s": imported, "eager_first_call_s": eager, "compiled_first_call_s": first,
                  "steady_call_s": steady, "compile_s": first - steady}}))
"""


def run_child(case: str, cache_dir: str) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir, "PYTHONPATH": str(REPO),
           "PATTERNSTORE_DIR": str(Path(cache_dir) / "store")}
    done = subprocess.run([sys.executable, "-c", CHILD.format(build=CASES[case])], env=env, capture_output=True,
                          text=True, timeout=600, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict = {"machine": machine("cpu", threads=2), "rounds": args.rounds, "cases": {}}
    for case in CASES:
        runs: dict[str, list[dict]] = {"cold": [], "warm": []}
        for _ in range(args.rounds):
            with tempfile.TemporaryDirectory(prefix="first_call_") as cache_dir:
                runs["cold"].append(run_child(case, cache_dir))
                runs["warm"].append(run_child(case, cache_dir))
        summary = {mode: {field: statistics.median(run[field] for run in rows) for field in rows[0]}
                   for mode, rows in runs.items()}
        results["cases"][case] = {"median": summary, "runs": runs}
        for mode in ("cold", "warm"):
            s = summary[mode]
            print(f"{case:8s} {mode}: compile {s['compile_s']:.1f} s (first compiled call {s['compiled_first_call_s']:.1f} s,"
                  f" steady {s['steady_call_s'] * 1e3:.0f} ms; import+build {s['import_and_build_s']:.1f} s)")
    out = REPO / "tools" / "results" / "first_call.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
