#!/usr/bin/env bash
# The GPU checks of issue 11 in one time-boxed run: the `gpu` tests and the CUDA benchmarks.
#
#   OUT=DIR bash benchmarks/gpu_check.sh              # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --dry-run            # on a CPU: tiny sizes, every part must still pass
#
# Needs only python3 with torch, numpy, pillow, pytest (no network, no install, no watchdog: no
# test that imports daemon/ runs). Every part runs under `timeout` inside one budget
# (GPU_CHECK_BUDGET seconds, default 470: the whole run stays under 8 minutes), so one hang cannot
# eat the rest; what is left of the budget when a part starts caps its time box. Writes at most 8
# files under $OUT (a temporary folder if unset) and prints summary.txt at the end.
#
# Variables: PYTHON (default python3), PARTS (default "env pytest loop memory targets tiled"),
# GPU_CHECK_BUDGET, NST_TEST_TIME_LIMIT (per test, default 90 s), TILED_CHECK (see below).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-python3}
export PY
OUT=${OUT:-$(mktemp -d -t nst-gpu-check.XXXXXX)}
mkdir -p "$OUT"
BUDGET=${GPU_CHECK_BUDGET:-470}
PARTS=${PARTS:-env pytest loop memory targets tiled}
export PYTHONPATH=".:benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export NST_CACHE_DIR=${NST_CACHE_DIR:-$(mktemp -d -t nst-cache.XXXXXX)}
export NST_TEST_TIME_LIMIT=${NST_TEST_TIME_LIMIT:-90}

if [ -f ../shared/images/tubingen.jpg ] && [ -f ../shared/images/starry_night.jpg ]; then
  IMAGES=(--content ../shared/images/tubingen.jpg --style ../shared/images/starry_night.jpg)
else  # the package's own samples: the figures do not depend on the pictures (random weights)
  IMAGES=(--content nst_core/samples/chelsea.png --style nst_core/samples/gravel.png)
fi
if [ $DRY -eq 1 ]; then
  BENCH=(--device cpu "${IMAGES[@]}" --loop-size 48 --loop-steps 3 --loop-precisions fp32,bf16 --loop-big 64
         --fit-seconds 0)
else
  BENCH=(--device cuda "${IMAGES[@]}")
fi

SUMMARY=()
wanted() { [[ " $PARTS " == *" $1 "* ]]; }

# part NAME BOX_SECONDS LOGFILE COMMAND...: run COMMAND under timeout, appending to $OUT/LOGFILE.
part() {
  local name=$1 box=$2 log=$3 left start took rc status
  shift 3
  wanted "$name" || return 0
  left=$((BUDGET - SECONDS - 5))
  if [ "$left" -lt 10 ]; then
    SUMMARY+=("$name: SKIPPED (the ${BUDGET} s budget is spent)")
    return 0
  fi
  [ "$box" -gt "$left" ] && box=$left
  echo "=== $name (time box ${box} s): $*" | tee -a "$OUT/$log"
  start=$SECONDS
  timeout -k 10 "$box" "$@" >>"$OUT/$log" 2>&1
  rc=$?
  took=$((SECONDS - start))
  case $rc in
    0) status="ok" ;;
    124 | 137) status="TIMED OUT after ${box} s" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  SUMMARY+=("$name: $status in ${took} s ($log)")
  echo "=== $name: $status in ${took} s" | tee -a "$OUT/$log"
}

# 1. what we run on, and whether the new modules import at all
env_report() {
  date -u
  nvidia-smi 2>&1 | head -20 || echo "(no nvidia-smi)"
  "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, round(p.total_memory / 2**30, 1), "GiB, capability", f"{p.major}.{p.minor}")
import nst_core.lbfgs, nst_core.capture, nst_core.readback, nst_core.objective, nst_core.losses  # noqa
import bench_engine  # noqa
print("imports ok")
EOF
}
export -f env_report
part env 60 env.txt bash -c env_report

# 2. the gpu tests (they skip without CUDA); no daemon/ test: watchdog is not installed there
part pytest 150 pytest.txt "$PY" -m pytest -p pytest_time_limit -p no:cacheprovider -o faulthandler_timeout=100 \
  -m gpu -q -rs tests/test_engine_loop.py tests/test_capture.py tests/test_lbfgs.py tests/test_losses.py \
  tests/test_service.py

# 3. the engine's loop end to end (stylize): 512x500 in fp32/TF32/bf16 against NST_LBFGS=torch, ratio
#    to a bare forward+backward, host syncs per step
part loop 170 loop.txt "$PY" benchmarks/bench_engine.py "${BENCH[@]}" --sections loop --json-file "$OUT/bench_loop.json"

# 4. stylize's peak memory at 2048 and the largest square it runs untiled (time-boxed search)
if [ $DRY -eq 1 ]; then FIT=(); else FIT=(--fit-seconds 90); fi
part memory 150 memory.txt "$PY" benchmarks/bench_engine.py "${BENCH[@]}" "${FIT[@]}" --sections memory

# 5. the earlier targets (stylize, TF32): 512x500 with the default settings, 2048 with a full history
part targets 100 targets.txt "$PY" benchmarks/bench_engine.py "${BENCH[@]}" --sections targets

# 6. HOOK for the tiled objective's benchmark (issue 10): TILED_CHECK="command ..." runs that;
#    otherwise benchmarks/bench_tiled.py --quick, where it exists.
if [ -n "${TILED_CHECK:-}" ]; then
  part tiled 90 tiled.txt bash -c "$TILED_CHECK"
elif [ -f benchmarks/bench_tiled.py ]; then
  part tiled 90 tiled.txt "$PY" benchmarks/bench_tiled.py --quick "${BENCH[@]:0:2}"
else
  wanted tiled && SUMMARY+=("tiled: not run (no benchmarks/bench_tiled.py and no TILED_CHECK)")
fi

{
  echo "gpu_check summary ($( [ $DRY -eq 1 ] && echo "DRY RUN on the CPU" || echo GPU ), ${SECONDS} s of a ${BUDGET} s budget)"
  for line in "${SUMMARY[@]}"; do echo "  $line"; done
  echo
  [ -f "$OUT/env.txt" ] && grep -E "^(python|device|imports)" "$OUT/env.txt"
  [ -f "$OUT/pytest.txt" ] && grep -E "(passed|failed|error|skipped)" "$OUT/pytest.txt" | tail -3
  for f in loop memory targets tiled; do
    [ -f "$OUT/$f.txt" ] || continue
    echo
    echo "--- $f"
    sed -n '/^\[/,$p' "$OUT/$f.txt" | grep -v "^===" | head -40
  done
} >"$OUT/summary.txt"
cat "$OUT/summary.txt"
echo "(all output in $OUT)"
failed=0
for line in "${SUMMARY[@]}"; do [[ "$line" == *": ok "* || "$line" == *"not run"* ]] || failed=1; done
exit $failed
