// CUDA kernels of the plasticity family (math in pyalign/plasticity.h). Rule update: one block per
// weight row, coalesced strided loops; with a norm constraint a first pass computes the row norm
// (deterministic block reduction) and the second pass re-reads the row (from L2) and writes it.
// Penalty: one block per kPenaltyChunk elements, one partial sum per block.
#include "pyalign/plasticity.h"
#include "common.cuh"

namespace pyalign {
namespace {

constexpr int kThreads = 256;

template <typename T, bool HAS_G, bool HAS_E, bool HAS_G2>
__global__ void update_kernel(PlasticArgs a) {
  using A = typename acc_type<T>::type;
  __shared__ A smem[32];
  const PlasticCoeffs k = a.k;
  const int64_t i = blockIdx.x;
  const int64_t n = a.w.shape[1];
  T* w = a.w.ptr<T>() + i * a.w.strides[0];
  const A* g = HAS_G ? a.g.ptr<A>() + i * a.g.strides[0] : nullptr;
  A* e = HAS_E ? a.e.ptr<A>() + i * a.e.strides[0] : nullptr;
  const A* g2 = HAS_G2 ? a.g2.ptr<A>() + i * a.g2.strides[0] : nullptr;
  const A r = a.r.data ? a.r.ptr<A>()[i] : A(0);
  A scale = 1;
  if (k.norm_mode != 0) {
    A ss = 0;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      A en;
      A v = plastic_value<A>(k, A(to_float(w[j])), HAS_G ? g[j] : A(0), HAS_E ? e[j] : A(0), HAS_G2 ? g2[j] : A(0), r, &en);
      ss += v * v;
    }
    ss = block_sum(ss, smem);
    scale = norm_scale<A>(k.norm_mode, A(k.norm), ss);
  }
  const A lo = A(k.w_min), hi = A(k.w_max);
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    A en;
    A v = plastic_value<A>(k, A(to_float(w[j])), HAS_G ? g[j] : A(0), HAS_E ? e[j] : A(0), HAS_G2 ? g2[j] : A(0), r, &en);
    if (HAS_E) e[j] = en;
    w[j] = to_storage<T, A>(clip_value<A>(v * scale, lo, hi));
  }
}

template <typename T> void launch_update(const PlasticArgs& a, cudaStream_t s) {
  const dim3 grid(unsigned(a.w.shape[0]));
  const bool hg = a.g.data != nullptr, he = a.e.data != nullptr, hg2 = a.g2.data != nullptr;
  auto kernel = !hg ? update_kernel<T, false, false, false>  // the bindings refuse e or g2 without g
                : he ? (hg2 ? update_kernel<T, true, true, true> : update_kernel<T, true, true, false>)
                     : (hg2 ? update_kernel<T, true, false, true> : update_kernel<T, true, false, false>);
  launch("plastic_update", kernel, grid, kThreads, 0, s, a);
}

template <typename T, bool GRAD> __global__ void penalty_kernel(PenaltyArgs a, int64_t n) {
  using A = typename acc_type<T>::type;
  __shared__ A smem[32];
  const int64_t b = int64_t(blockIdx.x) * kPenaltyChunk;
  const int64_t e = b + kPenaltyChunk < n ? b + kPenaltyChunk : n;
  const T* p = a.p.ptr<T>();
  const T* anc = a.anchor.ptr<T>();
  const A* imp = a.imp.ptr<A>();
  T* grad = GRAD ? a.grad.ptr<T>() : nullptr;
  const A coef = A(a.coef);
  A s = 0;
  for (int64_t j = b + threadIdx.x; j < e; j += blockDim.x) {
    A gj;
    s += penalty_term<A>(A(to_float(p[j])), A(to_float(anc[j])), imp[j], coef, &gj);
    if (GRAD) grad[j] = to_storage<T, A>(A(to_float(grad[j])) + gj);
  }
  s = block_sum(s, smem);
  if (threadIdx.x == 0) a.partial.ptr<A>()[blockIdx.x] = s;
}

template <typename T> void launch_penalty(const PenaltyArgs& a, int64_t n, cudaStream_t s) {
  const dim3 grid(unsigned((n + kPenaltyChunk - 1) / kPenaltyChunk));
  launch("quad_penalty", a.grad.data ? penalty_kernel<T, true> : penalty_kernel<T, false>, grid, kThreads, 0, s, a, n);
}

}  // namespace

void plastic_update_cuda(const PlasticArgs& a, void* stream) {
  if (a.w.numel() == 0) return;
  require(a.w.shape[0] < (int64_t(1) << 31), "weight: at most 2^31 - 1 rows are supported on CUDA");
  DeviceGuard guard(a.w.device);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.w.dtype) {
    case DType::f32: launch_update<float>(a, s); break;
    case DType::bf16: launch_update<bf16_t>(a, s); break;
    case DType::f16: launch_update<f16_t>(a, s); break;
    case DType::f64: launch_update<double>(a, s); break;
    default: fail("weight: unsupported dtype");
  }
}

void quad_penalty_cuda(const PenaltyArgs& a, void* stream) {
  const int64_t n = a.p.numel();
  if (n == 0) return;
  DeviceGuard guard(a.p.device);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.p.dtype) {
    case DType::f32: launch_penalty<float>(a, n, s); break;
    case DType::bf16: launch_penalty<bf16_t>(a, n, s); break;
    case DType::f16: launch_penalty<f16_t>(a, n, s); break;
    case DType::f64: launch_penalty<double>(a, n, s); break;
    default: fail("param: unsupported dtype");
  }
}

}  // namespace pyalign
