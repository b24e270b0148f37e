#!/usr/bin/env bash
# GPU check: build pyalign for this GPU, run one smoke test of each family's CUDA kernels (and, if
# one crashes the process, its host backtrace under cuda-gdb and a rerun with eager module loading),
# every family's CUDA tests, the full bench of the GEMM/bandwidth-bound families, compute-sanitizer
# memcheck, the quick bench of the other families, then racecheck; logs and JSON go to OUTDIR and a
# short summary table is printed last.
#
# Usage: bench/gpu_check.sh [--dry-run] OUTDIR     (from anywhere, on a machine with an NVIDIA GPU)
#   --dry-run: the same steps on the CPU (build, import, the test selections collected with the
#              device set to cpu, one suite of the quick bench), without the sanitizers and the full
#              bench, so that CI proves on every submission each step that needs no GPU.
# GPU_CHECK_BUDGET_S (default 540) bounds the whole run: steps run in the order above, each within
# what is left of the budget, and a step with no time left is listed as skipped. The bench writes its
# files after every suite, so a bench step stopped at its limit keeps the suites it finished. The
# script exits non-zero when a step failed.
set -uo pipefail
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT="${1:?usage: bench/gpu_check.sh [--dry-run] OUTDIR}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
budget=${GPU_CHECK_BUDGET_S:-540}
PY=$(command -v python || command -v python3)  # the device image names its interpreter python3
summary=()
failed=0
note() { summary+=("$(printf '%-22s %-8s %5ss  %s' "$1" "$2" 0 "$3")"); }
step() {  # step NAME TIMEOUT_S CMD...: runs CMD within the budget, logs to OUT/NAME.log, records rc and time
  local name=$1 limit=$2; shift 2
  local left=$((budget - SECONDS))
  if [ "$left" -lt 20 ]; then
    note "$name" skipped "no time left in the ${budget}s budget"
    return 99
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  [ "$rc" -ne 0 ] && failed=1
  summary+=("$(printf '%-22s rc=%-5s %5ss  %s' "$name" "$rc" "$((SECONDS - t0))" "$(tail -n 1 "$OUT/$name.log" | cut -c1-90)")")
  return $rc
}
finish() {
  echo
  echo "== gpu_check summary: $gpu =="
  printf '%s\n' "${summary[@]}"
  for f in bench_full bench_quick; do [ -f "$OUT/$f.json" ] && "$PY" -c "
import json, sys
from pyalign.bench.__main__ import summary
print(summary(json.load(open(sys.argv[1]))['rows']))" "$OUT/$f.json"; done
  exit $failed
}

if [ "$DRY" = 1 ]; then
  dev=cpu
  gpu="CPU dry run ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'))"
  export PYALIGN_CUDA=${PYALIGN_CUDA:-OFF}  # the CUDA sources compile in CI's main build already
  quick_limit=300  # the quick bench on a loaded 2-core CPU: 76-173 s seen
  # CI's main job ran the whole quick bench already: here one suite proves the step and its outputs
  bench_only=(--only losses)
else
  dev=cuda
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
  command -v nvcc > /dev/null || export PATH="$PATH:/usr/local/cuda/bin"
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1 | tr -d '.')
  gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1) (sm_$cap)"
  # Build for the local architecture only (fast); the device image provides the build tools.
  export PYALIGN_CUDA=ON SKBUILD_CMAKE_DEFINE="CMAKE_CUDA_ARCHITECTURES=${cap}"
  quick_limit=100
  # The full bench below covers the GEMM/bandwidth-bound families at their real sizes.
  bench_only=(--only losses,uncertainty,robust,plasticity)
fi
echo "device: $gpu; kernel $(uname -r)" | tee "$OUT/device.txt"
export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) PYTHONUNBUFFERED=1

step build 300 "$PY" -m pip install --no-build-isolation --no-deps -v . || finish
step import 60 "$PY" -c "
import pyalign, torch
print('pyalign', pyalign.__version__, 'from', pyalign.__file__, 'has_cuda', pyalign.has_cuda(),
      'cuda_available', pyalign.cuda_available(), 'cpu_isa', pyalign.cpu_isa(), 'torch', torch.__version__,
      'device', torch.cuda.get_device_name() if '$dev' == 'cuda' else 'cpu')
if '$dev' == 'cuda' and not pyalign.cuda_available():
    raise SystemExit('pyalign sees no CUDA device: the CUDA tests would all skip')
" || finish
cat "$OUT/import.log"

# Every family's tests parametrized over devices, on the checked device (the CPU half runs in CI).
FAMILIES="tests/test_logprob.py $(ls tests/test_linear_*.py | tr '\n' ' ')tests/test_losses.py tests/test_losses_robust.py tests/test_rl.py tests/test_rl_fused_linear.py tests/test_distill.py tests/test_distill_linear.py tests/test_distill_topk.py tests/test_distill_linear_topk.py tests/test_distill_inplace.py tests/test_uncertainty.py tests/test_uncertainty_robust.py tests/test_plasticity.py"
# The smoke tests: a few small CUDA tests of each family's kernels (the preference losses first: they ran).
SMOKE="tests/test_losses.py::test_dpo_each_type_matches_reference tests/test_losses_robust.py::test_dro_limits_and_extremes
  tests/test_logprob.py::test_gradients_match_reference tests/test_linear_logprobs.py::test_dtypes
  tests/test_rl.py::test_ppo_dual_clip_matches_reference tests/test_distill.py::test_kernel_on_each_device
  tests/test_uncertainty.py::test_aggregate_methods tests/test_plasticity.py::test_penalty_kernel_dtypes
  tests/test_plasticity.py::test_custom_op_and_direct_call_agree"
