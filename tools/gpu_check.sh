#!/usr/bin/env bash
# `make gpu-check`: the CUDA tests, a CPU subset (torch compatibility) and a
# short GPU benchmark on a machine with a CUDA device and no network. Runs with that machine's own python3 and torch: nothing comes
# from an index; the pure-Python dependencies it lacks (diskcache,
# platformdirs) are installed from wheels carried in .whl/ (git-ignored) into
# /tmp/site, and the project is imported from the working tree.
#
#   tools/gpu_check.sh          # on the GPU machine (about 7 minutes at most; give .whl/ with it)
#   tools/gpu_check.sh --dry    # anywhere: CUDA tests must skip, bench --quick on the CPU
#
# Every step is bounded by `timeout`; a failing step does not stop the next.
# With $OUT set (a folder the caller collects afterwards), a few files go there:
# gpu.json, gpu.png, decode_gpu.json, decode_model_gpu.json (benchmarks-only
# runs) and one gpu_check_logs.txt holding every step's full log; a summary is
# printed last.
# Environment: PYTHON (default python3), GPU_CHECK_SECONDS (total, default 420),
# GPU_CHECK_TESTS=0 (benchmarks only: a second run gets the whole budget),
# GPU_CHECK_BENCH=0 (tests only).
#
# A second run completes the benchmark: with the first run's gpu.json at
# tools/results/gpu.json (copied from $OUT, nothing committed in between),
# bench_gpu.py keeps every case of that run and its cuda_tests entry, and
# runs only what the budget made it skip: `GPU_CHECK_TESTS=0 make gpu-check`.
set -u -o pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TOTAL=${GPU_CHECK_SECONDS:-420}
DRY=0
STATUS=0
[ "${1:-}" = "--dry" ] && DRY=1
STATE=$(mktemp -d /tmp/gpu_check.XXXXXX)  # step verdicts and logs (gathered into one file of $OUT at the end)
: >"$STATE/summary"
LOGS=$STATE
mkdir -p tools/results ${OUT:+"$OUT"}
export PYTHONUNBUFFERED=1
START=$SECONDS

step() {  # step NAME SECONDS COMMAND...: run with a time limit, full log to $LOGS/NAME.log, its tail here
    local name=$1 limit=$2
    shift 2
    local began=$SECONDS
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    echo "== $name: last lines"
    tail -n 12 "$LOGS/$name.log"
    local verdict=ok
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then verdict="TIMED OUT"; elif [ $rc -ne 0 ]; then verdict="FAILED (exit $rc)"; fi
    printf '%-14s %-18s %4ds\n' "$name" "$verdict" $((SECONDS - began)) >>"$STATE/summary"
    [ "$verdict" = ok ]
}

echo "== gpu_check $( [ $DRY = 1 ] && echo '(dry run)') at $(date -u +%FT%TZ), budget ${TOTAL}s, logs in $LOGS"
command -v nvidia-smi >/dev/null && nvidia-smi -L
"$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'

# 1. Missing pure-Python dependencies from the carried wheels (no index).
if compgen -G ".whl/*.whl" >/dev/null; then
    rm -rf /tmp/site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed"; STATUS=1; }
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    echo "no .whl/ folder: using the interpreter's own packages"
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" -c 'import attention, patternstore, diskcache, platformdirs' || { echo "the project does not import"; exit 1; }

# 2. A CPU subset, in the background beside the CUDA tests: the code passes
#    on this torch too. No GPU in sight, one thread per test process.
CPU_TESTS=()
for f in tests/test_kernels.py tests/test_dilated.py tests/test_sparse.py; do [ -f "$f" ] && CPU_TESTS+=("$f"); done
XDIST=()
[ $DRY = 0 ] && "$PY" -c 'import xdist' 2>/dev/null && XDIST=(-n 6)
if [ "${GPU_CHECK_TESTS:-1}" != 0 ]; then
    CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1 step tests_cpu 110 \
        "$PY" -m pytest "${CPU_TESTS[@]}" "${XDIST[@]}" -q -p no:cacheprovider -m "not cuda" >"$STATE/cpu.out" 2>&1 &
    CPU_PID=$!

    # 3. Each fused CUDA kernel alone, one process each (a crash names its case),
    #    then the CUDA tests (they skip cleanly without a device: the dry run
    #    checks that), in xdist workers where there are any, so that a kernel
    #    crashing one worker fails its test instead of ending the run. The
    #    CUDA tests include the ceilings on ATen ops and host syncs per call
    #    counted on the device (tests/test_host_ops.py, a few seconds).
    if [ $DRY = 0 ]; then
        step kernels 120 bash -c "for k in cuda_cudnn cuda_flash cuda_efficient cuda_efficient_float32; do $PY tools/cuda_kernels_check.py --kernel \$k; done"
    fi
    #    Every file with a test marked cuda takes part (test_cuda.py first: its block-sparse cases
    #    come last within it, and a run cut short loses the fewest checks).
    CUDA_FILES=(tests/test_cuda.py $(grep -l "pytest.mark.cuda" tests/test_*.py | grep -v "^tests/test_cuda.py$"))
    PYTEST_OPTS=(-v --tb=short -rfEs -p no:cacheprovider --durations=12 "${XDIST[@]/6/4}")
    "$PY" -c 'import pytest_timeout' 2>/dev/null && PYTEST_OPTS+=(--timeout=120)
    step tests_cuda 200 "$PY" -m pytest -m cuda "${CUDA_FILES[@]}" "${PYTEST_OPTS[@]}"
    wait $CPU_PID
    cat "$STATE/cpu.out"
