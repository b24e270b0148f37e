// CUDA driver of the policy-gradient losses (math in pyalign/rl.h): one block per segment for
// phases A and B (threads stride over the segment's tokens; every sum is a fixed-order block
// reduction), one block for the batch totals and one thread for the final reduction over the
// segments, in segment order: bitwise reproducible.
#include "pyalign/rl.h"
#include "common.cuh"

namespace pyalign {
namespace {

constexpr int kThreads = 256;

template <typename A> __global__ void phase_a(PgArgs a) {
  __shared__ A smem[32];
  const int64_t s = blockIdx.x;
  const PgSeg<A> seg = segment<A>(a, s);
  A acc[kSegSlots];
  for (int k = 0; k < kSegSlots; ++k) acc[k] = A(0);
  for (int64_t i = seg.b + threadIdx.x; i < seg.e; i += blockDim.x) phase_a_token<A>(a, i, acc);
  A* g = a.work.ptr<A>() + s * kSegSlots;
  for (int k = G_CNT; k <= G_ISLOG; ++k) {
    const A v = block_sum(acc[k], smem);
    if (threadIdx.x == 0) g[k] = v;
  }
}

template <typename A> __global__ void phase_t(PgArgs a, int64_t S) {
  __shared__ A smem[32];
  const A* work = a.work.ptr<A>();
  A cnt = 0, nonempty = 0, eff = 0;
  for (int64_t s = threadIdx.x; s < S; s += blockDim.x) {
    const A* g = work + s * kSegSlots;
    cnt += g[G_CNT];
    nonempty += g[G_CNT] > A(0) ? A(1) : A(0);
    eff += g[G_EFF];
  }
  cnt = block_sum(cnt, smem);
  nonempty = block_sum(nonempty, smem);
  eff = block_sum(eff, smem);
  if (threadIdx.x == 0) {
    A* tot = a.work.ptr<A>() + S * kSegSlots;
    for (int k = 0; k < kSegSlots; ++k) tot[k] = A(0);
    tot[T_CNT] = cnt; tot[T_NONEMPTY] = nonempty; tot[T_EFF] = eff; tot[T_SEGS] = A(S);
  }
}

template <typename A> __global__ void phase_b(PgArgs a, int64_t S) {
  __shared__ A smem[32];
  const int64_t s = blockIdx.x;
  A* g = a.work.ptr<A>() + s * kSegSlots;
  const A* tot = a.work.ptr<A>() + S * kSegSlots;
  const SegConst<A> c = seg_const<A>(a, g);
  const PgSeg<A> seg = segment<A>(a, s);
  A acc[kSegSlots];
  for (int k = 0; k < kSegSlots; ++k) acc[k] = A(0);
  acc[G_ISMIN] = A(INFINITY);
  acc[G_ISMAX] = -A(INFINITY);
  A G = 0;
  for (int64_t i = seg.b + threadIdx.x; i < seg.e; i += blockDim.x) G += phase_b_token<A>(a, i, s, c, tot, acc);
  if (a.p.seq_level) {
    G = block_sum(G, smem);  // every thread needs it: block_sum returns it to all
    for (int64_t i = seg.b + threadIdx.x; i < seg.e; i += blockDim.x) phase_b_seq_grad<A>(a, i, c, G);
  }
  for (int k = G_LOSS; k < kSegSlots; ++k) {
    A v;
    if (k == G_ISMIN) v = block_reduce(acc[k], [](A x, A y) { return y < x ? y : x; }, smem, A(INFINITY));
    else if (k == G_ISMAX) v = block_reduce(acc[k], [](A x, A y) { return y > x ? y : x; }, smem, -A(INFINITY));
    else v = block_sum(acc[k], smem);
    if (threadIdx.x == 0) acc[k] = v;
  }
  if (threadIdx.x == 0) {
    for (int k = G_LOSS; k < kSegSlots; ++k) g[k] = acc[k];
    phase_b_seg_metrics<A>(a, s, c, g);
  }
}

template <typename A> __global__ void finalize_kernel(PgArgs a, int64_t S) {
  if (threadIdx.x == 0 && blockIdx.x == 0) pg_finalize<A>(a, a.work.ptr<A>(), S);
}

template <typename A> void launch_all(const PgArgs& a, cudaStream_t st) {
  const int64_t S = a.num_segs;
  if (S > 0) launch("policy loss (segments)", phase_a<A>, unsigned(S), kThreads, 0, st, a);
  launch("policy loss (totals)", phase_t<A>, 1, kThreads, 0, st, a, S);
  if (S > 0) launch("policy loss (gradients)", phase_b<A>, unsigned(S), kThreads, 0, st, a, S);
  launch("policy loss (reduction)", finalize_kernel<A>, 1, 1, 0, st, a, S);
}

}  // namespace

void policy_loss_cuda(const PgArgs& a, void* stream) {
  require(a.num_segs < (int64_t(1) << 31), "segments: at most 2^31 - 1 sequences are supported on CUDA");
  DeviceGuard guard(a.logp.device);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (a.grad_logp.dtype == DType::f64) launch_all<double>(a, st);
  else launch_all<float>(a, st);
}

}  // namespace pyalign
