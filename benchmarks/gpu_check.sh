#!/usr/bin/env bash
# The one GPU check: build, GPU tests, ceilings, benchmarks against cuDNN, full-volume profile, summary last.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine (H100/H200, no network, no nibabel needed)
#   bash benchmarks/gpu_check.sh --dry-run  # anywhere: the same plumbing on the CPU at tiny sizes, no install
#
# Every stage has a hard time limit (together about 8 minutes); a stage that fails or runs out of time is
# reported in the summary and the later stages still run. Results go to $OUT if set, else
# benchmarks/results/gpu_check_<time>/: gpu_check.log, bench.json (with the ceilings), bench.png, profile.json,
# profile.png, profile_graphs.json, report.md, dispatch_table.json (measured backend order per op and shape, to merge
# into seg3d_fast/backends/dispatch_table.json). At most 8 files: the device tool returns no more.
# Knobs: PYTHON (default python3), GPU_CHECK_TESTS (test files), GPU_CHECK_SKIP (stage names, e.g. "bench demo" for
# a rerun after a change that the last run's benchmarks still describe), GPU_CHECK_BENCH_K (a pytest -k expression
# over the benchmark rows' ids, e.g. "c64 or c128 or c256" for the rows a time-limited run did not reach), the
# SEG3D_BENCH_* variables of benchmarks/conftest.py, and the stage limits below (seconds).
set -u -o pipefail

# Limits add up to 600 s; the H100 run of 2026-11-26 (run 3) took 32 s to build (this card's architecture only),
# 111 s of tests (8 workers), 110 s of benchmarks (to the deadline), 38 s of profile, 40 s of demo; the H200 run of
# 2026-11-27 (run 5) 38 s to build and 161 s of tests
T_BUILD=${T_BUILD:-60}
T_TESTS=${T_TESTS:-180}      # the big-memory tests run one at a time (tests/helpers.py BIG_GPU_MEMORY)
T_CEILINGS=${T_CEILINGS:-15}
T_BENCH=${T_BENCH:-100}        # rows still pending this many seconds - 15 after the stage starts are skipped
T_PROFILE=${T_PROFILE:-100}
T_GRAPHS=${T_GRAPHS:-45}       # the CUDA-graph variants, in a process of their own (the profile's figures survive it)
T_REPORT=${T_REPORT:-10}
T_DEMO=${T_DEMO:-80}
T_HOST=${T_HOST:-10}

DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [[ $DRY_RUN -eq 0 ]] && ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA GPU visible to torch (nvidia-smi: $(nvidia-smi -L 2>&1 | head -1))."
  echo "gpu_check: run it on the GPU machine, or use --dry-run to check the plumbing on the CPU."
  exit 2
fi
RES=${OUT:-$ROOT/benchmarks/results/gpu_check_$(date +%Y%m%d-%H%M%S)}
mkdir -p "$RES"
LOG=$RES/gpu_check.log
exec > >(tee -a "$LOG") 2>&1
START=$(date +%s)
declare -a STATUS=()

stage() {  # stage NAME LIMIT_S CMD...: run with a hard limit, record ok / FAILED rc / TIMED OUT
  local name=$1 limit=$2; shift 2
  if [[ " ${GPU_CHECK_SKIP:-} " == *" $name "* ]]; then
    STATUS+=("$(printf '%-10s %-16s' "$name" "skipped")"); return 0
  fi
  local t0=$(date +%s)
  echo; echo "=== $name (limit ${limit}s) ==="
  # SIGINT first: pytest then still prints its summary (the failures so far) before it stops
  timeout -s INT -k 10 "$limit" "$@"
  local rc=$?
  local took=$(( $(date +%s) - t0 ))
  local what="ok"
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then what="TIMED OUT"; elif [[ $rc -ne 0 ]]; then what="FAILED (rc $rc)"; fi
  STATUS+=("$(printf '%-10s %-16s %4ss' "$name" "$what" "$took")")
  return $rc
}

