// CPU driver of the policy-gradient losses (math in pyalign/rl.h): segments across OpenMP threads
// for phases A and B, each segment by one thread; the batch totals and the final reduction run in
// segment order on one thread. Deterministic whatever the thread count.
//
// Token-level configurations (the common case: no sequence-level ratio, no per-token rollout
// correction, not VESPO) run phases A and B in tiles of kTile tokens: each stage of the per-token math is
// its own loop over the tile with the loss type and the KL estimator fixed outside it, so the loops
// vectorize (ISA clones: PYALIGN_CPU_CLONES), and each sum is kept in kLanes fixed lanes (token j of
// a segment goes to lane j % kLanes) summed in lane order at the segment's end: the same bits
// whether or not a loop vectorized, on every ISA. Other configurations run the scalar per-token
// functions in token order. The token loops read their inputs through TypedTokens<T, M> when every
// float input is one contiguous dtype T and the mask is absent, bool or T, else through AnyTokens.
#include "pyalign/cpu_dispatch.h"
#include "pyalign/rl.h"

#include <algorithm>
#include <type_traits>

namespace pyalign {
namespace {

// Tokens per thread below which a second thread costs more than it saves.
constexpr int64_t kTokenGrain = 4096;

// Phase A of one segment (the scalar functions; cheap next to phase B).
template <typename A, typename R> PYALIGN_HD void seg_phase_a(const PgArgs& a, int64_t s) {
  A* g = a.work.ptr<A>() + s * kSegSlots;
  for (int k = 0; k < kSegSlots; ++k) g[k] = A(0);
  const PgSeg<A> seg = segment<A>(a, s);
  for (int64_t i = seg.b; i < seg.e; ++i) phase_a_token<A, R>(a, i, g);
}

// What phase B of segment s starts from: its workspace row (the running min / max slots reset),
// the batch totals, the segment's constants and its tokens.
template <typename A> struct PhaseB {
  A* g;
  const A* tot;
  SegConst<A> c;
  PgSeg<A> seg;
};
template <typename A> PYALIGN_HD PhaseB<A> phase_b_begin(const PgArgs& a, int64_t s) {
  A* g = a.work.ptr<A>() + s * kSegSlots;
  const PhaseB<A> b{g, a.work.ptr<A>() + a.num_segs * kSegSlots, seg_const<A>(a, g), segment<A>(a, s)};
  g[G_ISMIN] = A(INFINITY);
  g[G_ISMAX] = -A(INFINITY);
  return b;
}

// Phase B of one segment, scalar, in token order.
template <typename A, typename R> PYALIGN_HD void seg_phase_b(const PgArgs& a, int64_t s) {
  const PhaseB<A> b = phase_b_begin<A>(a, s);
  A G = 0;
  for (int64_t i = b.seg.b; i < b.seg.e; ++i) G += phase_b_token<A, R>(a, i, s, b.c, b.tot, b.g);
  if (a.p.seq_level)
    for (int64_t i = b.seg.b; i < b.seg.e; ++i) phase_b_seq_grad<A, R>(a, i, b.c, G);
  phase_b_seg_metrics<A>(a, s, b.c, b.g);
}

// Whether phase B can run in tiles (token-level ratio, no per-token correction, not VESPO).
bool tiled(const PgParams& p) {
  return !p.seq_level && p.is_mode != int(IsMode::token_truncate) && p.is_mode != int(IsMode::token_mask) &&
         PgType(p.loss_type) != PgType::vespo;
}

// Phase A of one segment in tiles, for the tiled configurations: the token counts, OPSM's and the
// sequence correction's sums (phase_a_token's math; the log-ratio sum only sequence-level and VESPO
// configurations need is left 0).
template <typename A, typename R> PYALIGN_HD void seg_phase_a_tiled(const PgArgs& a, int64_t s) {
  const PgParams& p = a.p;
  A* g = a.work.ptr<A>() + s * kSegSlots;
  for (int k = 0; k < kSegSlots; ++k) g[k] = A(0);
  const PgSeg<A> seg = segment<A>(a, s);
  const TensorArg& samp = a.samp.data ? a.samp : a.old;  // OPSM: the sampler's log-probs, else old
  const A thr = A(p.entropy_threshold);
  A lanes[4][kLanes] = {};
  A M[kTile], EF[kTile], OP[kTile], ID[kTile];
  for (int64_t b = seg.b; b < seg.e; b += kTile) {
    const int n = int(std::min<int64_t>(kTile, seg.e - b));
#pragma omp simd
    for (int j = 0; j < n; ++j) M[j] = R::template m<A>(a.mask, b + j);
    if (p.has_entropy_mask) {
#pragma omp simd
      for (int j = 0; j < n; ++j)
        EF[j] = (M[j] != A(0)) & (R::template f<A>(a.ent, b + j) * M[j] >= thr) ? M[j] : A(0);
    }
    if (p.has_off_policy) {
#pragma omp simd
      for (int j = 0; j < n; ++j)
        OP[j] = M[j] != A(0) ? M[j] * nan_to_zero(R::template f<A>(samp, b + j) - R::template f<A>(a.logp, b + j)) : A(0);
      add_lanes(lanes[2], OP, n);
    }
    if (p.is_mode != int(IsMode::none)) {
#pragma omp simd
      for (int j = 0; j < n; ++j)
        ID[j] = M[j] != A(0) ? nan_to_zero((R::template f<A>(a.old, b + j) - R::template f<A>(a.samp, b + j)) * M[j])
                             : A(0);
      add_lanes(lanes[3], ID, n);
    }
    add_lanes(lanes[0], M, n);
    if (p.has_entropy_mask) add_lanes(lanes[1], EF, n);
  }
  g[G_CNT] = lane_total(lanes[0]);
  g[G_EFF] = p.has_entropy_mask ? lane_total(lanes[1]) : g[G_CNT];  // without the mask EF is M
  g[G_OPSM] = lane_total(lanes[2]);
  g[G_ISDIFF] = lane_total(lanes[3]);
}

// Per-segment sums of phase B, in lanes.
enum TileSum : int { S_LOSS = 0, S_KL, S_ENT, S_BONUS, S_LOW, S_HIGH, S_CISPO, kTileSums };
constexpr int kTileSlot[kTileSums] = {G_LOSS, G_KL, G_ENT, G_ENTBONUS, G_LOW, G_HIGH, G_CISPO};

// Phase B of one segment in tiles: phase_b_token's math, stage by stage.
template <typename A, typename R> PYALIGN_HD void seg_phase_b_tiled(const PgArgs& a, int64_t s) {
  const PgParams& p = a.p;
  const PhaseB<A> pb = phase_b_begin<A>(a, s);
  A* g = pb.g;
  const A* tot = pb.tot;
  const SegConst<A>& c = pb.c;
  const PgSeg<A>& seg = pb.seg;
  const A wf = token_weight<A>(a, c, tot, A(1));  // token_weight is m times this
  const A adv_seg = p.adv_per_token ? A(0) : load<A>(a.adv, s);
  const A beta = A(p.beta), ecoef = A(p.entropy_coef), thr = A(p.entropy_threshold);
  const A teff = tot[T_EFF] > A(1) ? tot[T_EFF] : A(1);
  const bool has_ent = a.ent.data != nullptr, grad_ent = a.grad_ent.data != nullptr;
  A* gl = a.grad_logp.ptr<A>();
  A* ge = grad_ent ? a.grad_ent.ptr<A>() : nullptr;
  const PgType type = PgType(p.loss_type);
  A lanes[kTileSums][kLanes] = {};
  A M[kTile], LP[kTile], ADV[kTile], CO[kTile], IN[kTile], L[kTile], DC[kTile], DL[kTile], KL[kTile], DK[kTile];
  A FL[kTile], FH[kTile], FC[kTile], E[kTile], LO[kTile], KC[kTile], EC[kTile], BC[kTile];
  A* const C[kTileSums] = {LO, KC, EC, BC, FL, FH, FC};  // the summed contributions, in TileSum order
  const bool bias = p.bias_correction_kl, bonus = ecoef != A(0);
  // The sums this configuration can make nonzero (the others would add exact zeros: skipped).
  const bool clipped = type != PgType::cispo && type != PgType::sapo;
  const bool summed[kTileSums] = {true, p.has_ref, has_ent, has_ent && bonus, clipped, clipped, type == PgType::cispo};
  if (!p.adv_per_token)  // the segment's advantage, filled once
    for (int j = 0; j < kTile; ++j) ADV[j] = adv_seg;
  for (int64_t b = seg.b; b < seg.e; b += kTile) {
    const int n = int(std::min<int64_t>(kTile, seg.e - b));
    // Loop-invariant choices stay outside the loops (a branch inside one stops it vectorizing).
#pragma omp simd
    for (int j = 0; j < n; ++j) {  // inputs and the ratio
      const int64_t i = b + j;
      M[j] = R::template m<A>(a.mask, i);
      LP[j] = R::template f<A>(a.logp, i);
      bool inside;
      const A lr = clamp_ratio(LP[j] - R::template f<A>(a.old, i), inside);
      CO[j] = fast_exp_bounded(lr);
      IN[j] = inside ? A(1) : A(0);
    }
    if (p.adv_per_token) {
#pragma omp simd
      for (int j = 0; j < n; ++j) ADV[j] = R::template f<A>(a.adv, b + j);
    }
    if (has_ent) {
#pragma omp simd
      for (int j = 0; j < n; ++j) E[j] = R::template f<A>(a.ent, b + j);
    }
    switch (type) {  // the loss type's core
      case PgType::cispo:
#pragma omp simd
        for (int j = 0; j < n; ++j) {
          const CoreOut<A> o = cispo_core<A>(p, CO[j], ADV[j], LP[j]);
          L[j] = o.loss; DC[j] = o.dcoef; DL[j] = o.dlogp; FL[j] = A(0); FH[j] = A(0); FC[j] = o.cispo;
        }
        break;
      case PgType::sapo:
#pragma omp simd
        for (int j = 0; j < n; ++j) {
          const CoreOut<A> o = sapo_core<A>(p, CO[j], ADV[j]);
          L[j] = o.loss; DC[j] = o.dcoef; DL[j] = o.dlogp; FL[j] = A(0); FH[j] = A(0); FC[j] = A(0);
        }
        break;
      default:
#pragma omp simd
        for (int j = 0; j < n; ++j) {
          const CoreOut<A> o = clipped_core<A>(p, CO[j], ADV[j]);
          L[j] = o.loss; DC[j] = o.dcoef; DL[j] = o.dlogp;
          FL[j] = o.low; FH[j] = o.high; FC[j] = A(0);
        }
    }
    if (p.has_ref) {  // the KL estimate, estimator fixed per loop
#define PYALIGN_KL_LOOP(E)                                                          \
  _Pragma("omp simd") for (int j = 0; j < n; ++j) KL[j] =                           \
      kl_of<E>(LP[j] - R::template f<A>(a.ref, b + j), DK[j]);                      \
  break;
      switch (KlEstimator(p.kl)) {
        case KlEstimator::k1: PYALIGN_KL_LOOP(KlEstimator::k1)
        case KlEstimator::k1_st: PYALIGN_KL_LOOP(KlEstimator::k1_st)
        case KlEstimator::k2: PYALIGN_KL_LOOP(KlEstimator::k2)
        case KlEstimator::abs: PYALIGN_KL_LOOP(KlEstimator::abs)
        case KlEstimator::k3_st: PYALIGN_KL_LOOP(KlEstimator::k3_st)
        default: PYALIGN_KL_LOOP(KlEstimator::k3)
      }
#undef PYALIGN_KL_LOOP
    } else {
      for (int j = 0; j < n; ++j) { KL[j] = A(0); DK[j] = A(0); }
    }
    // masks, correction, KL, weights: the token's contributions (0/1 masks as numbers: selects),
    // and the gradients straight to the outputs. Without an entropy input its terms are left out.
    const A emask = p.has_entropy_mask ? A(1) : A(0), lowkl = c.lowkl_keep, isr = c.isr;
    const A bias_f = bias ? A(1) : A(0), bonus_f = bonus ? A(1) : A(0);
    auto contributions = [&](auto entropy) __attribute__((always_inline)) {
      constexpr int Ent = decltype(entropy)::value;  // 0: no entropy, 1: entropy, 2: and its gradient
#pragma omp simd
      for (int j = 0; j < n; ++j) {
        const A m = M[j];
        const A keep = m != A(0) ? A(1) : A(0);  // masked tokens contribute exact zeros, whatever they hold
        A ekeep = A(1);
        if constexpr (Ent > 0) {
          const A ek = (E[j] * m >= thr ? A(1) : A(0)) * keep;
          ekeep = emask * ek + (A(1) - emask);
        }
        const A scale = (ADV[j] >= A(0) ? A(1) : lowkl) * ekeep * isr;
        const CoreOut<A> o{L[j], DC[j], DL[j], A(0), A(0), A(0)};
        const TokenTerms<A> t = token_terms<A>(o, scale, beta, KL[j], DK[j], CO[j], bias_f);
        const A w = m * wf;
        LO[j] = keep != A(0) ? w * t.loss : A(0);
        KC[j] = keep != A(0) ? m * t.kl : A(0);
        FL[j] = FL[j] * keep * m;
        FH[j] = FH[j] * keep * m;
        FC[j] = FC[j] * keep * m;
        gl[b + j] = keep != A(0) ? w * (t.dlogp + t.dcoef * CO[j] * IN[j]) : A(0);
        if constexpr (Ent > 0) {
          const A em = ekeep * m;
          EC[j] = keep != A(0) ? m * E[j] : A(0);
          BC[j] = keep * bonus_f != A(0) ? em * E[j] / teff : A(0);
          if constexpr (Ent == 2) ge[b + j] = keep * bonus_f != A(0) ? -ecoef * em / teff : A(0);
        }
      }
    };
    if (grad_ent) contributions(std::integral_constant<int, 2>{});
    else if (has_ent) contributions(std::integral_constant<int, 1>{});
    else contributions(std::integral_constant<int, 0>{});
    for (int k = 0; k < kTileSums; ++k)
      if (summed[k]) add_lanes(lanes[k], C[k], n);
  }
  for (int k = 0; k < kTileSums; ++k) g[kTileSlot[k]] += lane_total(lanes[k]);
  phase_b_seg_metrics<A>(a, s, c, g);
}

PYALIGN_CPU_CLONES(phase_a_segments, seg_phase_a, PgArgs, typename A COMMA typename R, A COMMA R)
PYALIGN_CPU_CLONES(phase_a_tiles, seg_phase_a_tiled, PgArgs, typename A COMMA typename R, A COMMA R)
PYALIGN_CPU_CLONES(phase_b_segments, seg_phase_b, PgArgs, typename A COMMA typename R, A COMMA R)
PYALIGN_CPU_CLONES(phase_b_tiles, seg_phase_b_tiled, PgArgs, typename A COMMA typename R, A COMMA R)

template <typename A, typename R> void run(const PgArgs& a) {
  const int64_t S = a.num_segs;
  const int64_t n = a.logp.shape[0];
  const int64_t grain = n > 0 ? std::max<int64_t>(1, (kTokenGrain * S + n - 1) / n) : S + 1;  // segments per thread
  A* work = a.work.ptr<A>();
  const bool tiles = tiled(a.p);
  parallel_rows(S, grain, [&](int64_t s0, int64_t s1) {
    if (tiles) phase_a_tiles<A, R>(a, s0, s1);
    else phase_a_segments<A, R>(a, s0, s1);
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
  parallel_rows(S, grain, [&](int64_t s0, int64_t s1) {
    if (tiles) phase_b_tiles<A, R>(a, s0, s1);
    else phase_b_segments<A, R>(a, s0, s1);
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
    case DType::f64: return run_typed<double, double>(a);
    case DType::f32: return run_typed<float, float>(a);
    case DType::bf16: return run_typed<float, bf16_t>(a);
    default: return run<float, AnyTokens>(a);
  }
}

}  // namespace pyalign
