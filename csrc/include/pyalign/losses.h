// Preference losses (DPO family, KTO, BCO, ORPO, CPO/SimPO/AlphaPO, Bradley-Terry reward model):
// the per-element math shared by the CPU (csrc/cpu/losses.cpp) and CUDA (csrc/cuda/losses.cu)
// kernels, and their interface. One call computes, for the whole batch, the per-element loss,
// its gradient w.r.t. every log-prob input (and the per-pair weights), the reduced loss and the
// trainer metrics, in fp32 (fp64 for fp64 inputs).
//
// A call runs three phases over the batch:
//   0. pre-pass: batch sums needed by every element (KTO's KL estimate, BCO's reward mean) and,
//      for the `aot` losses, the rank of each element in the batch sort;
//   1. per element: loss, gradients (already scaled for the reduction), metric partial sums;
//   2. finalize: reduced loss and metrics from the sums.
// The math of each loss lives only in this file (PYALIGN_HD functions).
#pragma once
#include "pyalign/contract.h"
#include "pyalign/tensor.h"

namespace pyalign {

constexpr double kExpCap = 40.0;  // exp(40)^2 ~ 5.5e34: even squared (ipo) stays finite in fp32

struct LossParams {
  int family = 0;
  int n_types = 0;
  int types[kMaxLossTypes] = {0};
  double type_weights[kMaxLossTypes] = {0};
  double beta = 0.1, label_smoothing = 0, f_alpha = 0.5, tau = 0.05, gamma = 0.5, alpha = 0,
         cpo_alpha = 0, desirable_weight = 1, undesirable_weight = 1, center = 0;
  int fdiv = 0;
  int reduction = 1;
  bool has_ref = false;
  int grad_rows = (1 << kLossGradInputs) - 1;  // which gradients to form (contract.h)
};

// The row of grads that holds d loss / d input k, or -1 where the call does not form it.
PYALIGN_HD int grad_row(int grad_rows, int k) {
  if (!((grad_rows >> k) & 1)) return -1;
  int row = 0;
  for (int j = 0; j < k; ++j) row += (grad_rows >> j) & 1;
  return row;
}

// Inputs (1-d, any float dtype and stride; absent ones have data == nullptr):
//   dpo:  a = policy chosen, b = policy rejected, c = ref chosen, d = ref rejected, la/lb lengths
//   kto/bco: a = policy, c = ref, label (desirable), kla/klb = KL-batch policy/ref (kto),
//         state = [running mean, count] (bco)
//   orpo/cpo: a = policy chosen, b = policy rejected, la/lb lengths
//   rm:   a = reward chosen, b = reward rejected, c = margin
// Outputs: loss [N] (reduction none) or [1]; grads [R, N]: the R gradients of d loss / d (a, b, c,
//   d, weight) that p.grad_rows asks for, in that order (an input that needs none costs no write);
//   metrics [kMetricSlots] (named per family in contract.h); state_out [kBcoStateSize] (bco: the
//   updated running mean and count, else absent); work: int32 [4 * (number of aot losses), N]
//   rank workspace (else absent).
struct LossArgs {
  TensorArg a, b, c, d, la, lb, w, label, kla, klb, state;
  TensorArg loss, grads, metrics, state_out, work;
  LossParams p;
};

void loss_forward_cpu(const LossArgs& args);
#ifdef PYALIGN_WITH_CUDA
void loss_forward_cuda(const LossArgs& args, void* stream);
#endif

// The KL-DRO reduction (Dr. DPO, Wu et al. 2024) of the per-pair output of a reduction "none"
// call: value [] = -tau log((1/N) sum_i exp(-l_i / tau)) of loss [N]; the gradient columns
// grads [rows, N] are scaled in place by its gradient softmax(-l / tau), and loss is left holding
// expm1((min l - l) / tau) (a workspace: its per-pair values are gone).
struct KlDroArgs {
  TensorArg loss, grads, value;
  double tau = 1.0;
};

void kl_dro_cpu(const KlDroArgs& args);
#ifdef PYALIGN_WITH_CUDA
void kl_dro_cuda(const KlDroArgs& args, void* stream);
#endif

// ------------------------------------------------------------------------------------------
// Element access

template <typename A> PYALIGN_HD A load(const TensorArg& t, int64_t i) {
  const int64_t off = t.ndim == 0 ? 0 : i * t.strides[0];
  switch (t.dtype) {
    case DType::f32: return A(t.ptr<float>()[off]);
    case DType::f64: return A(t.ptr<double>()[off]);
    case DType::f16: return A(to_float(t.ptr<f16_t>()[off]));
    case DType::bf16: return A(to_float(t.ptr<bf16_t>()[off]));
    case DType::i32: return A(t.ptr<int32_t>()[off]);
    case DType::i64: return A(t.ptr<int64_t>()[off]);
    case DType::u8: return A(t.ptr<uint8_t>()[off]);
    case DType::b8: return A(t.ptr<bool>()[off] ? 1 : 0);
  }
  return A(0);
}
template <typename A> PYALIGN_HD A load_or(const TensorArg& t, int64_t i, A dflt) {
  return t.data ? load<A>(t, i) : dflt;
}
// Sequence length, clamped at 1 (an empty completion counts as one token, as in TRL).
template <typename A> PYALIGN_HD A load_len(const TensorArg& t, int64_t i) {
  A v = load_or<A>(t, i, A(1));
  return v > A(1) ? v : A(1);
}

// One element's inputs, each read once (absent ones: c = d = 0, lengths = 1, weight = 1).
template <typename A> struct Elem {
  A a, b, c, d, la, lb, w;
  bool label;
};
template <typename A> PYALIGN_HD Elem<A> load_elem(const LossArgs& s, int64_t i) {
  Elem<A> e;
  e.a = load<A>(s.a, i);
  e.b = load_or<A>(s.b, i, A(0));
  e.c = load_or<A>(s.c, i, A(0));
  e.d = load_or<A>(s.d, i, A(0));
  e.la = load_len<A>(s.la, i);
  e.lb = load_len<A>(s.lb, i);
  e.w = load_or<A>(s.w, i, A(1));
  e.label = s.label.data ? load<A>(s.label, i) != A(0) : false;
  return e;
}

// ------------------------------------------------------------------------------------------
// Scalar building blocks: value and derivative, stable for any finite argument.

// exp(min(x, cap)) and its derivative (0 above the cap, as for a clamp).
template <typename A> PYALIGN_HD A capped_exp(A x, A& dx) {
  if (x > A(kExpCap)) { dx = A(0); return fast_exp(A(kExpCap)); }
  A e = fast_exp(x);
  dx = e;
  return e;
}

// expm1(min(x, cap)) and the derivative of exp(min(x, cap)) (0 above the cap, as for a clamp).
template <typename A> PYALIGN_HD A capped_expm1(A x, A& dx) {
  if (x > A(kExpCap)) { dx = A(0); return fast_expm1(A(kExpCap)); }
  dx = fast_exp(x);
  return fast_expm1(x);
}

// f-DPO score of a log-ratio r (Wang et al. 2023, "Beyond Reverse KL", arXiv:2309.16240): the
// derivative f'(u) of the divergence's generator at u = pi / pi_ref = exp(r). A generator is
// defined up to a term c (u - 1), which shifts f' by c; as TRL's DPOTrainer, every f' here is
// zero at u = 1, constants included. They cancel in s_c - s_r but not in the length-normalized
// s_c / L_c - s_r / L_r (ipo, sigmoid_norm), so dropping them would change those losses.
template <typename A> PYALIGN_HD A fdiv_score(int fdiv, A f_alpha, A r, A& ds) {
  switch (FDiv(fdiv)) {
    case FDiv::forward_kl:  // f'(u) = 1 - 1/u  ->  1 - exp(-r)
      return -capped_expm1(-r, ds);
    case FDiv::js_divergence:  // f'(u) = log(2u / (1 + u))  ->  log 2 + log sigmoid(r)
      ds = sigmoid(-r);
      return A(0.69314718055994530942) - softplus(-r);
    case FDiv::alpha_divergence: {  // f'(u) = (u^(a-1) - 1) / (a - 1)  ->  expm1((a-1) r) / (a-1)
      const A am1 = f_alpha - A(1);
      if (am1 < A(1e-6) && am1 > A(-1e-6)) { ds = A(1); return r; }  // limit: reverse KL
      A de;
      const A e = capped_expm1(am1 * r, de);
      ds = de;  // d/dr [expm1(am1 r) / am1] = exp(am1 r)
      return e / am1;
    }
    default: ds = A(1); return r;
  }
}

// softplus(+-z) and sigmoid(+-z) from one exp and one log, without overflow or cancellation.
// log1p(e) for e = exp(-|z|) in (0, 1] is log(u) + (e - (u - 1)) / u with u = 1 + e rounded: u - 1
// is exact, and the second term restores what rounding 1 + e lost (it gives e when u == 1), so
// the result is within a few ulps of log1p. glibc's log1pf is several times slower than logf and
// was the largest cost of the whole kernel; 1/u is needed for the sigmoid anyway. fast_exp and
// fast_log (common.h) let the CPU element loop vectorize.
template <typename A> struct Logistic {
  A sp_pos, sp_neg, sig_pos, sig_neg;  // softplus(z), softplus(-z), sigmoid(z), sigmoid(-z)
  PYALIGN_HD explicit Logistic(A z) {
    const A az = z < A(0) ? -z : z;
    const A e = fast_exp(-az), u = A(1) + e, r = A(1) / u;
    const A l = fast_log(u) + (e - (u - A(1))) * r;
    sp_pos = (z > A(0) ? z : A(0)) + l;
    sp_neg = (z < A(0) ? -z : A(0)) + l;
    sig_pos = z >= A(0) ? r : e * r;
    sig_neg = z >= A(0) ? e * r : r;
  }
};

// cDPO / label-smoothed logistic loss in z: (1-e) softplus(-z) + e softplus(z).
template <typename A> PYALIGN_HD A smoothed_logistic(A z, A eps, A& dz) {
  const Logistic<A> f(z);
  dz = -(A(1) - eps) * f.sig_neg + eps * f.sig_pos;
  // A zero weight drops its term outright: 0 * softplus(+-inf) would be NaN once |z| overflows.
  return (eps < A(1) ? (A(1) - eps) * f.sp_neg : A(0)) + (eps > A(0) ? eps * f.sp_pos : A(0));
}

// sigmoid(z) (1 - sigmoid(z)) without cancellation.
template <typename A> PYALIGN_HD A dsigmoid(A z) { return sigmoid(z) * sigmoid(-z); }

// ------------------------------------------------------------------------------------------
// DPO family (one pair): d loss / d (a, b, c, d) for a weighted sum of loss types.

template <typename A> struct PairGrad {
  A loss = 0;
  A g[4] = {0, 0, 0, 0};  // d/d a, b, c, d
};

// The `aot` losses couple a pair with the pair of equal rank in another sorted sequence. The
// workspace holds, for the two sequences X and Y of one aot loss, rank_x, inv_x, rank_y, inv_y.
struct RankView {
  const int32_t* rank_x; const int32_t* inv_x; const int32_t* rank_y; const int32_t* inv_y;
};
PYALIGN_HD RankView rank_view(const TensorArg& work, int slot) {
  const int32_t* w = work.ptr<int32_t>();
  const int64_t n = work.shape[1];
  const int32_t* base = w + int64_t(slot) * 4 * n;
  return RankView{base, base + n, base + 2 * n, base + 3 * n};
}

// The sequences sorted by the two aot losses, for element i:
//   aot:          X = policy log-ratio a - b,   Y = reference log-ratio c - d
//   aot_unpaired: X = chosen log-ratio a - c,   Y = rejected log-ratio b - d
template <typename A> PYALIGN_HD A aot_x(const LossArgs& s, int which, int64_t i) {
  const A a = load<A>(s.a, i);
  return which == 0 ? a - load<A>(s.b, i) : a - load_or<A>(s.c, i, A(0));
}
template <typename A> PYALIGN_HD A aot_y(const LossArgs& s, int which, int64_t i) {
  const A d = load_or<A>(s.d, i, A(0));
  return (which == 0 ? load_or<A>(s.c, i, A(0)) : load<A>(s.b, i)) - d;
}

// Strict total order used for the batch sort: by value, NaN last, ties by index (a stable sort).
template <typename A> PYALIGN_HD bool sort_less(A x, int64_t i, A y, int64_t j) {
  const bool xn = x != x, yn = y != y;
  if (xn != yn) return yn;
  if (!xn && x != y) return x < y;
  return i < j;
}

template <typename A> PYALIGN_HD A weight_of(const LossArgs& s, int64_t i) {
  return load_or<A>(s.w, i, A(1));
}

// Loss of pair i (the weighted sum of the loss types) and its gradient w.r.t. the pair's inputs
// in `out` (the caller multiplies both by the pair's weight). For the aot losses, `cross` receives
// the gradient w.r.t. this pair's inputs of the terms owned by other pairs, already multiplied by
// the owner's weight.
// kType / kFDiv >= 0 fix a single loss type / the f-divergence at compile time (the vectorized
// CPU loop); -1 reads them from the parameters.
template <typename A, int kType = -1, int kFDiv = -1>
PYALIGN_HD void dpo_pair(const LossArgs& s, const Elem<A>& e, int64_t i, PairGrad<A>& out, A (&cross)[4]) {
  const LossParams& p = s.p;
  const A beta = A(p.beta), eps = A(p.label_smoothing);
  const int fdiv = kFDiv >= 0 ? kFDiv : p.fdiv;
  const int n_types = kType >= 0 ? 1 : p.n_types;
  const A a = e.a;
  const A lc = e.a - e.c, lr = e.b - e.d;  // log-ratios (policy log-probs when reference-free)
  A dsc, dsr;
  const A sc = fdiv_score(fdiv, A(p.f_alpha), lc, dsc);
  const A sr = fdiv_score(fdiv, A(p.f_alpha), lr, dsr);
  const A delta = sc - sr;
  A g_lc = 0, g_lr = 0, g_a = 0, g_b = 0;  // d/d log-ratios and direct d/d policy
  A loss = 0;
  int aot_slot = 0;
  for (int t = 0; t < n_types; ++t) {
    const A tw = A(p.type_weights[t]);
    A l = 0, g_delta = 0, g_sc = 0, g_sr = 0;  // through delta or through each score
    switch (DpoType(kType >= 0 ? kType : p.types[t])) {
      case DpoType::sigmoid: {  // Rafailov et al. 2023, eq. 7; cDPO (Mitchell 2023) if eps > 0
        A dz; l = smoothed_logistic(beta * delta, eps, dz); g_delta = beta * dz; break;
      }
      case DpoType::robust: {  // Chowdhury et al. 2024 (rDPO), eq. 8
        const Logistic<A> f(beta * delta);
        l = ((A(1) - eps) * f.sp_neg - eps * f.sp_pos) / (A(1) - A(2) * eps);
        g_delta = beta * (-(A(1) - eps) * f.sig_neg - eps * f.sig_pos) / (A(1) - A(2) * eps);
        break;
      }
      case DpoType::hinge: {  // SLiC (Zhao et al. 2023): relu(1 - beta delta)
        const A z = beta * delta;
        l = z < A(1) ? A(1) - z : A(0);
        g_delta = z < A(1) ? -beta : A(0);
        break;
      }
      case DpoType::ipo: {  // Azar et al. 2023, eq. 17, on per-token (length-normalized) scores
        const A Lc = e.la, Lr = e.lb;
        const A err = sc / Lc - sr / Lr - A(1) / (A(2) * beta);
        l = err * err;
        g_sc = A(2) * err / Lc; g_sr = -A(2) * err / Lr;
        break;
      }
      case DpoType::sigmoid_norm: {  // length-normalized DPO: -log sigmoid(beta (sc/Lc - sr/Lr))
        const A Lc = e.la, Lr = e.lb;
        const Logistic<A> f(beta * (sc / Lc - sr / Lr));
        l = f.sp_neg;
        const A gz = -f.sig_neg;
        g_sc = gz * beta / Lc; g_sr = -gz * beta / Lr;
        break;
      }
      case DpoType::exo_pair: {  // Ji et al. 2024 (EXO), eq. 16: KL(softmax(z) || (1-e, e))
        const A z = beta * delta;
        const Logistic<A> f(z);
        l = f.sig_pos * (-f.sp_neg - std::log1p(-eps)) + f.sig_neg * (-f.sp_pos - std::log(eps));
        g_delta = beta * f.sig_pos * f.sig_neg * (z - (std::log1p(-eps) - std::log(eps)));
        break;
      }
      case DpoType::nca_pair: {  // Chen et al. 2024 (NCA), pairwise form
        const Logistic<A> fc(beta * sc), fr(beta * sr);
        l = fc.sp_neg + A(0.5) * fc.sp_pos + A(0.5) * fr.sp_pos;
        g_sc = beta * (-fc.sig_neg + A(0.5) * fc.sig_pos);
        g_sr = beta * A(0.5) * fr.sig_pos;
        break;
      }
      case DpoType::bco_pair: {  // Jung et al. 2024 (BCO), paired form without the reward shift
        const Logistic<A> fc(beta * sc), fr(beta * sr);
        l = fc.sp_neg + fr.sp_pos;
        g_sc = -beta * fc.sig_neg; g_sr = beta * fr.sig_pos;
        break;
      }
      case DpoType::sppo_hard: {  // Wu et al. 2024 (SPPO), eq. 4.7 with hard P in {0, 1}
        const A h = A(0.5) / beta;
        l = (sc - h) * (sc - h) + (sr + h) * (sr + h);
        g_sc = A(2) * (sc - h); g_sr = A(2) * (sr + h);
        break;
      }
      case DpoType::apo_zero: {  // D'Oosterlinck et al. 2024 (APO), eq. 7
        const A zc = beta * lc, zr = beta * lr;
        l = sigmoid(-zc) + sigmoid(zr);
        g_lc += tw * -beta * dsigmoid(zc); g_lr += tw * beta * dsigmoid(zr);
        break;
      }
      case DpoType::apo_down: {  // APO, eq. 8
        const A zc = beta * lc, z = beta * delta;
        l = sigmoid(zc) + sigmoid(-z);
        g_lc += tw * beta * dsigmoid(zc);
        g_delta = -beta * dsigmoid(z);
        break;
      }
      case DpoType::discopop: {  // Chris Lu et al. 2024 (DiscoPOP), eq. 5: log-ratio modulated loss
        // L = (1 - m) softplus(-x) + m exp(-x), m = sigmoid(x / tau); m exp(-x) is evaluated as
        // exp(-x - softplus(-x / tau)) so that it stays finite when x -> -inf.
        const A x = beta * delta, tau = A(p.tau);
        const A m = sigmoid(x / tau), mn = sigmoid(-x / tau);
        const A sp = softplus(-x);
        const A me = fast_exp(-x - softplus(-x / tau));
        l = mn * sp + me;
        // dL/dx = -(1-m) sigmoid(-x) + (m (1-m) / tau)(exp(-x) - softplus(-x)) - m exp(-x)
        const A dx = -mn * sigmoid(-x) + (mn / tau) * (me - m * sp) - me;
        g_delta = beta * dx;
        break;
      }
      case DpoType::sft: {  // NLL of the chosen response per token (RPO, Pang et al. 2024)
        const A Lc = e.la;
        l = -a / Lc;
        g_a += tw * -A(1) / Lc;
        break;
      }
      case DpoType::aot:
      case DpoType::aot_unpaired: {
        // AOT (Melnyk et al. 2024): the k-th smallest X against the k-th smallest Y, with the cDPO
        // loss. The term of rank k is owned by the pair whose X has rank k; the gradient goes to
        // that pair's X inputs and to the inputs of the pair whose Y has rank k (a subgradient of
        // the sort: the permutation is held fixed, ties broken by index).
        const int which = DpoType(p.types[t]) == DpoType::aot ? 0 : 1;
        const RankView rv = rank_view(s.work, aot_slot++);
        const A x = which == 0 ? e.a - e.b : e.a - e.c;
        const int64_t j = rv.inv_y[rv.rank_x[i]];
        const A y = aot_y<A>(s, which, j);
        A dz;
        l = smoothed_logistic(beta * (x - y), eps, dz);
        const A gx = tw * beta * dz;  // d term / d x; d term / d y = -gx
        if (which == 0) { g_a += gx; g_b -= gx; } else { g_lc += gx; }
        // This pair's Y enters the term owned by the pair whose X has the same rank.
        const int64_t o = rv.inv_x[rv.rank_y[i]];
        const A xo = aot_x<A>(s, which, o);
        const A yi = (which == 0 ? e.c : e.b) - e.d;
        A dzo;
        smoothed_logistic(beta * (xo - yi), eps, dzo);
        const A gy = -tw * beta * dzo * weight_of<A>(s, o);  // owner's weight, applied here
        if (which == 0) { cross[2] += gy; cross[3] -= gy; }   // y = c - d
        else { cross[1] += gy; cross[3] -= gy; }              // y = b - d
        break;
      }
    }
    loss += tw * l;
    g_lc += tw * (g_delta * dsc + g_sc * dsc);
    g_lr += tw * (-g_delta * dsr + g_sr * dsr);
  }
  out.loss = loss;
  out.g[0] = g_a + g_lc;
  out.g[1] = g_b + g_lr;
  // A product, not a select on the flag: a select on a loop-invariant bool stops the CPU loop
  // vectorizing. Without a reference these rows are never read.
  const A ref = A(p.has_ref ? 1 : 0);
  out.g[2] = -g_lc * ref;
  out.g[3] = -g_lr * ref;
}

// ------------------------------------------------------------------------------------------
// Unpaired losses: KTO (Ethayarajh et al. 2024) and BCO (Jung et al. 2024). Element i has log-
// ratio r = a - c and a desirable/undesirable label; `shift` is KTO's clamped KL estimate or
// BCO's running reward mean delta.

// kFam / kType >= 0 fix the family and the KTO type at compile time (the vectorized CPU loop).
template <typename A, int kFam = -1, int kType = -1>
PYALIGN_HD void unpaired_elem(const LossArgs& s, const Elem<A>& e, A shift, PairGrad<A>& out) {
  const LossParams& p = s.p;
  const A beta = A(p.beta);
  const bool desirable = e.label;
  const A r = e.a - e.c;
  A l, gr;
  if (LossFamily(kFam >= 0 ? kFam : p.family) == LossFamily::bco) {
    // BCO eq. 9: -log sigmoid(beta r - delta) for desirable, -log sigmoid(-(beta r - delta)) else.
    const A z = beta * r - shift;
    if (desirable) { l = softplus(-z); gr = -beta * sigmoid(-z); }
    else { l = softplus(z); gr = beta * sigmoid(z); }
  } else {
    const A wgt = desirable ? A(p.desirable_weight) : A(p.undesirable_weight);
    if (KtoType(kType >= 0 ? kType : p.types[0]) == KtoType::kto) {
      // KTO eq. 8: 1 - sigmoid(beta (r - z0)) for desirable, 1 - sigmoid(beta (z0 - r)) else.
      const A z = desirable ? beta * (r - shift) : beta * (shift - r);
      l = sigmoid(-z);
      gr = -dsigmoid(z) * (desirable ? beta : -beta);
    } else {  // apo_zero_unpaired (APO eq. 7, unpaired): 1 - sigmoid(beta r) / sigmoid(beta r)
      const A z = beta * r;
      l = desirable ? sigmoid(-z) : sigmoid(z);
      gr = (desirable ? -beta : beta) * dsigmoid(z);
    }
    l *= wgt; gr *= wgt;
  }
  out.loss = l;
  out.g[0] = gr; out.g[1] = 0; out.g[2] = -gr; out.g[3] = 0;
}

// ------------------------------------------------------------------------------------------
// ORPO (Hong et al. 2024, eqs. 6-7): -mean log p(y_w) - lambda log sigmoid(log odds ratio), on
// per-token mean log-probs l = logp / length. log(1 - p) = log1mexp(l), stable for l near 0.

constexpr double kOrpoMaxMeanLogp = -1e-6;  // a mean log-prob of 0 (p = 1) has infinite odds

template <typename A> struct OrpoExtra { A nll, log_odds, ratio; };

template <typename A>
PYALIGN_HD void orpo_pair(const LossArgs& s, const Elem<A>& e, PairGrad<A>& out, OrpoExtra<A>& ex) {
  const A beta = A(s.p.beta);
  const A Lc = e.la, Lr = e.lb;
  A mc = e.a / Lc, mr = e.b / Lr;
  const A cap = A(kOrpoMaxMeanLogp);
  mc = mc > cap ? cap : mc;  // the gradient passes the clamp unchanged; NaN stays NaN
  mr = mr > cap ? cap : mr;
  const A lo = (mc - mr) - (log1mexp(mc) - log1mexp(mr));
  const A dlo_c = -A(1) / fast_expm1(mc);  // 1 / (1 - p_c)
  const A dlo_r = A(1) / fast_expm1(mr);   // -1 / (1 - p_r)
  const A ratio = -softplus(-lo);
  out.loss = -mc - beta * ratio;
  const A g_lo = -beta * sigmoid(-lo);
  out.g[0] = (-A(1) + g_lo * dlo_c) / Lc;
  out.g[1] = (g_lo * dlo_r) / Lr;
  out.g[2] = 0; out.g[3] = 0;
  ex.nll = -mc; ex.log_odds = lo; ex.ratio = ratio;
}

// ------------------------------------------------------------------------------------------
// CPO (Xu et al. 2024) / SimPO (Meng et al. 2024) / AlphaPO (Gupta et al. 2025): reference-free.
// Scores are log-probs (sums for sigmoid/hinge, per-token means for ipo/simpo); AlphaPO shapes
// each score l into r = (1 - exp(-alpha l)) / alpha. Plus cpo_alpha times the chosen NLL.

template <typename A> PYALIGN_HD bool cpo_normalized(int type) {
  return CpoType(type) == CpoType::ipo || CpoType(type) == CpoType::simpo;
}

template <typename A> PYALIGN_HD A alphapo_reward(A alpha, A l, A& dr) {
  if (alpha == A(0)) { dr = A(1); return l; }
  A de;
  const A e = capped_exp(-alpha * l, de);
  dr = de;  // d/dl (1 - exp(-alpha l)) / alpha = exp(-alpha l)
  return (A(1) - e) / alpha;
}

template <typename A> struct CpoExtra { A rc, rr, nll; };

template <typename A, int kType = -1>
PYALIGN_HD void cpo_pair(const LossArgs& s, const Elem<A>& e, PairGrad<A>& out, CpoExtra<A>& ex) {
  const LossParams& p = s.p;
  const A beta = A(p.beta), eps = A(p.label_smoothing), alpha = A(p.alpha);
  const int type = kType >= 0 ? kType : p.types[0];
  const bool norm = cpo_normalized<A>(type);
  const A Lc = e.la, Lr = e.lb;
  const A a = e.a, b = e.b;
  const A sc_len = norm ? Lc : A(1), sr_len = norm ? Lr : A(1);
  A drc, drr;
  const A rc = alphapo_reward(alpha, a / sc_len, drc);
  const A rr = alphapo_reward(alpha, b / sr_len, drr);
  A logits = rc - rr;
  A l, g;  // g = d l / d logits
  switch (CpoType(type)) {
    case CpoType::hinge: {
      const A z = beta * logits;
      l = z < A(1) ? A(1) - z : A(0);
      g = z < A(1) ? -beta : A(0);
      break;
    }
    case CpoType::ipo: {
      const A e = logits - A(1) / (A(2) * beta);
      l = e * e; g = A(2) * e;
      break;
    }
    case CpoType::simpo: logits -= A(p.gamma) / beta;  // target margin gamma (SimPO eq. 6)
      // fall through
    default: {
      A dz;
      l = smoothed_logistic(beta * logits, eps, dz);
      g = beta * dz;
      break;
    }
  }
  // NLL of the chosen response: per token when its length is given, else per sequence.
  const A has_len = A(s.la.data ? 1 : 0);  // arithmetic, not a select (see dpo_pair)
  const A nll_len = has_len * Lc + (A(1) - has_len);
  const A nll = -a / nll_len;
  out.loss = l + A(p.cpo_alpha) * nll;
  out.g[0] = g * drc / sc_len - A(p.cpo_alpha) / nll_len;
  out.g[1] = -g * drr / sr_len;
  out.g[2] = 0; out.g[3] = 0;
  ex.rc = rc; ex.rr = rr; ex.nll = nll;
}

// ------------------------------------------------------------------------------------------
// Bradley-Terry reward-model loss (Ouyang et al. 2022, eq. 1), with a per-pair margin (Llama 2,
// Touvron et al. 2023, eq. 2) and reward centering (Eisenstein et al. 2023):
//   -log sigmoid(r_c - r_r - m) + center (r_c + r_r)^2

template <typename A> PYALIGN_HD void rm_pair(const LossArgs& s, const Elem<A>& e, PairGrad<A>& out) {
  const A rc = e.a, rr = e.b, m = e.c;
  const A z = rc - rr - m;
  const A center = A(s.p.center);
  const A sum = rc + rr;
  const Logistic<A> f(z);
  out.loss = f.sp_neg + center * sum * sum;
  const A gz = -f.sig_neg;
  out.g[0] = gz + A(2) * center * sum;
  out.g[1] = -gz + A(2) * center * sum;
  out.g[2] = -gz * A(s.c.data ? 1 : 0);  // never read without a margin (see dpo_pair)
  out.g[3] = 0;
}

// ------------------------------------------------------------------------------------------
// Phases shared by the CPU and CUDA drivers.

// Partial sums (phase 1) -> metrics (phase 2). Slot meanings:
enum SumSlot : int {
  S_LOSS = 0,   // sum of w * loss
  S_RC, S_RR,   // rewards of chosen / rejected
  S_ACC,        // chosen reward > rejected reward
  S_LC, S_LR,   // policy log-probs of chosen / rejected
  S_NC, S_NR,   // element counts of chosen / rejected (unpaired)
  S_X0, S_X1, S_X2,  // family extras (ORPO nll/log-odds ratio/log odds; CPO nll)
  kSums              // number of slots
};

// Pre-pass sums (phase 0): pre[0] = sum of KTO's KL-batch log-ratios or BCO's rewards.
template <typename A> PYALIGN_HD A prepass_term(const LossArgs& s, int64_t i) {
  if (LossFamily(s.p.family) == LossFamily::kto)
    return load<A>(s.kla, i) - load<A>(s.klb, i);
  return A(s.p.beta) * (load<A>(s.a, i) - load<A>(s.c, i));  // bco
}
template <typename A> PYALIGN_HD int64_t prepass_count(const LossArgs& s) {
  if (LossFamily(s.p.family) == LossFamily::kto) return s.kla.data ? s.kla.shape[0] : 0;
  if (LossFamily(s.p.family) == LossFamily::bco) return s.a.shape[0];
  return 0;
}
// The shift used by every element: KTO's clamped KL mean, BCO's updated running mean.
template <typename A> PYALIGN_HD A prepass_shift(const LossArgs& s, A sum) {
  const int64_t m = prepass_count<A>(s);
  if (LossFamily(s.p.family) == LossFamily::kto) {
    if (m == 0) return A(0);
    const A kl = sum / A(m);
    return kl < A(0) ? A(0) : kl;  // clamped at 0; NaN stays NaN
  }
  if (LossFamily(s.p.family) == LossFamily::bco) {
    const A mean0 = load<A>(s.state, 0), count0 = load<A>(s.state, 1);
    const A batch = sum / A(m);
    return mean0 + (batch - mean0) / (count0 + A(1));
  }
  return A(0);
}

template <typename A> PYALIGN_HD A reduction_scale(const LossArgs& s) {
  return Reduction(s.p.reduction) == Reduction::mean ? A(1) / A(s.a.shape[0]) : A(1);
}

// One element's results before the reduction: loss and gradient (not yet weighted), the cross
// gradient of the aot losses (already weighted), and the metric terms.
template <typename A> struct ElemOut {
  PairGrad<A> pg;
  A cross[4] = {0, 0, 0, 0};
  A reward_c = 0, reward_r = 0, x0 = 0, x1 = 0, x2 = 0;
};

// The math of element i of a paired family (kFam, kType, kFDiv >= 0: fixed at compile time for
// the vectorized CPU loop; -1: from the parameters). Unpaired families go through unpaired_elem.
template <typename A, int kFam = -1, int kType = -1, int kFDiv = -1>
PYALIGN_HD ElemOut<A> element_math(const LossArgs& s, const Elem<A>& e, int64_t i, A shift) {
  const A beta = A(s.p.beta);
  ElemOut<A> o;
  switch (LossFamily(kFam >= 0 ? kFam : s.p.family)) {
    case LossFamily::dpo:
      dpo_pair<A, kType, kFDiv>(s, e, i, o.pg, o.cross);
      o.reward_c = beta * (e.a - e.c);
      o.reward_r = beta * (e.b - e.d);
      break;
    case LossFamily::kto:
    case LossFamily::bco:
      unpaired_elem<A, kFam, kType>(s, e, shift, o.pg);
      break;
    case LossFamily::orpo: {
      OrpoExtra<A> ex;
      orpo_pair<A>(s, e, o.pg, ex);
      o.reward_c = beta * e.a / e.la; o.reward_r = beta * e.b / e.lb;
      o.x0 = ex.nll; o.x1 = ex.ratio; o.x2 = ex.log_odds;
      break;
    }
    case LossFamily::cpo: {
      CpoExtra<A> ex;
      cpo_pair<A, kType>(s, e, o.pg, ex);
      o.reward_c = beta * ex.rc; o.reward_r = beta * ex.rr;
      o.x0 = ex.nll;
      break;
    }
    case LossFamily::rm:
      rm_pair<A>(s, e, o.pg);
      o.reward_c = e.a; o.reward_r = e.b;
      break;
  }
  return o;
}

// Phase 1 for element i: writes its loss (reduction none) and gradient row, adds to sums.
template <typename A> PYALIGN_HD void process_element(const LossArgs& s, int64_t i, A shift, A scale, A* sums) {
  const LossParams& p = s.p;
  const int64_t n = s.a.shape[0];
  const A beta = A(p.beta);
  const Elem<A> e = load_elem<A>(s, i);
  const ElemOut<A> o = element_math<A>(s, e, i, shift);
  A* grads = s.grads.ptr<A>();
  for (int k = 0; k < 4; ++k) {
    const int row = grad_row(p.grad_rows, k);
    if (row >= 0) grads[row * n + i] = scale * (e.w * o.pg.g[k] + o.cross[k]);
  }
  const int wrow = grad_row(p.grad_rows, 4);
  if (wrow >= 0) grads[wrow * n + i] = s.w.data ? scale * o.pg.loss : A(0);
  if (Reduction(p.reduction) == Reduction::none) s.loss.ptr<A>()[i] = e.w * o.pg.loss;
  sums[S_LOSS] += e.w * o.pg.loss;
  if (LossFamily(p.family) == LossFamily::kto || LossFamily(p.family) == LossFamily::bco) {
    const A reward = beta * (e.a - e.c);
    if (e.label) { sums[S_RC] += reward; sums[S_LC] += e.a; sums[S_NC] += A(1); }
    else { sums[S_RR] += reward; sums[S_LR] += e.a; sums[S_NR] += A(1); }
  } else {
    sums[S_RC] += o.reward_c; sums[S_RR] += o.reward_r;
    sums[S_ACC] += o.reward_c > o.reward_r ? A(1) : A(0);
    sums[S_LC] += e.a; sums[S_LR] += e.b;
    sums[S_X0] += o.x0; sums[S_X1] += o.x1; sums[S_X2] += o.x2;
  }
}

// Phase 2: reduced loss and metrics (slots named per family in contract.h), BCO's new state.
template <typename A> PYALIGN_HD void finalize(const LossArgs& s, const A* sums, A shift) {
  const LossParams& p = s.p;
  const A n = A(s.a.shape[0]);
  if (Reduction(p.reduction) != Reduction::none)
    s.loss.ptr<A>()[0] = sums[S_LOSS] * reduction_scale<A>(s);
  A* m = s.metrics.ptr<A>();
  for (int k = 0; k < kMetricSlots; ++k) m[k] = A(0);
  const LossFamily f = LossFamily(p.family);
  if (f == LossFamily::kto || f == LossFamily::bco) {
    const A nan = A(NAN);
    const A nc = sums[S_NC], nr = sums[S_NR];
    m[kRewardChosen] = nc > A(0) ? sums[S_RC] / nc : nan;
    m[kRewardRejected] = nr > A(0) ? sums[S_RR] / nr : nan;
    m[kRewardMargin] = m[kRewardChosen] - m[kRewardRejected];  // no accuracy for unpaired data
    m[kLogpChosen] = nc > A(0) ? sums[S_LC] / nc : nan;
    m[kLogpRejected] = nr > A(0) ? sums[S_LR] / nr : nan;
    m[kFamilyMetric0] = shift;  // KTO: the KL estimate z0; BCO: the running reward mean after this batch
    m[kFamilyMetric1] = nc;
    m[kFamilyMetric2] = nr;
    if (f == LossFamily::bco) {
      A* st = s.state_out.ptr<A>();
      st[0] = shift;
      st[1] = load<A>(s.state, 1) + A(1);  // each batch counts once
    }
    return;
  }
  m[kRewardChosen] = sums[S_RC] / n; m[kRewardRejected] = sums[S_RR] / n;
  m[kRewardMargin] = (sums[S_RC] - sums[S_RR]) / n; m[kRewardAccuracy] = sums[S_ACC] / n;
  m[kLogpChosen] = sums[S_LC] / n; m[kLogpRejected] = sums[S_LR] / n;
  m[kFamilyMetric0] = sums[S_X0] / n; m[kFamilyMetric1] = sums[S_X1] / n; m[kFamilyMetric2] = sums[S_X2] / n;
}

// ------------------------------------------------------------------------------------------
// KL-DRO: with m = min(l), z_i = (m - l_i) / tau <= 0 (nothing overflows for small tau) and
// S = mean(expm1(z)) in [-1, 0] (expm1 and log1p keep the digits log(mean(exp(z))) loses for large
// tau): value = m - tau log1p(S), and d value / d l_i = exp(z_i) / (N (1 + S)). m is held fixed:
// the value does not depend on the shift, so neither does the gradient.

// min that propagates NaN (a NaN loss makes the whole reduction NaN, as torch's min does).
template <typename A> PYALIGN_HD A nan_min(A m, A x) { return (x < m || x != x) ? x : m; }
template <typename A> PYALIGN_HD A kl_dro_term(A l, A m, A tau) { return fast_expm1((m - l) / tau); }
template <typename A> PYALIGN_HD A kl_dro_value(A m, A term_sum, int64_t n, A tau) {
  return m - tau * fast_log1p(term_sum / A(n));
}
// 1 / (N (1 + S)) from the sum of the N terms, and the factor of pair i's gradient from its term.
template <typename A> PYALIGN_HD A kl_dro_inv_norm(A term_sum, int64_t n) { return A(1) / (A(n) + term_sum); }
template <typename A> PYALIGN_HD A kl_dro_weight(A term, A inv_norm) { return (term + A(1)) * inv_norm; }

// Number of aot / aot_unpaired losses in the list (each has a workspace slot, in list order).
PYALIGN_HD int aot_count(const LossParams& p) {
  if (LossFamily(p.family) != LossFamily::dpo) return 0;
  int n = 0;
  for (int t = 0; t < p.n_types; ++t)
    n += (DpoType(p.types[t]) == DpoType::aot || DpoType(p.types[t]) == DpoType::aot_unpaired);
  return n;
}
// The `which` (0: aot, 1: aot_unpaired) of the k-th aot loss in the list.
PYALIGN_HD int aot_which(const LossParams& p, int k) {
  for (int t = 0; t < p.n_types; ++t) {
    const DpoType ty = DpoType(p.types[t]);
    if (ty == DpoType::aot || ty == DpoType::aot_unpaired) {
      if (k == 0) return ty == DpoType::aot ? 0 : 1;
      --k;
    }
  }
  return 0;
}

}  // namespace pyalign
