// CPU driver of the policy-gradient losses (math in pyalign/rl.h): segments across OpenMP threads
// for phases A and B, each segment by one thread in token order; the batch totals and the final
// reduction run in segment order on one thread. Deterministic whatever the thread count.
//
// The token loops read their inputs through TypedTokens<T, M> when every float input is one
// contiguous dtype T and the mask is absent, bool or T (the common case: no per-element dtype
// switch), through AnyTokens otherwise; both read the same values.
#include "pyalign/cpu_dispatch.h"
#include "pyalign/rl.h"

#include <algorithm>

namespace pyalign {
namespace {

// Tokens per thread below which a second thread costs more than it saves.
constexpr int64_t kTokenGrain = 4096;

template <typename A, typename R> void run(const PgArgs& a) {
  const int64_t S = a.num_segs;
  const int64_t n = a.logp.shape[0];
  const int64_t grain = n > 0 ? std::max<int64_t>(1, (kTokenGrain * S + n - 1) / n) : S + 1;  // segments per thread
  A* work = a.work.ptr<A>();
  parallel_rows(S, grain, [&](int64_t s0, int64_t s1) {  // phase A
    for (int64_t s = s0; s < s1; ++s) {
      A* g = work + s * kSegSlots;
      for (int k = 0; k < kSegSlots; ++k) g[k] = A(0);
      const PgSeg<A> seg = segment<A>(a, s);
      for (int64_t i = seg.b; i < seg.e; ++i) phase_a_token<A, R>(a, i, g);
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
  parallel_rows(S, grain, [&](int64_t s0, int64_t s1) {  // phase B
    for (int64_t s = s0; s < s1; ++s) {
      A* g = work + s * kSegSlots;
      const SegConst<A> c = seg_const<A>(a, g);
      g[G_ISMIN] = A(INFINITY);
      g[G_ISMAX] = -A(INFINITY);
      const PgSeg<A> seg = segment<A>(a, s);
      A G = 0;
      for (int64_t i = seg.b; i < seg.e; ++i) G += phase_b_token<A, R>(a, i, s, c, tot, g);
      if (a.p.seq_level)
        for (int64_t i = seg.b; i < seg.e; ++i) phase_b_seq_grad<A, R>(a, i, c, G);
      phase_b_seg_metrics<A>(a, s, c, g);
    }
  });
  pg_finalize<A>(a, work, S);
}

// Whether t is absent or a contiguous [N] tensor of dtype d.
bool typed_as(const TensorArg& t, DType d) {
  return !t.present() || (t.dtype == d && (t.shape[0] <= 1 || t.strides[0] == 1));
}

template <typename A, typename T> void run_typed(const PgArgs& a) {
  const DType d = a.logp.dtype;
  const bool floats = typed_as(a.logp, d) && typed_as(a.old, d) && typed_as(a.ref, d) && typed_as(a.samp, d) &&
                      typed_as(a.ent, d) && (!a.p.adv_per_token || typed_as(a.adv, d));
  if (floats && !a.mask.present()) return run<A, TypedTokens<T, void>>(a);
  if (floats && typed_as(a.mask, DType::b8)) return run<A, TypedTokens<T, bool>>(a);
  if (floats && typed_as(a.mask, d)) return run<A, TypedTokens<T, T>>(a);
  run<A, AnyTokens>(a);
}

}  // namespace

void policy_loss_cpu(const PgArgs& a) {
  switch (a.logp.dtype) {
    case DType::f64: return run<double, AnyTokens>(a);
    case DType::f32: return run_typed<float, float>(a);
    case DType::bf16: return run_typed<float, bf16_t>(a);
    default: return run<float, AnyTokens>(a);
  }
}

}  // namespace pyalign
