#!/usr/bin/env bash
# One-shot GPU check: the TORCH_CHECK probe, the CUDA kernels in place (prebuilt or built),
# the CUDA tests, the GPU benchmarks (benchmarks/bench.py --device cuda).
#
#   PREBUILT=1 bash benchmarks/gpu_check.sh     # with .devcheck/prebuilt carried to the device
#   bash benchmarks/gpu_check.sh                # builds the CUDA kernels there (1-3 min more)
#   QUICK=1 PREBUILT=1 bash benchmarks/gpu_check.sh   # a rerun after a fix
#
# Budget (step timeouts, seconds; each can be overridden by its variable):
#                      full   QUICK=1
#   T_VERSIONS           10     10    device and versions
#   T_PROBE              90      0    probe_check_abort.py (QUICK: skipped unless PROBE=1);
#                                     the no-compiler cases first, then a ~40 s inline build
#   T_INSTALL            30     30    Python part only + the carried .so (PREBUILT=1)
#   T_OPS                75     45    CUDA op tests (tests/test_op_*.py), bad-input tests apart
#   T_ERRORS             25      0    CUDA bad-input tests, in a process of their own
#   T_MODELS             40     30    CUDA model tests (fusion, native ops, models)
#   T_OPBENCH            25      0    bench.py --bench ops (per-op rule vs cuDNN input gradient)
#   T_BENCH              90     65    bench.py --bench timing (the table rows done by then are kept)
#   sum                 385    180    (+ memcheck within T_TOTAL 420: full + QUICK = 600 s)
#   memcheck: bench.py --bench memcheck, only with time left, at most 60 s and never past
#             T_TOTAL (420) in all
#   T_BUILD             240    240    only when no usable prebuilt .so (PREBUILT unset, or it
#                                     does not match this torch / checkout, or fails to load)
# Results: $OUT (default benchmarks/out): summary.txt (one line per step, also printed at the
# end), probe.txt, install.log / build.log, backend_info.txt, pytest_*.txt, gpu_ops.md, gpu_results.md, memcheck.txt. A failing step is reported and the script goes on.
# Without a CUDA device (a rehearsal) the CUDA tests skip themselves, the GPU-only steps are
# reported as skipped, and the script still ends 0 if nothing failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
QUICK="${QUICK:-0}"
PREBUILT="${PREBUILT:-0}"
PREBUILT_DIR="${PREBUILT_DIR:-.devcheck/prebuilt}"
PY="${PYTHON:-$(command -v python > /dev/null && echo python || echo python3)}"  # the device's torch
if [ "$QUICK" = 1 ]; then
  : "${T_VERSIONS:=10}" "${T_PROBE:=$([ "${PROBE:-0}" = 1 ] && echo 90 || echo 0)}" "${T_INSTALL:=30}"
  : "${T_OPS:=45}" "${T_ERRORS:=0}" "${T_MODELS:=30}" "${T_OPBENCH:=0}"
  : "${T_BENCH:=65}" "${T_TOTAL:=180}"
  : "${BENCH_ARGS:=--models resnet50 --no-compile --budget 45}"
else
  : "${T_VERSIONS:=10}" "${T_PROBE:=90}" "${T_INSTALL:=30}" "${T_OPS:=75}" "${T_ERRORS:=25}"
  : "${T_MODELS:=40}" "${T_OPBENCH:=25}" "${T_BENCH:=90}" "${T_TOTAL:=420}"
  : "${BENCH_ARGS:=--budget 60}"
fi
: "${T_BUILD:=240}"
T0=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
status=0
step() { echo; echo "=== [$(( $(date +%s) - T0 )) s] $*"; STEP_T=$(date +%s); }
# record NAME RESULT DETAIL: one summary line; RESULT ok | FAILED | skipped
record() {
  local line
  line="$(printf '%-16s %-8s %s [%d s]' "$1" "$2" "$3" $(( $(date +%s) - STEP_T )))"
  echo "$line" >> "$SUMMARY"
  echo "-> $line"
  [ "$2" = FAILED ] && status=1
  return 0
}
# the closing counts line of a pytest log ("12 passed, 3 skipped in 4.2s")
pytest_counts() { grep -E '[0-9]+ (passed|failed|skipped|error|deselected)' "$1" | tail -1 | sed 's/=//g; s/^ *//'; }
# pytest_step NAME TIMEOUT LOG ARGS...: run pytest, record its result (5 = nothing selected)
pytest_step() {
  local name="$1" t="$2" log="$3"; shift 3
  timeout "$t" "$PY" -X faulthandler -m pytest -q -p no:cacheprovider "$@" > "$log" 2>&1
  local rc=$?
  tail -15 "$log"
  local counts; counts="$(pytest_counts "$log")"
  case "$rc" in
    0) record "$name" ok "${counts:-no counts line}" ;;
    5) record "$name" ok "nothing selected" ;;
    124) record "$name" FAILED "timed out after $t s; ${counts:-no counts line}" ;;
    139|134) record "$name" FAILED "exit $rc (process crashed: $( [ "$rc" = 139 ] && echo segfault || echo abort)); see $log" ;;
    *) record "$name" FAILED "exit $rc; ${counts:-no counts line}" ;;
  esac
}
elapsed() { echo $(( $(date +%s) - T0 )); }

