// CPU driver of the policy-gradient losses (math in pyalign/rl.h): segments across OpenMP threads
// for phases A and B, each segment by one thread in token order; the batch totals and the final
// reduction run in segment order on one thread. Deterministic whatever the thread count.
#include "pyalign/cpu_dispatch.h"
#include "pyalign/rl.h"

namespace pyalign {
namespace {

template <typename A> void run(const PgArgs& a) {
  const int64_t S = a.seg.shape[0] - 1;
  A* work = a.work.ptr<A>();
  parallel_rows(S, 64, [&](int64_t s0, int64_t s1) {  // phase A
    for (int64_t s = s0; s < s1; ++s) {
      A* g = work + s * kSegSlots;
      for (int k = 0; k < kSegSlots; ++k) g[k] = A(0);
      const PgSeg<A> seg = segment<A>(a, s);
      for (int64_t i = seg.b; i < seg.e; ++i) phase_a_token<A>(a, i, g);
    }
  });
  A* tot = work + S * kSegSlots;  // phase T
  for (int k = 0; k < kSegSlots; ++k) tot[k] = A(0);
  for (int64_t s = 0; s < S; ++s) {
    const A* g = work + s * kSegSlots;
    tot[T_CNT] += g[G_CNT];
    tot[T_NONEMPTY] += g[G_CNT] > A(0) ? A(1) : A(0);
    tot[T_EFF] += g[G_EFF];
  }
  tot[T_SEGS] = A(S);
  parallel_rows(S, 64, [&](int64_t s0, int64_t s1) {  // phase B
    for (int64_t s = s0; s < s1; ++s) {
      A* g = work + s * kSegSlots;
      const SegConst<A> c = seg_const<A>(a, g);
      g[G_ISMIN] = A(INFINITY);
      g[G_ISMAX] = -A(INFINITY);
      const PgSeg<A> seg = segment<A>(a, s);
      A G = 0;
      for (int64_t i = seg.b; i < seg.e; ++i) G += phase_b_token<A>(a, i, s, c, tot, g);
      if (a.p.seq_level)
        for (int64_t i = seg.b; i < seg.e; ++i) phase_b_seq_grad<A>(a, i, c, G);
      phase_b_seg_metrics<A>(a, s, c, g);
    }
  });
  pg_finalize<A>(a, work, S);
}

}  // namespace

void policy_loss_cpu(const PgArgs& a) {
  if (a.grad_logp.dtype == DType::f64) run<double>(a);
  else run<float>(a);
}

}  // namespace pyalign
