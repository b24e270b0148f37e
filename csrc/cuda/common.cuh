// CUDA helpers shared by the kernel families: storage types, error checks, block reductions.
#pragma once
#include <cuda_runtime.h>
#include <string>
#include "pyalign/tensor.h"

namespace pyalign {

inline void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": CUDA error: " + cudaGetErrorString(e));
}

// Sets the device of the given tensor for the duration of a launch.
struct DeviceGuard {
  int prev = -1;
  explicit DeviceGuard(int dev) {
    cuda_check(cudaGetDevice(&prev), "cudaGetDevice");
    if (prev != dev) cuda_check(cudaSetDevice(dev), "cudaSetDevice");
  }
  ~DeviceGuard() { if (prev >= 0) cudaSetDevice(prev); }
};

__device__ __forceinline__ float shfl_xor(float v, int o) { return __shfl_xor_sync(0xffffffffu, v, o); }
__device__ __forceinline__ double shfl_xor(double v, int o) { return __shfl_xor_sync(0xffffffffu, v, o); }

// Deterministic block-wide reduction of a mergeable value: warp butterfly then one warp over
// the per-warp partials; the combination order is fixed, so results are bitwise reproducible.
template <typename V, typename Merge>
__device__ V block_reduce(V v, Merge merge, V* smem /* [32] */) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  for (int o = 16; o > 0; o >>= 1) v = merge(v, shfl_xor(v, o));
  __syncthreads();  // smem may be reused across calls
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < nwarps ? smem[lane] : V{};
    for (int o = 16; o > 0; o >>= 1) v = merge(v, shfl_xor(v, o));
    if (lane == 0) smem[0] = v;
  }
  __syncthreads();
  return smem[0];
}


}  // namespace pyalign