step "device and versions (timeout $T_VERSIONS s)"
{ timeout "$T_VERSIONS" nvidia-smi -L 2>&1 || echo "nvidia-smi: not available"
  timeout "$T_VERSIONS" "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'git', torch.version.git_version, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
  "$PY" -c "import torchvision; print('torchvision', torchvision.__version__)" 2>/dev/null || echo "torchvision: not installed"
  command -v nvcc > /dev/null && nvcc --version | tail -1
} 2>&1 | tee "$OUT/versions.txt"
HAVE_CUDA="$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)"
record versions ok "$(grep -m1 '^torch' "$OUT/versions.txt"); $(grep -m1 GPU "$OUT/versions.txt" || echo 'no GPU listed')"

SO=""
if [ -d "$PREBUILT_DIR" ]; then SO="$("$PY" benchmarks/prebuilt_info.py so "$PREBUILT_DIR")"; [ -f "$SO" ] || SO=""; fi
if [ "$T_PROBE" -gt 0 ]; then
  step "probe: where an extension's exception dies (timeout $T_PROBE s)"
  timeout "$T_PROBE" "$PY" benchmarks/probe_check_abort.py ${SO:+--so "$SO"} --out "$OUT/probe.txt" \
    2>&1 | tee "$OUT/probe.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 0 ]; then record probe ok "every case exited 0$( [ -z "$SO" ] && echo ' (no prebuilt .so: inline cases only)')"
  elif [ "$rc" = 124 ]; then record probe FAILED "timed out after $T_PROBE s (cases done are in probe.log)"
  else record probe FAILED "$(grep -m1 -E 'SEGFAULT|ABORT|FAILED|TIMEOUT' "$OUT/probe.log" | tr -s ' ')"; fi
fi

build_here() {  # the fallback: compile the CUDA kernels on this machine
  step "build (FORCE_CUDA=1, sm 9.0, timeout $T_BUILD s): $1"
  timeout "$T_BUILD" env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="${MAX_JOBS:-16}" \
    "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
  local rc=$?
  if [ "$rc" = 0 ]; then
    tail -3 "$OUT/build.log"; record build ok "$1"
  else
    tail -30 "$OUT/build.log"
    record build FAILED "$1; $([ "$rc" = 124 ] && echo "timed out after $T_BUILD s" || echo "exit $rc"); see build.log"
  fi
}
import_check() {
  "$PY" -c "import tsgb_ext, tsgb_ext._C as c; i = tsgb_ext.backend_info(); print(i); print('tsgb_ext._C:', c.__file__); assert i['native_cuda'], 'no CUDA kernels'" \
    > "$OUT/backend_info.txt" 2>&1
}
if [ "$PREBUILT" = 1 ]; then
  step "install: the Python part only, the carried .so in place (timeout $T_INSTALL s)"
  "$PY" benchmarks/prebuilt_info.py check "$PREBUILT_DIR" 2>&1 | tee "$OUT/prebuilt_check.txt"
  if [ "${PIPESTATUS[0]}" = 0 ]; then
    if TSGB_NO_EXT=1 timeout "$T_INSTALL" "$PY" -m pip install --no-build-isolation --no-deps -e . \
        > "$OUT/install.log" 2>&1; then
      cp -f "$SO" "tsgb_ext/$(basename "$SO")"
      if import_check; then
        record install ok "prebuilt $(basename "$SO") ($(du -h "$SO" | cut -f1)), $(grep -m1 'torch' "$OUT/prebuilt_check.txt" | sed 's/.*built against //; s/;.*//')"
      else
        cat "$OUT/backend_info.txt"; record install FAILED "the prebuilt .so does not load here; building instead"
        build_here "fallback: the prebuilt .so did not load"
      fi
    else
      tail -20 "$OUT/install.log"; record install FAILED "pip install (TSGB_NO_EXT=1) failed; see install.log"
    fi
  else
    record install FAILED "$(tail -1 "$OUT/prebuilt_check.txt")"
    build_here "fallback: the prebuilt .so does not match"
  fi
else
  build_here "PREBUILT not set"
fi
import_check; cat "$OUT/backend_info.txt"

step "CUDA op tests, bad-input tests apart (timeout $T_OPS s)"
# *_errors / *bad_input tests run in a process of their own: on the torch 2.11 device image an
# exception raised inside an extension op has crashed the process (2026-11 H200 run).
# tests/test_op_*.py run every op test on each device present; here the CUDA half.
pytest_step op_tests "$T_OPS" "$OUT/pytest_cuda_ops.txt" tests/test_op_*.py \
  -k "cuda and not errors and not bad_input and not mismatched_devices"

