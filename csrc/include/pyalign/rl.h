// Policy-gradient losses (PPO/GRPO family): the per-token math shared by the CPU (csrc/cpu/rl.cpp)
// and CUDA (csrc/cuda/rl.cu) kernels, and their interface. Formulas follow TRL 1.16's
// GRPOTrainer._compute_loss (loss types, clipping, KL, entropy bonus, masks, normalizations) and
// verl's core_algos (PPO's dual clip, KL estimators and their clamps, loss aggregation modes).
//
// Tokens are a flat array cut into segments (sequences): [B, T] rows or packed sequences with
// cu_seqlens. A call runs three phases:
//   A. per segment: token count, the sums that sequence-level quantities need (GSPO's mean
//      log-ratio, the off-policy mask's KL, the sequence importance ratio, VESPO's log weight),
//      the entropy-bonus token count;
//   T. batch totals of those counts (fixed order);
//   B. per segment: each token's loss, its gradient w.r.t. the log-prob (and, through sequence
//      quantities, the segment's other tokens) and the entropy, the segment's loss and metric sums;
//   then a fixed-order reduction of the segments' sums into the loss and the metrics.
// Every sum is formed in a fixed order: results do not depend on the thread count.
#pragma once
#include "pyalign/contract.h"
#include "pyalign/losses.h"  // load, load_or, sigmoid
#include "pyalign/tensor.h"

#include <type_traits>

