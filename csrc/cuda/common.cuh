// CUDA helpers shared by the kernel families: error checks, the device guard, warp shuffles and
// deterministic block reductions (of plain values and of online softmax statistics).
#pragma once
#include <cuda_runtime.h>
#include <string>
#include <tuple>
#include "pyalign/softmax.h"
#include "pyalign/tensor.h"

namespace pyalign {

inline void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": CUDA error: " + cudaGetErrorString(e));
}

// kernel<<<grid, block, smem, stream>>>(args...), through cudaLaunchKernel: it looks the kernel up on
// every call and returns an error for one it cannot find or start, where the <<<>>> form of CUDA 13
// launches through a handle cached at the first call and discards both results. Throws naming `what`.
template <typename... Params, typename... Args>
void launch(const char* what, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
            const Args&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "launch: one argument per kernel parameter");
  std::tuple<Params...> params(args...);  // converted to the parameter types, alive until the call returns
  std::apply([&](auto&... p) {
    void* ptrs[] = {static_cast<void*>(&p)...};
    cuda_check(cudaLaunchKernel(reinterpret_cast<const void*>(kernel), grid, block, ptrs, smem, stream), what);
  }, params);
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
template <typename A, bool SQ>
__device__ __forceinline__ SoftmaxStats<A, SQ> shfl_xor(SoftmaxStats<A, SQ> v, int o) {
  SoftmaxStats<A, SQ> r;
  r.m = shfl_xor(v.m, o); r.s = shfl_xor(v.s, o); r.d = shfl_xor(v.d, o);
  if (SQ) r.q = shfl_xor(v.q, o);  // without SQ, q is 0 in every thread
  return r;
}

// Deterministic block-wide reduction of a mergeable value: warp butterfly then one warp over
// the per-warp partials; the combination order is fixed, so results are bitwise reproducible.
// `identity` fills the lanes of the last warp beyond the block's warps (0 for a sum; +inf for a min).
template <typename V, typename Merge>
__device__ V block_reduce(V v, Merge merge, V* smem /* [32] */, V identity = V{}) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  for (int o = 16; o > 0; o >>= 1) v = merge(v, shfl_xor(v, o));
  __syncthreads();  // smem may be reused across calls
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < nwarps ? smem[lane] : identity;
    for (int o = 16; o > 0; o >>= 1) v = merge(v, shfl_xor(v, o));
    if (lane == 0) smem[0] = v;
  }
  __syncthreads();
  return smem[0];
}

// Block-wide sum, in block_reduce's fixed order.
template <typename A> __device__ A block_sum(A v, A* smem /* [32] */) {
  return block_reduce(v, [](A x, A y) { return x + y; }, smem);
}

// Block-wide merge of each thread's softmax statistics, in block_reduce's fixed order.
template <typename A, bool SQ>
__device__ __forceinline__ SoftmaxStats<A, SQ> block_merge(SoftmaxStats<A, SQ> st, SoftmaxStats<A, SQ>* smem /* [32] */) {
  return block_reduce(st, [](SoftmaxStats<A, SQ> x, const SoftmaxStats<A, SQ>& y) { x.merge(y); return x; }, smem);
}

}  // namespace pyalign
