// Distillation divergences between a student's and a teacher's distributions over one vocabulary,
// per row of logits: the per-entry math shared by the CPU (csrc/cpu/distill.cpp) and CUDA
// (csrc/cuda/distill.cu) kernels, and their interface.
//
// With l_s, l_t the log-softmax of the transformed student and teacher logits z and p_s, p_t
// their probabilities, a row's divergence is (the generalized Jensen-Shannon divergence of GKD,
// Agarwal et al. 2024, arXiv:2306.13649, with TRL's conventions):
//   beta = 0:  KL(p_t || p_s) = sum p_t (l_t - l_s)                        (forward KL)
//   beta = 1:  KL(p_s || p_t) = sum p_s (l_s - l_t)                        (reverse KL)
//   else:      beta KL(p_t || m) + (1 - beta) KL(p_s || m),  m = (1 - beta) p_s + beta p_t
// An entry with probability 0 contributes 0 (0 log 0 = 0), not NaN. Also the total variation
// 0.5 sum |p_s - p_t| and the skew KL divergences of DistiLLM (Ko et al. 2024, arXiv:2402.03898):
//   skew KL:          KL(p_t || a p_t + (1 - a) p_s),  the mixture of the JSD with beta = a
//   skew reverse KL:  KL(p_s || a p_s + (1 - a) p_t),  the mixture of the JSD with beta = 1 - a
// (the mixture weight arrives as beta either way; see div_grad for their gradients).
//
// The logits z are the transformed ones (z = softcap tanh(x / softcap) / temperature, or x / temperature).
// Gradients w.r.t. z (multiplied by dz/dx for the raw logits x), with
// K_s = sum p_s (l_s - l_m), K_t = sum p_t (l_t - l_m) (dL/dp_s = (1 - beta) (l_s - l_m), through
// the softmax):
//   forward KL: d/ds = p_s - p_t,                       d/dt = p_t (l_t - l_s - L)
//   reverse KL: d/ds = p_s (l_s - l_t - L),             d/dt = p_t - p_s
//   JSD:        d/ds = (1 - beta) p_s (l_s - l_m - K_s), d/dt = beta p_t (l_t - l_m - K_t)
#pragma once
#include "pyalign/common.h"
#include "pyalign/logprob.h"  // LogitTransform
#include "pyalign/tensor.h"

#include <cmath>