namespace pyalign {

struct PgParams {
  int loss_type = 0, kl = 0, is_mode = 0, agg = 0;
  bool seq_level = false, bias_correction_kl = false, has_ref = false, has_entropy_mask = false;
  bool has_off_policy = false, adv_per_token = false;
  double eps_low = 0.2, eps_high = 0.2, delta = 0, dual_clip = 0, beta = 0, entropy_coef = 0;
  double entropy_threshold = 0, is_clip_min = 0, is_clip_max = 0, off_policy_threshold = 0;
  double horizon = 1, num_items = 1, sapo_pos = 1, sapo_neg = 1.05;
  double vk_pos = 2, vl_pos = 3, vk_neg = 3, vl_neg = 2;
};

// Per-segment slots of the workspace [S, kSegSlots] (accumulation dtype).
enum SegSlot : int {
  G_CNT = 0, G_LR, G_OPSM, G_ISDIFF, G_EFF, G_ISLOG,  // phase A
  G_LOSS, G_KL, G_ENT, G_LOW, G_HIGH, G_CISPO, G_ISR, G_ISMIN, G_ISMAX, G_PHI, G_ENTBONUS,  // phase B
  kSegSlots
};
// Batch totals of phase T, the workspace's last row.
enum TotalSlot : int { T_CNT = 0, T_SEGS, T_NONEMPTY, T_EFF, kTotalSlots };

// Inputs: flat [N] views (any float dtype and stride): logp (differentiated), old, ref, samp (the
// rollout engine's log-probs), ent (differentiated), mask (any numeric dtype; absent: all 1), adv
// ([N], or [S] per segment); seg: int64 [S + 1] segment offsets, or absent for S rows of row_len
// tokens each ([B, T] inputs). Outputs: loss [] and grad_logp [N] in the accumulation dtype,
// grad_ent [N] (absent without entropy), metrics [kPgMetrics], work [S + 1, kSegSlots].
struct PgArgs {
  TensorArg logp, old, ref, samp, ent, mask, adv, seg;
  TensorArg loss, grad_logp, grad_ent, metrics, work;
  PgParams p;
  int64_t num_segs = 0, row_len = 0;
};

void policy_loss_cpu(const PgArgs& a);
#ifdef PYALIGN_WITH_CUDA
void policy_loss_cuda(const PgArgs& a, void* stream);
#endif

// ------------------------------------------------------------------------------------------
// Token readers. AnyTokens reads each input by its dtype code and stride (any float dtype, any
// numeric mask); TypedTokens<T, M> reads contiguous float inputs of one type T and a mask of type M
// (void: no mask) without the per-element dtype switch, the fast path the CPU driver picks when the
// inputs allow it (csrc/cpu/rl.cpp). Both give the same values.
struct AnyTokens {
  template <typename A> static PYALIGN_HD A f(const TensorArg& t, int64_t i) { return load<A>(t, i); }
  template <typename A> static PYALIGN_HD A m(const TensorArg& t, int64_t i) { return load_or<A>(t, i, A(1)); }
};
template <typename T, typename M> struct TypedTokens {
  template <typename A> static PYALIGN_HD A f(const TensorArg& t, int64_t i) {
    return A(to_float(static_cast<const T*>(t.data)[i]));
  }
  template <typename A> static PYALIGN_HD A m(const TensorArg& t, int64_t i) {
    if constexpr (std::is_void_v<M>) return A(1);
    else if constexpr (std::is_same_v<M, bool>) return static_cast<const bool*>(t.data)[i] ? A(1) : A(0);
    else return A(to_float(static_cast<const M*>(t.data)[i]));
  }
};

// ------------------------------------------------------------------------------------------
// Per-token math

// x clamped to +-kPgLogRatioClamp (NaN stays NaN): an argument fast_exp_bounded takes.
static_assert(kPgLogRatioClamp <= 87.0, "fast_exp_bounded needs clamped log-ratios within [-87, 88]");
template <typename A> PYALIGN_HD A clamp_ratio(A x, bool& inside) {
  const A c = A(kPgLogRatioClamp);
  inside = (x >= -c) & (x <= c);
  return x < -c ? -c : (x > c ? c : x);
}
template <typename A> PYALIGN_HD A nan_to_zero(A x) { return x == x ? x : A(0); }

// A KL estimate of log(pi / pi_ref) from d = logp - ref, and its derivative w.r.t. logp: estimator E
// (kl_of, branch-free so that a loop over tokens vectorizes), or the estimator named at run time.
template <KlEstimator E, typename A> PYALIGN_HD A kl_of(A d, A& dd) {
  if constexpr (E == KlEstimator::k1) { dd = A(1); return d; }
  else if constexpr (E == KlEstimator::k1_st) { dd = d; return d; }
  else if constexpr (E == KlEstimator::k2) { dd = d; return A(0.5) * d * d; }
  else if constexpr (E == KlEstimator::abs) {
    dd = d > A(0) ? A(1) : (d < A(0) ? A(-1) : A(0));
    return d < A(0) ? -d : d;
  } else {  // k3 (and k3+): exp(kl) - kl - 1 with kl = ref - logp, verl's clamps
    bool inside;
    const A kl = clamp_ratio(-d, inside);
    const A e = fast_exp(kl);
    A v = e - kl - A(1);
    const A cap = A(kPgK3Clamp);
    const bool vin = v >= -cap && v <= cap;
    v = v > cap ? cap : (v < -cap ? -cap : v);
    dd = E == KlEstimator::k3_st ? d : ((inside && vin) ? -(e - A(1)) : A(0));
    return v;
  }
}
template <typename A> PYALIGN_HD A kl_value(int est, A d, A& dd) {
  switch (KlEstimator(est)) {
    case KlEstimator::k1: return kl_of<KlEstimator::k1>(d, dd);
    case KlEstimator::k1_st: return kl_of<KlEstimator::k1_st>(d, dd);
    case KlEstimator::k2: return kl_of<KlEstimator::k2>(d, dd);
    case KlEstimator::abs: return kl_of<KlEstimator::abs>(d, dd);
    case KlEstimator::k3_st: return kl_of<KlEstimator::k3_st>(d, dd);
    default: return kl_of<KlEstimator::k3>(d, dd);
  }
}

// The importance ratio of the rollout correction from its log, truncated or masked to [lo, hi].
template <typename A> PYALIGN_HD A is_ratio(int mode, A logr, A lo, A hi) {
  const A r = fast_exp(logr);
  if (IsMode(mode) == IsMode::token_truncate || IsMode(mode) == IsMode::sequence_truncate)
    return r < lo ? lo : (r > hi ? hi : r);
  return (r < lo || r > hi) ? A(0) : r;
}

// The loss-type core of one token, -f(coef, A), and its derivatives: d/dcoef (through the ratio)
// and d/dlogp directly (the CISPO / VESPO forms multiply logp by a detached weight).
template <typename A> struct CoreOut {
  A loss, dcoef, dlogp;
  A low, high, cispo;  // clip-ratio metric flags, 0 or 1 (numbers, so that loops over tokens vectorize)
};

// The three core families; pg_core picks one by loss type.
template <typename A> PYALIGN_HD CoreOut<A> cispo_core(const PgParams& p, A coef, A adv, A logp) {
  const A eh = A(p.eps_high);
  const A w = coef < eh ? coef : eh;  // detached
  return CoreOut<A>{-w * adv * logp, A(0), -w * adv, A(0), A(0), (coef > eh) & (adv > A(0)) ? A(1) : A(0)};
}
template <typename A> PYALIGN_HD CoreOut<A> sapo_core(const PgParams& p, A coef, A adv) {
  const A tau = adv > A(0) ? A(p.sapo_pos) : A(p.sapo_neg);
  const A s = fast_sigmoid(tau * (coef - A(1)));
  return CoreOut<A>{-s * A(4) / tau * adv, -A(4) * s * (A(1) - s) * adv, A(0), A(0), A(0), A(0)};
}
// grpo, bnpo, dr_grpo, dapo, luspo, ppo: the clipped surrogate -min(c1 A, clip(r) A), with
// c1 = min(r, delta) (two-sided clip) and, for ppo, the dual clip.
template <typename A> PYALIGN_HD CoreOut<A> clipped_core(const PgParams& p, A coef, A adv) {
  CoreOut<A> o{A(0), A(0), A(0), A(0), A(0), A(0)};
  const A el = A(p.eps_low), eh = A(p.eps_high);
  const bool in2 = (coef >= A(1) - el) & (coef <= A(1) + eh);  // & not &&: no branches, the loops vectorize
  const A c2 = coef < A(1) - el ? A(1) - el : (coef > A(1) + eh ? A(1) + eh : coef);
  const bool in1 = !((p.delta > 0) & (coef > A(p.delta)));
  const A c1 = in1 ? coef : A(p.delta);
  const A t1 = c1 * adv, t2 = c2 * adv;
  // -min(t1, t2); on a tie both branches carry half of the gradient (torch.min's rule)
  const A tie = -adv * A(0.5) * (A(in1 ? 1 : 0) + A(in2 ? 1 : 0));
  o.loss = t1 < t2 ? -t1 : (t2 < t1 ? -t2 : -t1);
  o.dcoef = t1 < t2 ? (in1 ? -adv : A(0)) : (t2 < t1 ? (in2 ? -adv : A(0)) : tie);
  // dual clip (Ye et al. 2019): a bound on -A r for A < 0
  const A t3 = -adv * A(p.dual_clip);
  const bool dual = (PgType(p.loss_type) == PgType::ppo) & (p.dual_clip > 0) & (adv < A(0)) & (t3 < o.loss);
  o.loss = dual ? t3 : o.loss;
  o.dcoef = dual ? A(0) : o.dcoef;
  o.low = (c1 < A(1) - el) & (adv < A(0)) ? A(1) : A(0);  // TRL: the flags see the delta-clamped ratio
  o.high = (c1 > A(1) + eh) & (adv > A(0)) ? A(1) : A(0);
  return o;
}

template <typename A> PYALIGN_HD CoreOut<A> pg_core(const PgParams& p, A coef, A adv, A logp, A phi) {
  switch (PgType(p.loss_type)) {
    case PgType::cispo: return cispo_core<A>(p, coef, adv, logp);
    case PgType::sapo: return sapo_core<A>(p, coef, adv);
    case PgType::vespo: return CoreOut<A>{-phi * adv * logp, A(0), -phi * adv, A(0), A(0), A(0)};
    default: return clipped_core<A>(p, coef, adv);
  }
}

// A token's terms from its loss-type core scaled by the masks and the rollout correction, plus beta
// times the KL estimate (TRL's order). With use_bias_correction_kl (bias 1, else 0: a number, so
// that loops vectorize) the KL term is coef * kl, differentiated through coef too.
template <typename A> struct TokenTerms {
  A loss, dcoef, dlogp, kl;
};
template <typename A> PYALIGN_HD TokenTerms<A> token_terms(const CoreOut<A>& o, A scale, A beta, A kl, A dk, A coef,
                                                        A bias) {
  const A r = bias * coef + (A(1) - bias);
  const A klr = kl * r;
  return TokenTerms<A>{o.loss * scale + beta * klr, o.dcoef * scale + bias * beta * kl, o.dlogp * scale + beta * dk * r,
                       klr};
}

// VESPO's detached gamma weight from the segment's log weight (TRL's get_gamma_weights).
template <typename A> PYALIGN_HD A vespo_phi(const PgParams& p, A log_w, A adv) {
  const bool pos = adv >= A(0);
  const A k = A(pos ? p.vk_pos : p.vk_neg);
  A lam = A(pos ? p.vl_pos : p.vl_neg);
  lam = lam < A(1e-4) ? A(1e-4) : lam;
  const A phi = std::exp(lam + k * log_w - lam * std::exp(log_w));
  return (phi == phi && phi < A(INFINITY)) ? phi : A(0);
}

// ------------------------------------------------------------------------------------------
// Segment phases (a segment [b, e) of the flat tokens; `tok(i)` iterates its tokens)

template <typename A> struct PgSeg {
  int64_t b, e;
};
template <typename A> PYALIGN_HD PgSeg<A> segment(const PgArgs& a, int64_t s) {
  if (!a.seg.data) return PgSeg<A>{s * a.row_len, (s + 1) * a.row_len};
  const int64_t* o = a.seg.ptr<int64_t>();
  return PgSeg<A>{o[s], o[s + 1]};
}
template <typename A, typename R = AnyTokens> PYALIGN_HD A mask_at(const PgArgs& a, int64_t i) {
  return R::template m<A>(a.mask, i);
}
template <typename A, typename R = AnyTokens> PYALIGN_HD A adv_at(const PgArgs& a, int64_t i, int64_t s) {
  return a.p.adv_per_token ? R::template f<A>(a.adv, i) : load<A>(a.adv, s);
}
template <typename A, typename R = AnyTokens> PYALIGN_HD bool entropy_kept(const PgArgs& a, int64_t i, A m) {
  if (!a.p.has_entropy_mask) return true;
  return m != A(0) && R::template f<A>(a.ent, i) * m >= A(a.p.entropy_threshold);
}

// Phase A contributions of token i (added to acc[G_CNT..G_ISLOG]).
template <typename A, typename R = AnyTokens> PYALIGN_HD void phase_a_token(const PgArgs& a, int64_t i, A* acc) {
  const PgParams& p = a.p;
  const A m = mask_at<A, R>(a, i);
  if (m == A(0)) return;
  acc[G_CNT] += m;
  const A lp = R::template f<A>(a.logp, i), old = R::template f<A>(a.old, i);
  bool inside;
  acc[G_LR] += m * clamp_ratio(lp - old, inside);
  if (p.has_off_policy) {
    const A samp = a.samp.data ? R::template f<A>(a.samp, i) : old;
    acc[G_OPSM] += m * nan_to_zero(samp - lp);
  }
  if (p.is_mode != int(IsMode::none)) {
    const A d = nan_to_zero((old - R::template f<A>(a.samp, i)) * m);
    acc[G_ISDIFF] += d;
    if (p.is_mode == int(IsMode::token_truncate) || p.is_mode == int(IsMode::token_mask)) {
      const A r = is_ratio<A>(p.is_mode, d, A(p.is_clip_min), A(p.is_clip_max));
      const A lo = A(-18.420680743952367);  // log(1e-8), TRL's clamp of VESPO's log weights
      const A lr = std::log(r);
      acc[G_ISLOG] += lr < lo ? lo : (lr > A(20) ? A(20) : lr);
    }
  }
  if (entropy_kept<A, R>(a, i, m)) acc[G_EFF] += m;
}

// Whether the clip-ratio flags are one per sequence (a sequence-level ratio with one advantage per
// sequence, as TRL's (B, 1) tensors) or one per token.
PYALIGN_HD bool seq_flags(const PgParams& p) { return p.seq_level && !p.adv_per_token; }

// Per-segment constants of phase B.
template <typename A> struct SegConst {
  A cnt, coef, isr, lowkl_keep, log_w;
  bool empty;
};
template <typename A> PYALIGN_HD SegConst<A> seg_const(const PgArgs& a, const A* g) {
  const PgParams& p = a.p;
  SegConst<A> c;
  c.cnt = g[G_CNT];
  c.empty = !(c.cnt > A(0));
  const A inv = A(1) / (c.cnt > A(1) ? c.cnt : A(1));
  c.coef = std::exp(g[G_LR] * inv);
  c.isr = A(1);
  if (p.is_mode == int(IsMode::sequence_truncate) || p.is_mode == int(IsMode::sequence_mask))
    c.isr = is_ratio<A>(p.is_mode, g[G_ISDIFF], A(p.is_clip_min), A(p.is_clip_max));
  c.lowkl_keep = p.has_off_policy && !(g[G_OPSM] * inv <= A(p.off_policy_threshold)) ? A(0) : A(1);
  A lw = g[G_LR];  // VESPO: sum of clamped log-ratios (not a mean) plus the log IS ratios
  if (p.is_mode == int(IsMode::sequence_truncate) || p.is_mode == int(IsMode::sequence_mask)) {
    const A lo = A(-18.420680743952367);
    const A l = std::log(c.isr);
    lw += l < lo ? lo : (l > A(20) ? A(20) : l);
  } else {
    lw += g[G_ISLOG];
  }
  const A lo = A(-18.420680743952367);
  c.log_w = lw < lo ? lo : (lw > A(20) ? A(20) : lw);
  return c;
}

// The normalization weight of a kept token of segment s: d loss / d per-token-loss.
template <typename A> PYALIGN_HD A token_weight(const PgArgs& a, const SegConst<A>& c, const A* tot, A m) {
  const PgParams& p = a.p;
  const A segs = tot[T_SEGS];
  const A cnt1 = c.cnt > A(1) ? c.cnt : A(1);
  const A tcnt1 = tot[T_CNT] > A(1) ? tot[T_CNT] : A(1);
  switch (PgAgg(p.agg)) {
    case PgAgg::token_mean: return m / tot[T_CNT];
    case PgAgg::token_sum: return m;
    case PgAgg::seq_mean_token_sum: return c.empty ? A(0) : m / tot[T_NONEMPTY];
    case PgAgg::seq_mean_token_sum_norm: return c.empty ? A(0) : m / (tot[T_NONEMPTY] * A(p.horizon));
    case PgAgg::seq_mean_token_mean: return c.empty ? A(0) : m / ((c.cnt + A(1e-8)) * tot[T_NONEMPTY]);
    default: break;
  }
  switch (PgType(p.loss_type)) {
    case PgType::grpo: case PgType::sapo: return m / (cnt1 * segs);
    case PgType::bnpo: case PgType::ppo: return m / tcnt1;
    case PgType::dr_grpo: return m / (segs * A(p.horizon));
    case PgType::luspo: return m / segs;
    default: {  // dapo, cispo, vespo: num_items_in_batch (NaN: the kept tokens of this batch)
      const A items = p.num_items == p.num_items ? A(p.num_items) : tot[T_CNT];
      return m / (items > A(1) ? items : A(1));
    }
  }
}

// Phase B for one token: its weighted loss into acc and its gradient written; at sequence level the
// part through the segment's ratio is returned (its share of d loss / d coef) and added by
// phase_b_seq_grad once the segment's total is known.
template <typename A, typename R = AnyTokens> PYALIGN_HD A phase_b_token(const PgArgs& a, int64_t i, int64_t s, const SegConst<A>& c,
                                                 const A* tot, A* acc) {
  const PgParams& p = a.p;
  const A m = mask_at<A, R>(a, i);
  A* gl = a.grad_logp.ptr<A>();
  if (m == A(0)) {
    gl[i] = A(0);
    if (a.grad_ent.data) a.grad_ent.ptr<A>()[i] = A(0);
    return A(0);
  }
  const A lp = R::template f<A>(a.logp, i), old = R::template f<A>(a.old, i);
  const A adv = adv_at<A, R>(a, i, s);
  bool inside;
  const A lr = clamp_ratio(lp - old, inside);
  const A coef = p.seq_level ? c.coef : fast_exp_bounded(lr);
  A isr = c.isr;
  if (p.is_mode == int(IsMode::token_truncate) || p.is_mode == int(IsMode::token_mask))
    isr = is_ratio<A>(p.is_mode, nan_to_zero((old - R::template f<A>(a.samp, i)) * m), A(p.is_clip_min), A(p.is_clip_max));
  const A phi = PgType(p.loss_type) == PgType::vespo ? vespo_phi<A>(p, c.log_w, adv) : A(0);
  CoreOut<A> o = pg_core<A>(p, coef, adv, lp, phi);
  // masks and the rollout correction scale the core (TRL's order); the KL term is added after
  const bool ekeep = entropy_kept<A, R>(a, i, m);
  A scale = (adv >= A(0) ? A(1) : c.lowkl_keep) * (ekeep ? A(1) : A(0));
  if (PgType(p.loss_type) != PgType::vespo) scale *= isr;
  A kl = A(0), dk = A(0);
  if (p.has_ref) kl = kl_value<A>(p.kl, lp - R::template f<A>(a.ref, i), dk);
  const TokenTerms<A> t = token_terms<A>(o, scale, A(p.beta), kl, dk, coef, p.bias_correction_kl ? A(1) : A(0));
  const A w = token_weight<A>(a, c, tot, m);
  acc[G_LOSS] += w * t.loss;
  acc[G_KL] += m * t.kl;
  if (a.ent.data) {
    const A e = R::template f<A>(a.ent, i);
    acc[G_ENT] += m * e;
    const A em = ekeep ? m : A(0);
    if (p.entropy_coef != 0) {
      const A teff = tot[T_EFF] > A(1) ? tot[T_EFF] : A(1);
      acc[G_ENTBONUS] += em * e / teff;
      if (a.grad_ent.data) a.grad_ent.ptr<A>()[i] = -A(p.entropy_coef) * em / teff;
    } else if (a.grad_ent.data) {
      a.grad_ent.ptr<A>()[i] = A(0);
    }
  }
  if (!seq_flags(p)) {
    acc[G_LOW] += o.low != A(0) ? m : A(0);
    acc[G_HIGH] += o.high != A(0) ? m : A(0);
    acc[G_CISPO] += o.cispo != A(0) ? m : A(0);
  }
  if (p.is_mode == int(IsMode::token_truncate) || p.is_mode == int(IsMode::token_mask)) {
    acc[G_ISR] += m * isr;
    acc[G_ISMIN] = isr < acc[G_ISMIN] ? isr : acc[G_ISMIN];
    acc[G_ISMAX] = isr > acc[G_ISMAX] ? isr : acc[G_ISMAX];
  }
  if (PgType(p.loss_type) == PgType::vespo) acc[G_PHI] += m * phi;
  // d coef / d logp: through exp of the clamped log-ratio (token level)
  if (!p.seq_level) {
    gl[i] = w * (t.dlogp + t.dcoef * coef * (inside ? A(1) : A(0)));
    return A(0);
  }
  gl[i] = w * t.dlogp;
  return w * t.dcoef;
}

// The sequence-level chain rule: d loss / d logp_i gets G * d coef / d logp_i.
template <typename A, typename R = AnyTokens> PYALIGN_HD void phase_b_seq_grad(const PgArgs& a, int64_t i, const SegConst<A>& c, A G) {
  const A m = mask_at<A, R>(a, i);
  if (m == A(0)) return;
  bool inside;
  clamp_ratio(R::template f<A>(a.logp, i) - R::template f<A>(a.old, i), inside);
  const A cnt1 = c.cnt > A(1) ? c.cnt : A(1);
  a.grad_logp.ptr<A>()[i] += G * c.coef * m / cnt1 * (inside ? A(1) : A(0));
}

// Segment-level metrics of phase B, after its tokens: the clip flags of a sequence-level ratio, the
// sequence importance ratio, VESPO's per-sequence weight.
template <typename A> PYALIGN_HD void phase_b_seg_metrics(const PgArgs& a, int64_t s, const SegConst<A>& c, A* acc) {
  const PgParams& p = a.p;
  if (seq_flags(p)) {
    const CoreOut<A> o = pg_core<A>(p, c.coef, load<A>(a.adv, s), A(0), A(0));
    acc[G_LOW] = o.low;
    acc[G_HIGH] = o.high;
    acc[G_CISPO] = o.cispo;
  }
  if (p.is_mode == int(IsMode::sequence_truncate) || p.is_mode == int(IsMode::sequence_mask)) {
    acc[G_ISR] = c.isr; acc[G_ISMIN] = c.isr; acc[G_ISMAX] = c.isr;
  }
  if (PgType(p.loss_type) == PgType::vespo && !p.adv_per_token) acc[G_PHI] = vespo_phi<A>(p, c.log_w, load<A>(a.adv, s));
}

// The loss and metrics from the segments' sums (rows 0..S-1 of the workspace), in segment order.
template <typename A> PYALIGN_HD void pg_finalize(const PgArgs& a, const A* work, int64_t S) {
  const PgParams& p = a.p;
  const A* tot = work + S * kSegSlots;
  A loss = 0, bonus = 0, kl = 0, ent = 0, low = 0, high = 0, region = 0, cispo = 0, isr = 0, phi = 0;
  A lowmin = A(INFINITY), highmax = -A(INFINITY), ismin = A(INFINITY), ismax = -A(INFINITY);
  const bool tok_is = p.is_mode == int(IsMode::token_truncate) || p.is_mode == int(IsMode::token_mask);
  for (int64_t s = 0; s < S; ++s) {
    const A* g = work + s * kSegSlots;
    loss += g[G_LOSS]; bonus += g[G_ENTBONUS]; kl += g[G_KL]; ent += g[G_ENT];
    low += g[G_LOW]; high += g[G_HIGH]; cispo += g[G_CISPO]; isr += g[G_ISR]; phi += g[G_PHI];
    region += seq_flags(p) ? (g[G_LOW] > A(0) || g[G_HIGH] > A(0) ? A(1) : A(0)) : g[G_LOW] + g[G_HIGH];
    // TRL's masked per-sequence means (NaN for an empty sequence, skipped by nanmin/nanmax)
    const bool has = seq_flags(p) || g[G_CNT] > A(0);
    if (has) {
      const A d = seq_flags(p) ? A(1) : g[G_CNT];
      lowmin = g[G_LOW] / d < lowmin ? g[G_LOW] / d : lowmin;
      highmax = g[G_HIGH] / d > highmax ? g[G_HIGH] / d : highmax;
    }
    if ((tok_is && g[G_CNT] > A(0)) || (!tok_is && p.is_mode != int(IsMode::none))) {
      ismin = g[G_ISMIN] < ismin ? g[G_ISMIN] : ismin;
      ismax = g[G_ISMAX] > ismax ? g[G_ISMAX] : ismax;
    }
  }
  const A tc = tot[T_CNT] > A(1) ? tot[T_CNT] : A(1);
  const A seqs = tot[T_SEGS] > A(1) ? tot[T_SEGS] : A(1);
  const A flag_den = seq_flags(p) ? seqs : tc;  // TRL: one value per sequence, or masked tokens
  A* m = a.metrics.ptr<A>();
  m[0] = loss;
  m[1] = kl / tc;
  m[2] = ent / tc;
  m[3] = low / flag_den;
  m[4] = high / flag_den;
  m[5] = region / flag_den;
  m[6] = lowmin == A(INFINITY) ? A(NAN) : lowmin;
  m[7] = highmax == -A(INFINITY) ? A(NAN) : highmax;
  m[8] = cispo / flag_den;
  m[9] = phi / ((PgType(p.loss_type) == PgType::vespo && !p.adv_per_token) ? seqs : tc);
  m[10] = isr / (tok_is ? tc : seqs);
  const bool has_is = p.is_mode != int(IsMode::none);  // without a correction the slots hold 0
  m[11] = !has_is ? A(0) : (ismin == A(INFINITY) ? A(NAN) : ismin);
  m[12] = !has_is ? A(0) : (ismax == -A(INFINITY) ? A(NAN) : ismax);
  m[13] = tot[T_CNT];
  a.loss.ptr<A>()[0] = loss - A(p.entropy_coef) * bonus;
}

}  // namespace pyalign
