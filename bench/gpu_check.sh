#!/usr/bin/env bash
# GPU check: build pyalign for this GPU, run every family's CUDA tests (also under
# compute-sanitizer memcheck and racecheck), then the bench suite; logs and JSON go to OUTDIR and a
# short summary table is printed last.
# Usage: bench/gpu_check.sh OUTDIR   (from the repository root, on a machine with an NVIDIA GPU)
# GPU_CHECK_BUDGET_S (default 540) bounds the whole run: steps run in priority order, each within
# what is left of the budget, and a step with no time left is listed as skipped.
set -uo pipefail
OUT="${1:?usage: bench/gpu_check.sh OUTDIR}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
budget=${GPU_CHECK_BUDGET_S:-540}
summary=()
step() {  # step NAME TIMEOUT_S CMD...: runs CMD within the budget, logs to OUT/NAME.log, records rc and time
  local name=$1 limit=$2; shift 2
  local left=$((budget - SECONDS))
  if [ "$left" -lt 20 ]; then
    summary+=("$(printf '%-22s %-8s %5ss  %s' "$name" "skipped" 0 "no time left in the ${budget}s budget")")
    return 99
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-22s rc=%-5s %5ss  %s' "$name" "$rc" "$((SECONDS - t0))" "$(tail -n 1 "$OUT/$name.log" | cut -c1-90)")")
  return $rc
}
finish() {
  echo
  echo "== gpu_check summary: $gpu =="
  printf '%s\n' "${summary[@]}"
  [ -f "$OUT/bench_full.md" ] && cat "$OUT/bench_full.md"
  [ -f "$OUT/bench_quick.md" ] && [ ! -f "$OUT/bench_full.md" ] && cat "$OUT/bench_quick.md"
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1 | tr -d '.')
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1)
echo "gpu: $gpu (sm_$cap)" | tee "$OUT/device.txt"

# Build for the local architecture only (fast); the device image provides the build tools.
export PYALIGN_CUDA=ON SKBUILD_CMAKE_DEFINE="CMAKE_CUDA_ARCHITECTURES=${cap}" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
step build 300 pip install --no-build-isolation --no-deps -v . || { finish; exit 1; }
python - > "$OUT/import.txt" 2>&1 <<'PY'
import pyalign, torch
print("pyalign", pyalign.__version__, "has_cuda", pyalign.has_cuda(), "cuda_available", pyalign.cuda_available(),
      "torch", torch.__version__, "device", torch.cuda.get_device_name())
PY
cat "$OUT/import.txt"

# Every family's tests parametrized over devices, on CUDA (the CPU half runs in CI).
FAMILIES="tests/test_logprob.py tests/test_linear.py tests/test_losses.py tests/test_uncertainty.py tests/test_plasticity.py"
step tests_cuda 180 pytest -q -ra -k cuda -p no:cacheprovider --junitxml="$OUT/tests_cuda.xml" $FAMILIES tests/test_reliability.py
# The bench suite on the GPU: quick set, then the real sizes of the bandwidth/GEMM-bound kernels.
step bench_quick 120 python -m pyalign.bench --device cuda --json "$OUT/bench_quick.json" --markdown "$OUT/bench_quick.md"
# Memory errors and races in every family's CUDA kernels (all four .cu files use shared memory),
# with few hypothesis examples so the slowed-down runs stay short.
if command -v compute-sanitizer > /dev/null; then
  export PYALIGN_HYPOTHESIS_EXAMPLES=3
  memcheck_k="cuda and not (fused_matches_eager_formula or f_divergences or finite_at_extreme_margins or dpo_low_precision)"
  racecheck_k="cuda and (matches_reference or gradients_match or large_batch or deterministic or token_grad or quantile or penalty_kernel or custom_op_and_direct or test_dtypes)"
  step memcheck 150 compute-sanitizer --tool memcheck --error-exitcode 9 pytest -q -x -k "$memcheck_k" \
    -p no:cacheprovider $FAMILIES
  step racecheck 120 compute-sanitizer --tool racecheck --error-exitcode 9 pytest -q -x -k "$racecheck_k" \
    -p no:cacheprovider $FAMILIES
  unset PYALIGN_HYPOTHESIS_EXAMPLES
else
  summary+=("$(printf '%-22s %-8s %5ss  %s' "memcheck/racecheck" "skipped" 0 "compute-sanitizer is not on PATH")")
fi
step bench_full 200 python -m pyalign.bench --device cuda --full --only logprob,linear \
  --json "$OUT/bench_full.json" --markdown "$OUT/bench_full.md" --plot "$OUT/bench_full.png"
finish