TESTS="$FAMILIES tests/test_ops.py tests/test_regressions.py tests/test_reliability.py tests/test_distributed.py"
# The sanitizer passes' selections (below), with few hypothesis examples so the slowed-down runs stay short.
memcheck_k="cuda and not (fused_matches_eager_formula or f_divergences or finite_at_extreme_margins or dpo_low_precision)"
racecheck_k="cuda and (matches_reference or gradients_match or large_batch or deterministic or token_grad or quantile or penalty_kernel or custom_op_and_direct or test_dtypes)"
if [ "$DRY" = 1 ]; then
  # The CPU half of these tests is CI's own test run: here each selection of this script (the device
  # tests and both sanitizer passes) is collected, which fails when it selects nothing (pytest exit 5).
  step "tests_$dev" 240 "$PY" -m pytest -q --collect-only -k "$dev" -p no:cacheprovider $TESTS
  step select_memcheck 120 "$PY" -m pytest -q --collect-only -k "$memcheck_k" -p no:cacheprovider $FAMILIES
  step select_racecheck 120 "$PY" -m pytest -q --collect-only -k "$racecheck_k" -p no:cacheprovider $FAMILIES
  step smoke 120 "$PY" -m pytest -q -p no:cacheprovider -k "$dev" $SMOKE
else
  # One process, no workers: a crash ends it, and the last test named (-v names each as it starts)
  # is the one that crashed; its host backtrace and an eager-loading rerun say where and why.
  step smoke 90 "$PY" -m pytest -v -p no:cacheprovider -k "$dev" $SMOKE
  rc=$?
  if [ "$rc" -ge 128 ] || grep -q "Fatal Python error" "$OUT/smoke.log"; then
    crashed=$(grep -o '^tests/[^ ]*' "$OUT/smoke.log" | tail -n 1)
    if command -v cuda-gdb > /dev/null; then
      step smoke_backtrace 150 cuda-gdb -q -batch -ex "set pagination off" -ex run -ex bt -ex "info registers rip" \
        --args "$PY" -m pytest -q -p no:cacheprovider "$crashed"
    fi
    CUDA_MODULE_LOADING=EAGER step smoke_eager 60 "$PY" -m pytest -q -p no:cacheprovider "$crashed"
  fi
  # Several workers share the GPU: the tests are small launches, and a worker that a faulting kernel
  # kills is replaced instead of ending the run (however many crash). -v names each outcome as it
  # comes, so a run stopped at its limit still says which tests failed.
  workers=(); "$PY" -c "import xdist" 2> /dev/null && workers=(-n 8 --max-worker-restart 100000)
  PYALIGN_HYPOTHESIS_EXAMPLES=20 step "tests_$dev" 180 "$PY" -m pytest -v -ra --tb=short "${workers[@]}" -k "$dev" \
    -p no:cacheprovider --junitxml="$OUT/tests_$dev.xml" $TESTS
  # The real sizes of the bandwidth/GEMM-bound kernels first.
  step bench_full 150 "$PY" -m pyalign.bench --device cuda --full --only logprob,linear,rl,distill --table \
    --json "$OUT/bench_full.json" --markdown "$OUT/bench_full.md" --plot "$OUT/bench_full.png"
  # Memory errors and races in every family's CUDA kernels (every .cu file uses shared memory), with
  # few hypothesis examples so the slowed-down runs stay short.
  if command -v compute-sanitizer > /dev/null; then
    PYALIGN_HYPOTHESIS_EXAMPLES=3 step memcheck 70 compute-sanitizer --tool memcheck --error-exitcode 9 \
      "$PY" -m pytest -v -x -k "$memcheck_k" -p no:cacheprovider $FAMILIES
  else
    note "memcheck/racecheck" skipped "compute-sanitizer is not on PATH"
  fi
fi
step bench_quick "$quick_limit" "$PY" -m pyalign.bench --device "$dev" "${bench_only[@]}" --table \
  --json "$OUT/bench_quick.json" --markdown "$OUT/bench_quick.md"
if [ "$DRY" = 1 ]; then
  note "memcheck/racecheck" skipped "dry run"
  note bench_full skipped "dry run"
elif command -v compute-sanitizer > /dev/null; then
  PYALIGN_HYPOTHESIS_EXAMPLES=3 step racecheck 120 compute-sanitizer --tool racecheck --error-exitcode 9 \
    "$PY" -m pytest -v -x -k "$racecheck_k" -p no:cacheprovider $FAMILIES
fi
finish
