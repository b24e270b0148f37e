// CUDA driver of the preference losses (math in pyalign/losses.h). A batch holds one value per
// sequence (tens to thousands), so one block does the whole call: threads stride over the
// elements, the three phases are separated by __syncthreads, and every sum is a fixed-order
// block reduction, so results are bitwise reproducible. The aot ranks are counted (O(N^2 / T)
// comparisons), which gives the same permutation as the CPU's sort under the same total order.
#include "pyalign/losses.h"
#include "common.cuh"

namespace pyalign {
namespace {

constexpr int kThreads = 256;

// The threads of a one-block launch over n elements: whole warps, at most kThreads.
int block_threads(int64_t n) { return int(std::max<int64_t>(32, std::min<int64_t>(kThreads, (n + 31) / 32 * 32))); }

template <typename A> __global__ void loss_kernel(LossArgs s) {
  __shared__ A smem[32];
  const int64_t n = s.a.shape[0];
  const int tid = threadIdx.x;
  auto add = [](A x, A y) { return x + y; };

  // Phase 0: pre-pass sum and aot ranks.
  A pre = 0;
  const int64_t m = prepass_count<A>(s);
  for (int64_t i = tid; i < m; i += blockDim.x) pre += prepass_term<A>(s, i);
  pre = block_reduce(pre, add, smem);
  const A shift = prepass_shift<A>(s, pre);
  const int count = aot_count(s.p);
  for (int k = 0; k < count; ++k) {
    const int which = aot_which(s.p, k);
    int32_t* base = s.work.ptr<int32_t>() + int64_t(k) * 4 * n;
    for (int seq = 0; seq < 2; ++seq) {
      int32_t* rank = base + (seq == 0 ? 0 : 2 * n);
      int32_t* inv = rank + n;
      for (int64_t i = tid; i < n; i += blockDim.x) {
        const A v = seq == 0 ? aot_x<A>(s, which, i) : aot_y<A>(s, which, i);
        int64_t r = 0;
        for (int64_t j = 0; j < n; ++j) {
          const A u = seq == 0 ? aot_x<A>(s, which, j) : aot_y<A>(s, which, j);
          r += sort_less(u, j, v, i);
        }
        rank[i] = int32_t(r);
        inv[r] = int32_t(i);
      }
    }
  }
  __syncthreads();  // ranks (global memory) visible to the whole block

  // Phase 1: per element.
  A sums[kSums];
  for (int k = 0; k < kSums; ++k) sums[k] = A(0);
  const A scale = reduction_scale<A>(s);
  for (int64_t i = tid; i < n; i += blockDim.x) process_element<A>(s, i, shift, scale, sums);

  // Phase 2: reduce and finalize.
  for (int k = 0; k < kSums; ++k) sums[k] = block_reduce(sums[k], add, smem);
  if (tid == 0) finalize<A>(s, sums, shift);
}

// KL-DRO in one block: the minimum, the terms (kept in loss) and their sum, then the gradient
// columns; each reduction in block_reduce's fixed order.
template <typename A> __global__ void kl_dro_kernel(KlDroArgs s) {
  __shared__ A smem[32];
  const int64_t n = s.loss.shape[0], rows = s.grads.shape[0];
  A* l = s.loss.ptr<A>();
  A* g = s.grads.ptr<A>();
  const A tau = A(s.tau);
  A m = l[0];
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) m = nan_min(m, l[i]);
  m = block_reduce(m, [](A x, A y) { return nan_min(x, y); }, smem, A(INFINITY));
  A sum = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    l[i] = kl_dro_term(l[i], m, tau);
    sum += l[i];
  }
  sum = block_sum(sum, smem);
  const A inv_norm = kl_dro_inv_norm(sum, n);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const A w = kl_dro_weight(l[i], inv_norm);
    for (int64_t r = 0; r < rows; ++r) g[r * n + i] *= w;
  }
  if (threadIdx.x == 0) s.value.ptr<A>()[0] = kl_dro_value(m, sum, n, tau);
}

}  // namespace

void kl_dro_cuda(const KlDroArgs& s, void* stream) {
  const int64_t n = s.loss.shape[0];
  DeviceGuard g(s.loss.device);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int threads = block_threads(n);
  if (s.grads.dtype == DType::f64) launch("KL-DRO reduction", kl_dro_kernel<double>, 1, threads, 0, st, s);
  else launch("KL-DRO reduction", kl_dro_kernel<float>, 1, threads, 0, st, s);
}

void loss_forward_cuda(const LossArgs& s, void* stream) {
  const int64_t n = s.a.shape[0];
  require(n < (int64_t(1) << 31), "at most 2^31 - 1 elements are supported on CUDA");
  DeviceGuard g(s.a.device);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int threads = block_threads(n);
  if (s.grads.dtype == DType::f64) launch("preference loss", loss_kernel<double>, 1, threads, 0, st, s);
  else launch("preference loss", loss_kernel<float>, 1, threads, 0, st, s);
}

}  // namespace pyalign
