#!/usr/bin/env bash
# GPU check: build pyalign for this GPU, run the CUDA tests (also under compute-sanitizer), and
# the bench suite; logs and JSON go to OUTDIR, a short summary table is printed last.
# Usage: bench/gpu_check.sh OUTDIR   (from the repository root, on a machine with an NVIDIA GPU)
set -uo pipefail
OUT="${1:?usage: bench/gpu_check.sh OUTDIR}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
summary=()
step() {  # step NAME TIMEOUT_S CMD...: runs CMD, logs to OUT/NAME.log, records pass/fail and time
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-22s rc=%-4s %5ss  %s' "$name" "$rc" "$((SECONDS - t0))" "$(tail -n 1 "$OUT/$name.log" | cut -c1-90)")")
  return $rc
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1 | tr -d '.')
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1)
echo "gpu: $gpu (sm_$cap)" | tee "$OUT/device.txt"

# Build for the local architecture only (fast); the device image provides the build tools.
export PYALIGN_CUDA=ON SKBUILD_CMAKE_DEFINE="CMAKE_CUDA_ARCHITECTURES=${cap}"
step build 400 pip install --no-build-isolation --no-deps -v . || { printf '%s\n' "${summary[@]}"; exit 1; }
python - > "$OUT/import.txt" 2>&1 <<'PY'
import pyalign, torch
print("pyalign", pyalign.__version__, "has_cuda", pyalign.has_cuda(), "cuda_available", pyalign.cuda_available(),
      "torch", torch.__version__, "device", torch.cuda.get_device_name())
PY

# CUDA tests: the same test functions as on CPU, parametrized over devices.
step tests_cuda 300 pytest -q -ra -k cuda --junitxml="$OUT/tests_cuda.xml" tests
step tests_all 300 pytest -q -ra -x --junitxml="$OUT/tests_all.xml" tests -m "not slow"
# Memory errors and races in the CUDA kernels (small inputs, so this stays quick).
if command -v compute-sanitizer > /dev/null; then
  step memcheck 240 compute-sanitizer --tool memcheck --error-exitcode 9 pytest -q -x -k cuda \
    -p no:cacheprovider tests/test_logprob.py
  step racecheck 240 compute-sanitizer --tool racecheck --error-exitcode 9 pytest -q -x -k "cuda and matches_reference" \
    -p no:cacheprovider tests/test_logprob.py
fi

# Benchmarks: quick set for every suite, the real sizes for the bandwidth-bound log-prob kernels.
step bench_quick 300 python -m pyalign.bench --device cuda --json "$OUT/bench_quick.json" --markdown "$OUT/bench_quick.md"
step bench_full_logprob 300 python -m pyalign.bench --device cuda --full --only logprob,linear \
  --json "$OUT/bench_full.json" --markdown "$OUT/bench_full.md" --plot "$OUT/bench_full.png"

echo
echo "== gpu_check summary: $gpu =="
printf '%s\n' "${summary[@]}"
[ -f "$OUT/bench_full.md" ] && cat "$OUT/bench_full.md"