namespace pyalign {

enum class DivMode : int { forward_kl = 0, reverse_kl, jsd, tvd, skew_kl, skew_reverse_kl };
constexpr const char* kDivModeNames[] = {"forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl"};

// Whether a divergence needs the mixture's log-prob l_m = log((1 - beta) p_s + beta p_t).
constexpr bool has_mixture(DivMode m) { return m == DivMode::jsd || m == DivMode::skew_kl || m == DivMode::skew_reverse_kl; }

// ts, tt: the student's and the teacher's logits transform (temperature, optional softcapping; the
// scale stays 1).
struct DistillParams {
  int mode = int(DivMode::jsd);
  double beta = 0.5;
  LogitTransform ts, tt;
  int64_t ignore_index = -100;
};

// student, teacher: [N, V] of one float dtype, vocab stride 1, any row stride; labels: [N] int32 /
// int64 or absent (no row ignored); weight: [N] (accumulation dtype), each row's weight in the
// reduced loss. Outputs (accumulation dtype, contiguous): loss [N] (each row's divergence, 0 where
// ignored), total [] = sum_r weight_r loss_r in row order, grad_student [N, V] and grad_teacher
// [N, V] (absent: not formed) = weight_r times the row's gradient w.r.t. the raw logits x.
struct DistillArgs {
  TensorArg student, teacher, labels, weight;
  TensorArg loss, total, grad_student, grad_teacher;
  DistillParams p;
};

void distill_cpu(const DistillArgs& a);
#ifdef PYALIGN_WITH_CUDA
void distill_cuda(const DistillArgs& a, void* stream);
#endif

// One vocabulary entry: its log-probs, probabilities and (JSD) the mixture's log-prob. An entry of
// both probabilities 0 (to the precision of exp) has lm = -inf and contributes 0 below.
template <typename A> struct DivEntry {
  A ls, lt, ps, pt, lm;
};
template <DivMode M, typename A> PYALIGN_HD DivEntry<A> div_entry(A ls, A lt, A beta) {
  const A ps = fast_exp(ls), pt = fast_exp(lt);
  const A lm = has_mixture(M) ? fast_log((A(1) - beta) * ps + beta * pt) : A(0);
  return DivEntry<A>{ls, lt, ps, pt, lm};
}

// An entry's parts of the row's divergence: the student's (p_s times its log-ratio) and the
// teacher's; the row's divergence is div_total of their row sums. The total variation splits
// |p_s - p_t| / 2 into p_s sgn / 2 and -p_t sgn / 2; the skew KL keeps the row sum
// C = sum p_s p_t / m (its student gradient needs it) in place of the student's part, the skew reverse
// KL the mirror image.
template <typename A> struct DivParts {
  A s, t;
};
template <DivMode M, typename A> PYALIGN_HD DivParts<A> div_parts(const DivEntry<A>& e) {
  if constexpr (M == DivMode::forward_kl) return DivParts<A>{A(0), e.pt > A(0) ? e.pt * (e.lt - e.ls) : A(0)};
  else if constexpr (M == DivMode::reverse_kl) return DivParts<A>{e.ps > A(0) ? e.ps * (e.ls - e.lt) : A(0), A(0)};
  else if constexpr (M == DivMode::jsd)
    return DivParts<A>{e.ps > A(0) ? e.ps * (e.ls - e.lm) : A(0), e.pt > A(0) ? e.pt * (e.lt - e.lm) : A(0)};
  else if constexpr (M == DivMode::tvd) {
    const A sgn = e.ps > e.pt ? A(0.5) : (e.ps < e.pt ? A(-0.5) : A(0));
    return DivParts<A>{e.ps * sgn, -e.pt * sgn};
  } else if constexpr (M == DivMode::skew_kl)
    return DivParts<A>{e.pt > A(0) ? e.ps * fast_exp(e.lt - e.lm) : A(0), e.pt > A(0) ? e.pt * (e.lt - e.lm) : A(0)};
  else
    return DivParts<A>{e.ps > A(0) ? e.ps * (e.ls - e.lm) : A(0), e.ps > A(0) ? e.pt * fast_exp(e.ls - e.lm) : A(0)};
}
template <DivMode M, typename A> PYALIGN_HD A div_total(A beta, A sum_s, A sum_t) {
  if constexpr (M == DivMode::forward_kl) return sum_t;
  else if constexpr (M == DivMode::reverse_kl || M == DivMode::skew_reverse_kl) return sum_s;
  else if constexpr (M == DivMode::jsd) return beta * sum_t + (A(1) - beta) * sum_s;
  else if constexpr (M == DivMode::tvd) return sum_s + sum_t;
  else return sum_t;  // skew KL
}

// An entry's gradients w.r.t. the transformed student and teacher logits (see the header comment); L the
// row's divergence, ks, kt the row sums of the parts. Through the softmax, dL/dz_j = p_j (g_j - sum p g)
// with g = dL/dp: the total variation's g_s = sgn / 2; the skew KL's (mixture weight b = beta, r = p_t / m)
// g_s = -(1 - b) r, so d/ds = (1 - b) p_s (C - r), and g_t = l_t - l_m + 1 - b r with sum p_t g_t =
// L + 1 - b sum p_t^2 / m = L + (1 - b) C (as b p_t + (1 - b) p_s = m); the skew reverse KL mirrors it.
template <DivMode M, typename A> PYALIGN_HD DivParts<A> div_grad(const DivEntry<A>& e, A beta, A L, A ks, A kt) {
  if constexpr (M == DivMode::forward_kl)
    return DivParts<A>{e.ps - e.pt, e.pt > A(0) ? e.pt * (e.lt - e.ls - L) : A(0)};
  else if constexpr (M == DivMode::reverse_kl)
    return DivParts<A>{e.ps > A(0) ? e.ps * (e.ls - e.lt - L) : A(0), e.pt - e.ps};
  else if constexpr (M == DivMode::jsd)
    return DivParts<A>{e.ps > A(0) ? (A(1) - beta) * e.ps * (e.ls - e.lm - ks) : A(0),
                       e.pt > A(0) ? beta * e.pt * (e.lt - e.lm - kt) : A(0)};
  else if constexpr (M == DivMode::tvd) {
    const A sgn = e.ps > e.pt ? A(0.5) : (e.ps < e.pt ? A(-0.5) : A(0));
    return DivParts<A>{e.ps * (sgn - ks), e.pt * (-sgn - kt)};
  } else if constexpr (M == DivMode::skew_kl) {
    const A r = e.pt > A(0) ? fast_exp(e.lt - e.lm) : A(0);
    return DivParts<A>{(A(1) - beta) * e.ps * (ks - r),
                       e.pt > A(0) ? e.pt * (e.lt - e.lm - beta * r - L + A(1) - (A(1) - beta) * ks) : A(0)};
  } else {  // skew reverse KL: the student's weight in its mixture is 1 - beta
    const A r = e.ps > A(0) ? fast_exp(e.ls - e.lm) : A(0);
    return DivParts<A>{e.ps > A(0) ? e.ps * (e.ls - e.lm - (A(1) - beta) * r - L + A(1) - beta * kt) : A(0),
                       beta * e.pt * (kt - r)};
  }
}

}  // namespace pyalign