echo "=== environment ==="
$PY - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton: not importable:", e)
print("GPU:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
EOF

if [[ $DRY_RUN -eq 0 ]]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || true
  # --- build: the editable install compiles the CUDA extension ------------------------------------------------
  # this card's architecture only (a wheel builds sm_80 and sm_90): the stage's time goes to one compile
  export CMAKE_CUDA_ARCHITECTURES=${CMAKE_CUDA_ARCHITECTURES:-$($PY -c \
    "import torch; print('%d%d-real' % torch.cuda.get_device_capability())")}
  stage build "$T_BUILD" $PY -m pip install --no-deps --no-build-isolation --no-index -e . -q
  $PY -c "import seg3d_fast.backends as b; print('backends:', b.available())" || true
  # nibabel (the demo and the graphed-training test read NIfTI) and scipy (the HD95 tests): carried as wheels in
  # .whl/ when the machine lacks them
  for pkg in nibabel scipy; do
    if ! $PY -c "import $pkg" 2>/dev/null && ls .whl/$pkg-*.whl >/dev/null 2>&1; then
      $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/$pkg-*.whl && export PYTHONPATH=/tmp/site
    fi
  done
  # --- GPU tests (importorskip keeps tests needing nibabel out where it is missing) ------------------------------
  DEFAULT_TESTS="tests/test_build.py tests/test_cuda_backend.py tests/test_triton_backend.py tests/test_ops.py
                 tests/test_graphs.py tests/test_ddp.py tests/test_metrics.py
                 tests/test_predict.py::test_prediction_on_the_gpu_matches_the_host"
  TESTS=${GPU_CHECK_TESTS:-"$DEFAULT_TESTS tests/test_profile.py"}
  EXISTING=$(for f in $TESTS; do [[ -e ${f%%::*} ]] && echo "$f"; done)  # (a file, or a test in one)
  # One default tile config per kernel (tuning is the benchmarks' job); all failures reported, in parallel if
  # pytest-xdist is there (the tests are many small launches and Triton compiles), the tests of 10-26 GB each
  # one at a time (tests/helpers.py BIG_GPU_MEMORY).
  XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
  # GPU_CHECK_K: a -k filter; by default the CUDA backend runs as v3 (the default kernels, which use v2's for what
  # the halo kernel does not take): the v2-only and v1 runs (every generation also runs in the CPU simulation in
  # CI) and the CPU-side emulated/simulated cases are left out, to keep the stage within its limit.
  # COLUMNS: the summary's FAILED lines keep their error text, read below
  stage tests "$T_TESTS" env SEG3D_FAST_AUTOTUNE=0 COLUMNS=300 $PY -m pytest $EXISTING -m "not slow" -q \
    -p no:cacheprovider --tb=short $XDIST -k "${GPU_CHECK_K:-not v1 and not v2 and not simulated and not emulated}"
  # A kernel that faults poisons its whole process: a backend whose tests faulted stays out of the timing stages
  # (the failures above say which), so that the others are still measured.
  FAULT_RE='illegal memory access|misaligned address|unspecified launch failure|illegal instruction|an illegal'
  BENCH_BACKENDS=eager,eager_cl,compile,triton,triton_tma,cuda
  for b in cuda triton; do
    if grep -E "^FAILED tests/test_${b}_backend.py" "$LOG" | grep -Eq "$FAULT_RE"; then
      echo "gpu_check: the $b backend faulted in its tests: left out of the benchmarks and the profile"
      BENCH_BACKENDS=$(echo ",$BENCH_BACKENDS," | sed "s/,$b,/,/; s/,${b}_tma,/,/; s/^,//; s/,\$//")
      [[ $b == cuda ]] && export SEG3D_FAST_BACKEND=triton
      [[ $b == triton ]] && export SEG3D_FAST_BACKEND=cuda
    fi
  done
  export SEG3D_BENCH_BACKENDS=${SEG3D_BENCH_BACKENDS:-$BENCH_BACKENDS}
  # the fused network and its baseline first: the largest-cube searches run in this order until the time limit;
  # the op tables of one traced step per variant go to the log (where the network's time goes)
  PROFILE_ARGS=(--dtype bf16 --steps 5 --warmup 2 --memory-budget 16 --max-edge 512 --time-limit $((T_PROFILE - 25))
                --variants plain_cl fused cuda plain --trace /tmp/seg3d_trace --memory-history)
  # the same network replayed from CUDA graphs, beside its eager form and the plain baseline measured again here
  GRAPH_ARGS=(--dtype bf16 --steps 5 --warmup 2 --memory-budget 0
              --variants plain_cl fused fused_graph plain_cl_graph --trace /tmp/seg3d_trace)
else
  echo "(dry run: no install; the package is used from the checkout)"
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
  export SEG3D_BENCH_BACKENDS=${SEG3D_BENCH_BACKENDS:-eager,eager_cl,reference}
  stage tests "$T_TESTS" $PY -m pytest tests/test_profile.py -q -p no:cacheprovider -k "by_hand or plain_jaccard"
  PROFILE_ARGS=(--input-size 16 16 16 --features 2 4 6 8 --steps 2 --warmup 1 --memory-budget 1 --max-edge 128)
fi

# --- host-side cost of each fused call on this machine's CPU (kernels stubbed; a table in the log) ---------------
stage host "$T_HOST" $PY benchmarks/host_overhead.py --reps 100

# --- ceilings: bf16 matmul 8192^3 and copy bandwidth of this card, used for every fraction below ---------------
stage ceilings "$T_CEILINGS" $PY benchmarks/ceilings.py --out /tmp/seg3d_ceilings.json

# --- benchmarks against cuDNN ----------------------------------------------------------------------------------
export SEG3D_CEILINGS_JSON=/tmp/seg3d_ceilings.json SEG3D_BENCH_OUT=$RES/bench.json  # bench.json keeps them
# bf16 only (fp32 and fp16 of the representative layers were measured in run 1): every layer within the limit
export SEG3D_BENCH_REP_DTYPES=${SEG3D_BENCH_REP_DTYPES:-bf16}
export SEG3D_BENCH_DEADLINE=$(( $(date +%s) + T_BENCH - 15 ))
stage bench "$T_BENCH" $PY -m pytest benchmarks --benchmark-only -q -p no:cacheprovider \
  --benchmark-columns=median,min,rounds --benchmark-sort=name ${GPU_CHECK_BENCH_K:+-k "$GPU_CHECK_BENCH_K"}

# --- the measured backend order, used by the profile's "fused" network (each layer on its fastest backend) ----------
if [[ -s $RES/bench.json ]]; then
  timeout 30 $PY benchmarks/report.py "$RES/bench.json" --dispatch-table "$RES/dispatch_table.json" --markdown /dev/null \
    && export SEG3D_FAST_DISPATCH_TABLE=$RES/dispatch_table.json
fi

# --- full-volume training profile --------------------------------------------------------------------------------
stage profile "$T_PROFILE" $PY -m seg3d_fast.profile "${PROFILE_ARGS[@]}" --out "$RES/profile.json" \
  --chart "$RES/profile.png"
if [[ $DRY_RUN -eq 0 ]]; then  # (CUDA graphs need the GPU)
  stage graphs "$T_GRAPHS" $PY -m seg3d_fast.profile "${GRAPH_ARGS[@]}" --out "$RES/profile_graphs.json" \
    --chart /tmp/seg3d_profile_graphs.png
fi

for f in /tmp/seg3d_trace/ops_*.txt /tmp/seg3d_trace/host_*.txt; do
  [[ -s $f ]] && { echo "--- $(basename "$f")"; head -40 "$f" | cut -c1-230; }
done
# --- the main job on the GPU: the demo (nibabel installed above where it was missing) -----------------------------
if [[ $DRY_RUN -eq 0 ]]; then
  # Default backend order (cuda, triton, reference) without run-time timing, and one tile config per Triton kernel:
  # the demo's crop shapes are not in the benchmark's table, and tuning every new shape would eat the stage's time
  # (with tuning on, the 2026-11-27 H200 run was still compiling the first epoch's kernels after 50 s).
  rm -f /tmp/seg3d_demo/metrics.json
  stage demo "$T_DEMO" env SEG3D_FAST_MEASURE_DISPATCH=0 SEG3D_FAST_AUTOTUNE=0 $PY -m seg3d_fast demo --device cuda \
    --out /tmp/seg3d_demo
  [[ -s /tmp/seg3d_demo/metrics.json ]] && echo "demo metrics: $(tr -d "\n " < /tmp/seg3d_demo/metrics.json)"
fi

# --- report: markdown + chart, then the summary last -----------------------------------------------------------
FILES=$(for f in bench.json profile.json profile_graphs.json; do [[ -s $RES/$f ]] && echo "$RES/$f"; done)
if [[ -n "$FILES" ]]; then
  stage report "$T_REPORT" $PY benchmarks/report.py $FILES --markdown "$RES/report.md" --png "$RES/bench.png"
fi
echo
echo "=================================== summary ==================================="
if [[ -n "$FILES" ]]; then
  DTYPE=bf16; [[ $DRY_RUN -eq 1 ]] && DTYPE=fp32
  timeout 30 $PY benchmarks/report.py $FILES --summary --dtype $DTYPE --direction both
fi
echo
echo "stages:"
for s in "${STATUS[@]}"; do echo "  $s"; done
echo "total $(( $(date +%s) - START ))s; results in $RES"