if [ "$T_ERRORS" -gt 0 ]; then
  step "CUDA bad-input tests (timeout $T_ERRORS s)"
  pytest_step bad_input "$T_ERRORS" "$OUT/pytest_cuda_errors.txt" tests/test_op_*.py \
    -k "(cuda and (errors or bad_input)) or mismatched_devices"
fi

step "CUDA model tests: fusion, native ops, models vs hooks vs float64 (timeout $T_MODELS s)"
model_tests="tests/test_fusion.py tests/test_op_all.py"
"$PY" -c "import torchvision" 2>/dev/null && model_tests="$model_tests tests/test_models.py"
# shellcheck disable=SC2086
pytest_step model_tests "$T_MODELS" "$OUT/pytest_models_cuda.txt" $model_tests \
  -k "cuda and not errors and not bad_input and not mismatched_devices"

bench_step() {  # bench_step NAME TIMEOUT LOG TABLE CMD...: a table rewritten after each row
  local name="$1" t="$2" log="$3" table="$4"; shift 4
  if [ "$HAVE_CUDA" != 1 ]; then record "$name" skipped "no CUDA device"; return; fi
  timeout "$t" "$PY" "$@" > "$log" 2>&1
  local rc=$?; tail -3 "$log"
  local rows; rows="$(grep -c '^| ' "$table" 2>/dev/null || echo 0)"
  case "$rc" in
    0) record "$name" ok "$rows table lines in $(basename "$table")" ;;
    124) record "$name" ok "timed out after $t s; the $rows table lines done are kept" ;;
    *) record "$name" FAILED "exit $rc; see $(basename "$log")" ;;
  esac
}
if [ "$T_OPBENCH" -gt 0 ]; then
  step "per-op GPU benchmark: conv and BN rules vs torch's conv input gradient (timeout $T_OPBENCH s)"
  bench_step op_bench "$T_OPBENCH" "$OUT/bench_gpu_ops.log" "$OUT/gpu_ops.md" \
    benchmarks/bench.py --device cuda --bench ops --out "$OUT/gpu_ops.md"
fi

step "GPU benchmark (timeout $T_BENCH s; $BENCH_ARGS)"
# shellcheck disable=SC2086
bench_step bench "$T_BENCH" "$OUT/bench_gpu.log" "$OUT/gpu_results.md" \
  benchmarks/bench.py --device cuda --bench timing $BENCH_ARGS --out "$OUT/gpu_results.md"

# compute-sanitizer memcheck of every CUDA op, only with time left within T_TOTAL
step "compute-sanitizer memcheck of the CUDA ops"
NVCC_BIN="$(dirname "$(readlink -f "$(command -v nvcc 2>/dev/null || echo /usr/local/cuda/bin/nvcc)")")"
SAN=""
for cand in "$NVCC_BIN/compute-sanitizer" "$NVCC_BIN/../compute-sanitizer/compute-sanitizer" \
            "$(command -v compute-sanitizer 2>/dev/null)"; do
  if [ -n "$cand" ] && [ -x "$cand" ]; then SAN="$cand"; break; fi
done
t_san=$(( T_TOTAL - $(elapsed) )); [ "$t_san" -gt 60 ] && t_san=60
if [ "$QUICK" = 1 ]; then record memcheck skipped "QUICK=1"
elif [ "$HAVE_CUDA" != 1 ]; then record memcheck skipped "no CUDA device"
elif [ -z "$SAN" ]; then record memcheck skipped "no compute-sanitizer found"
elif [ "$t_san" -lt 20 ]; then record memcheck skipped "only ${t_san} s left of T_TOTAL=$T_TOTAL"
else
  echo "timeout $t_san s, $SAN"
  timeout "$t_san" "$SAN" --tool memcheck --error-exitcode 9 "$PY" benchmarks/bench.py --device cuda --bench memcheck \
    > "$OUT/memcheck.txt" 2>&1
  rc=$?; tail -4 "$OUT/memcheck.txt"
  if grep -qiE 'Device not supported|error 999|unsupported device' "$OUT/memcheck.txt"; then
    # gVisor-style sandboxes: the sanitizer cannot attach to the device at all
    record memcheck skipped "compute-sanitizer: device not supported here (error 999; a sandboxed GPU)"
  elif [ "$rc" = 0 ]; then record memcheck ok "no errors"
  elif [ "$rc" = 124 ]; then record memcheck ok "timed out after $t_san s with no error reported so far"
  elif [ "$rc" = 9 ]; then record memcheck FAILED "memory errors found; see memcheck.txt"
  else record memcheck FAILED "exit $rc; see memcheck.txt"; fi
fi

step "results"
cat "$OUT/gpu_ops.md" 2>/dev/null || echo "no per-op table written"
echo
cat "$OUT/gpu_results.md" 2>/dev/null || echo "no benchmark table written"
echo
echo "=== summary ($(elapsed) s; QUICK=$QUICK PREBUILT=$PREBUILT, CUDA device: $([ "$HAVE_CUDA" = 1 ] && echo yes || echo no)), also in $SUMMARY"
cat "$SUMMARY"
echo "status $status"
exit $status
