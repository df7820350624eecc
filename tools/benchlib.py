"""What every benchmark in tools/ shares: the machine description, the
timer, A/B interleaving with a matmul in the same run, out-of-memory-tolerant
candidates, a time budget and the JSON report (with resume).

Guarantees and limits:
- ``timer(device)`` times one call: CUDA events between two synchronisations
  on CUDA, ``perf_counter`` otherwise. Host clocks see other processes on a
  shared CPU; interleaving (A B A B ...) and matmul units are what make runs
  comparable, not the absolute seconds.
- ``interleave`` gives every candidate the same rounds; a candidate that
  fails during its warm-up (out of memory or any error) is dropped and its
  failure kept, the others go on. Failures inside the timed rounds propagate.
- Matmul units: a case's median over the median of a square matmul timed as
  one more candidate of the same rounds, so a load change moves both.
- ``Budget`` only stops new cases from starting: a case that overruns is not
  cut short (bound it with the caller's ``timeout``).
- ``Report`` rewrites its JSON atomically after every row, so a run killed
  mid-way keeps what it measured; ``resume`` keeps the rows (and the
  per-case dicts named in ``keep``, e.g. same-round ratios) of an earlier
  JSON only when it was written at the same commit.

Scripts import this module by name (``import benchlib``): a script's own
folder is first on ``sys.path``. ``attention`` and ``patternstore`` come from
the installed package (``pip install -e .``, which ``make`` does) or from
PYTHONPATH (``PYTHONPATH=. python tools/x.py``; tools/gpu_check.sh and
tools/bench_ab.py set it), so nothing here edits ``sys.path``.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "tools" / "results"

DTYPES = ("float32", "bfloat16", "float16")


# ---------------------------------------------------------------- machine
def cpu_name() -> str:
    """The processor's model name from /proc/cpuinfo, else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def commit(repo: Path = REPO) -> str:
    """The checked-out commit of ``repo`` (full hash), "" outside a git checkout or without git."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=repo)
    except OSError:
        return ""
    return done.stdout.strip()


def machine(device: str = "cpu", threads: Optional[int] = None) -> dict:
    """CPU, cores, threads, platform, Python, torch, commit, UTC date; the GPU's name and CUDA version on CUDA."""
    info = {
        "cpu": cpu_name(),
        "cores_visible": os.cpu_count(),
        "threads": torch.get_num_threads() if threads is None else threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
    }
    if torch.device(device).type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (``VmRSS``, ``VmHWM``, ...) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (VmHWM; Linux /proc/self/clear_refs, value 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------- timing
def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timer(device: torch.device | str) -> Callable[[Callable[[], Any]], float]:
    """fn -> seconds of one call of fn (see the module docstring)."""
    if torch.device(device).type == "cuda":
        def timed(fn: Callable[[], Any]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return timed

    def timed(fn: Callable[[], Any]) -> float:
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        return time.perf_counter() - start
    return timed


def profile_calls(calls: dict[str, Callable[[], Any]], device: torch.device | str, *, repeats: int = 5,
                  top: int = 8) -> dict[str, dict]:
    """Where each candidate's time goes (torch.profiler, ``repeats`` calls
    after one warm call): per call, the host ops dispatched and the device
    kernels launched with their summed time, and the ``top`` kernels (CUDA)
    or ops (CPU) by self time, in microseconds per call."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    result = {}
    for name, call in calls.items():
        call()
        synchronize(device)
        with profile(activities=activities) as prof:
            for _ in range(repeats):
                call()
            synchronize(device)
        events = prof.key_averages()
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        ops = [e for e in events if e.device_type == DeviceType.CPU and e.key.startswith("aten::")]

        def self_us(e: Any) -> float:
            if e.device_type == DeviceType.CUDA:
                return getattr(e, "self_device_time_total", 0.0) or getattr(e, "self_cuda_time_total", 0.0)
            return e.self_cpu_time_total
        ranked = sorted(kernels if on_cuda else ops, key=self_us, reverse=True)[:top]
        result[name] = {
            "host_ops_per_call": sum(e.count for e in ops) / repeats,
            "kernels_per_call": sum(e.count for e in kernels) / repeats,
            "kernel_us_per_call": sum(self_us(e) for e in kernels) / repeats,
            "top": [{"name": e.key[:120], "calls_per_call": e.count / repeats, "us_per_call": self_us(e) / repeats}
                    for e in ranked]}
    return result


def matmul(size: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Callable[[], Any]:
    """A ``size``^3 matmul as a candidate (2 * size^3 FLOP per call)."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    return lambda: torch.mm(a, b)


def matmul_gflops(size: int = 1024, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  calls: int = 10) -> float:
    """GFLOP/s of a ``size``^3 matmul, median of ``calls`` after one untimed (the machine's state, for a report)."""
    runs = interleave({}, timed=timer(device), rounds=calls, reference=matmul(size, device, dtype))
    return 2 * size**3 / runs.median("matmul") / 1e9


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def failure(error: BaseException) -> dict:
    """``{"failure": "oom" | "error", "message": first line}`` of an exception."""
    text = str(error).splitlines()[0][:300] if str(error) else repr(error)
    return {"failure": "oom" if is_oom(error) else "error", "message": text}


def child_json(command: list[str], *, env: dict, what: str, cwd: Optional[Path] = None,
               timeout: Optional[float] = None) -> dict:
    """Run a benchmark's child process; the JSON of its last stdout line.
    RuntimeError when it fails, the exception's line first (``failure``
    keeps one line), then the tail of its stderr."""
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [""])[-1]
        raise RuntimeError(f"{what} failed: {last[:200]}\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_bytes(fn: Callable[[], Any], device: torch.device | str) -> tuple[Any, Optional[int]]:
    """(fn(), peak bytes above everything allocated before the call). CUDA:
    ``max_memory_allocated`` after ``reset_peak_memory_stats``; CPU: the RSS
    high-water mark after resetting it, minus the RSS before (needs
    MALLOC_MMAP_THRESHOLD_ set low in a fresh process to be meaningful;
    None where /proc/self/clear_refs is not writable)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - before
    before = status_bytes("VmRSS")
    measured = reset_peak_rss()
    result = fn()
    return result, status_bytes("VmHWM") - before if measured else None


class Interleaved:
    """Times of interleaved rounds: ``times[name]`` (seconds, one per round),
    ``cpu_times[name]`` (this process's CPU seconds over the same calls: on a
    shared machine they do not count the time another process held the
    cores) and ``failures[name]`` for candidates dropped at warm-up."""

    def __init__(self, times: dict[str, list[float]], cpu_times: dict[str, list[float]],
                 failures: dict[str, dict]) -> None:
        self.times, self.cpu_times, self.failures = times, cpu_times, failures

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def cpu_median(self, name: str) -> float:
        return statistics.median(self.cpu_times[name])

    def units(self, name: str) -> Optional[float]:
        """Median time in matmul units (None without a "matmul" candidate)."""
        return self.median(name) / self.median("matmul") if "matmul" in self.times else None

    def ratio(self, a: str, b: str) -> float:
        """Median over rounds of time(a) / time(b) of the same round."""
        return statistics.median(x / y for x, y in zip(self.times[a], self.times[b]))

    def row(self, name: str) -> dict:
        """The JSON figures of one candidate."""
        return {"median_s": self.median(name), "times_s": self.times[name], "matmul_units": self.units(name)}


def interleave(candidates: dict[str, Callable[[], Any]], *, timed: Callable[[Callable[[], Any]], float],
               rounds: Optional[int | dict[str, int]] = None, seconds: float = 1.0, warmup: int = 1,
               reference: Optional[Callable[[], Any]] = None) -> Interleaved:
    """``warmup`` calls of each candidate (the last one timed, as the estimate),
    then rounds of one timed call each (A B C A B C ...). ``rounds`` None: as
    many as fit ``seconds`` per candidate by the estimate, 3 to 20 (20 with
    ``warmup`` 0: no estimate); a dict:
    per candidate, which sits out the rounds past its count (slow ones).
    ``reference``: a matmul timed as one more candidate, "matmul", every
    round, for ``Interleaved.units``."""
    alive = dict(candidates)
    if reference is not None:
        alive["matmul"] = reference
    failures: dict[str, dict] = {}
    estimate = 0.0
    for name, fn in list(alive.items()):
        try:
            for _ in range(max(warmup - 1, 0)):
                fn()
            estimate += timed(fn) if warmup else 0.0
        except Exception as error:  # noqa: BLE001 - kept in failures, the others go on
            failures[name] = failure(error)
            del alive[name]
            free_memory()
    if rounds is None:
        rounds = max(3, min(20, int(seconds * len(alive) / max(estimate, 1e-9))))
    counts = dict(rounds) if isinstance(rounds, dict) else dict.fromkeys(alive, rounds)
    counts["matmul"] = max(counts.values(), default=0)
    times: dict[str, list[float]] = {name: [] for name in alive}
    cpu_times: dict[str, list[float]] = {name: [] for name in alive}
    for i in range(max(counts.values(), default=0)):
        for name, fn in alive.items():
            if i < counts.get(name, 0):
                cpu = time.process_time()
                times[name].append(timed(fn))
                cpu_times[name].append(time.process_time() - cpu)
    return Interleaved(times, cpu_times, failures)


# ----------------------------------------------------------------- budget
class Budget:
    """A deadline for starting cases; what it turns away is kept in ``skipped``."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.skipped: list[dict] = []

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def allows(self, case: dict, estimate_s: float = 0.0) -> bool:
        """True when ``case`` may start (its estimate fits in what is left), else records it as skipped."""
        if self.left() > estimate_s:
            return True
        self.skipped.append({**case, "reason": f"budget: {self.left():.0f} s left, estimated {estimate_s:.0f} s"})
        return False


# ----------------------------------------------------------------- report
class Report:
    """The JSON of one benchmark run: ``machine``, ``config``, ``rows``,
    ``failures``, ``skipped`` and any other top-level entries set in ``data``;
    written to every path after each change."""

    def __init__(self, paths: list[Path], benchmark: str, config: dict, *, device: str = "cpu",
                 threads: Optional[int] = None, resume: Optional[Path] = None, keep: tuple[str, ...] = ()) -> None:
        self.paths = paths
        self.data: dict[str, Any] = {"benchmark": benchmark, "machine": machine(device, threads), "config": config,
                                     "rows": [], "failures": [], "skipped": [], **{key: {} for key in keep}}
        if resume is not None and resume.is_file():
            earlier = json.loads(resume.read_text())
            if earlier.get("machine", {}).get("commit") == self.data["machine"]["commit"]:
                self.data["rows"] = earlier.get("rows", [])
                self.data["resumed_rows"] = len(self.data["rows"])
                for key in keep:  # per-case dicts beside the rows (ratios, checks): a resumed case keeps them
                    self.data[key] = dict(earlier.get(key, {}))
        self.write()  # a run killed before its first row still hands back what it resumed

    def has(self, **case: Any) -> bool:
        """Whether a row matching every key of ``case`` is already in (a resumed run skips it)."""
        return any(all(row.get(k) == v for k, v in case.items()) for row in self.data["rows"])

    def add(self, **row: Any) -> None:
        self.data["rows"].append(row)
        self.write()

    def fail(self, case: dict, error: BaseException) -> None:
        self.data["failures"].append({**case, **failure(error)})
        self.write()

    def write(self) -> None:
        text = json.dumps(self.data, indent=1, default=str) + "\n"
        for path in self.paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(path)


def dilated_module(implementation: str, segments, rates, **options: Any) -> torch.nn.Module:
    """A dilated attention module with the "fast", "reference" or "flex" (fused) implementation."""
    from attention import DilatedAttention

    return DilatedAttention(segments, rates, implementation=implementation, **options)


def raise_recompile_limit(limit: int = 64) -> None:
    """Let one process compile the fused dilated path for every variant a
    benchmark times (natural and ordered order, causal or not, with and
    without gradients, each static then dynamic, per head_dim): dynamo's
    default of 8 graphs per function would send the rest to eager flex,
    which materialises the n x n scores."""
    for option in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, option):
            setattr(torch._dynamo.config, option, max(limit, getattr(torch._dynamo.config, option)))
            return


def block_mask(pattern: Any) -> Any:
    """flex_attention's BlockMask of a stored block-sparse layout."""
    from attention.block_mask import to_block_mask

    return to_block_mask(pattern)


def add_arguments(parser, *, dtype: str | list[str] = "float32") -> None:
    """The options every device-aware benchmark takes: --device, --dtype (several
    when the default is a list), --budget-s, --out, --resume."""
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default=dtype, choices=DTYPES, nargs="+" if isinstance(dtype, list) else None)
    parser.add_argument("--budget-s", type=float, default=None, help="start no case after this many seconds")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default in tools/results)")
    parser.add_argument("--resume", type=Path, default=None,
                        help="an earlier JSON of this benchmark: its rows of the same commit are kept, not rerun")