fi

# 4. Decode latency through transformers: one layer's attention function (tools/bench_decode.py);
#    in a benchmarks-only run (GPU_CHECK_TESTS=0) also a compiled 2-layer Llama over a static cache
#    with CUDA graphs (--model, issue 18's decode target; one compile per candidate and context).
DECODE=0
[ -f tools/bench_decode.py ] && [ $DRY = 0 ] && [ "${GPU_CHECK_BENCH:-1}" != 0 ] && DECODE=1
MODEL_DECODE=0
[ $DECODE = 1 ] && [ "${GPU_CHECK_TESTS:-1}" = 0 ] && MODEL_DECODE=1

# 5. The benchmark, with what is left of the budget (it stops starting cases
#    past it; bench_gpu.py writes tools/results/gpu.{json,png} and, with $OUT
#    set, there too, with the CUDA test counts read from the tests' log).
#    Sections in order: dilated attention (fast and the fused flex path, the
#    path-choice table), peak memory at 1M, the fused path's first output,
#    block-sparse, packed documents in dilated and in block-sparse attention;
#    all of them inside gpu.json (no extra file in $OUT).
RESERVE=$(( (DECODE == 1 ? 60 : 0) + (MODEL_DECODE == 1 ? 130 : 0) ))
BUDGET=$(( TOTAL - (SECONDS - START) - RESERVE - 45 ))  # bench_gpu ends within its budget + 30 s
if [ "${GPU_CHECK_BENCH:-1}" = 0 ]; then
    echo "== bench: skipped (GPU_CHECK_BENCH=0)"
elif [ $DRY = 1 ]; then
    # Every section at tiny sizes on the CPU: about 4.5 minutes (flex and create_block_mask compile
    # in fresh processes; the first-output section starts from empty compile caches by design).
    step bench 360 "$PY" tools/bench_gpu.py --quick --device cpu --budget-s 300 --results "$LOGS" \
        --cuda-tests "$LOGS/tests_cuda.log"
else
    # Under 20 s left, bench_gpu starts no benchmark and writes gpu.json with the test counts
    # (the total stays within GPU_CHECK_SECONDS; a second run with GPU_CHECK_TESTS=0 does the rest).
    [ $BUDGET -lt 0 ] && BUDGET=0
    step bench $((BUDGET + 40)) "$PY" tools/bench_gpu.py --budget-s "$BUDGET" --cuda-tests "$LOGS/tests_cuda.log" \
        ${OUT:+--out-dir "$OUT"}
fi
[ $(( TOTAL - (SECONDS - START) )) -lt 55 ] && DECODE=0  # no time left for it
if [ $DECODE = 1 ]; then
    step decode 55 "$PY" tools/bench_decode.py --device cuda --dtype bfloat16 --reps 5 \
        --output tools/results/decode_gpu.json
    [ -n "${OUT:-}" ] && cp -f tools/results/decode_gpu.json "$OUT/" 2>/dev/null
fi
[ $(( TOTAL - (SECONDS - START) )) -lt 60 ] && MODEL_DECODE=0
if [ $MODEL_DECODE = 1 ]; then  # results written after each context: a timeout keeps 32K
    step decode_model $(( TOTAL - (SECONDS - START) - 5 )) "$PY" tools/bench_decode.py --model --device cuda \
        --dtype bfloat16 --reps 20 --contexts 32768,262144 --candidates dilated,bigbird \
        --output tools/results/decode_model_gpu.json
    [ -n "${OUT:-}" ] && cp -f tools/results/decode_model_gpu.json "$OUT/" 2>/dev/null
fi

echo
echo "== gpu_check summary ($((SECONDS - START)) s)"
sed 's/^/  /' "$STATE/summary"
grep -q -v " ok " "$STATE/summary" && STATUS=1
if [ -f "$LOGS/tests_cuda.log" ]; then
    grep -E "passed|failed|skipped|error" "$LOGS/tests_cuda.log" | tail -n 1 | sed 's/^/  cuda tests: /'
    grep -E "^(FAILED|ERROR) " "$LOGS/tests_cuda.log" | head -n 30 | cut -c1-220 | sed 's/^/    /'
    grep -E "passed|failed|error" "$LOGS/tests_cpu.log" | tail -n 1 | sed 's/^/  cpu tests: /'
    grep -E "^(FAILED|ERROR) " "$LOGS/tests_cpu.log" | head -n 10 | cut -c1-220 | sed 's/^/    /'
fi
[ -f "$LOGS/bench.log" ] && sed -n '/== bench_gpu summary/,$p' "$LOGS/bench.log" | head -n 120
[ -f "$LOGS/decode.log" ] && tail -n 8 "$LOGS/decode.log"
[ -f "$LOGS/decode_model.log" ] && tail -n 12 "$LOGS/decode_model.log"
[ -f "$LOGS/kernels.log" ] && grep -E "worst|ERROR" "$LOGS/kernels.log" | sed 's/^/  kernels: /'
if [ -n "${OUT:-}" ]; then  # every step's full log in one file
    for f in "$LOGS"/*.log; do [ -f "$f" ] && { echo "===== $(basename "$f")"; cat "$f"; }; done >"$OUT/gpu_check_logs.txt"
fi
exit $STATUS
