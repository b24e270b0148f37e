// Distillation divergences between a student's and a teacher's distributions over one vocabulary,
// per row of logits: the per-entry math shared by the CPU (csrc/cpu/distill.cpp) and CUDA
// (csrc/cuda/distill.cu) kernels, and their interface.
//
// With l_s, l_t the log-softmax of the temperature-scaled student and teacher logits and p_s, p_t
// their probabilities, a row's divergence is (the generalized Jensen-Shannon divergence of GKD,
// Agarwal et al. 2024, arXiv:2306.13649, with TRL's conventions):
//   beta = 0:  KL(p_t || p_s) = sum p_t (l_t - l_s)                        (forward KL)
//   beta = 1:  KL(p_s || p_t) = sum p_s (l_s - l_t)                        (reverse KL)
//   else:      beta KL(p_t || m) + (1 - beta) KL(p_s || m),  m = (1 - beta) p_s + beta p_t
// An entry with probability 0 contributes 0 (0 log 0 = 0), not NaN.
//
// Gradients w.r.t. the scaled logits (multiplied by 1 / temperature for the raw ones), with
// K_s = sum p_s (l_s - l_m), K_t = sum p_t (l_t - l_m) (dL/dp_s = (1 - beta) (l_s - l_m), through
// the softmax):
//   forward KL: d/ds = p_s - p_t,                       d/dt = p_t (l_t - l_s - L)
//   reverse KL: d/ds = p_s (l_s - l_t - L),             d/dt = p_t - p_s
//   JSD:        d/ds = (1 - beta) p_s (l_s - l_m - K_s), d/dt = beta p_t (l_t - l_m - K_t)
#pragma once
#include "pyalign/common.h"
#include "pyalign/tensor.h"

#include <cmath>

namespace pyalign {

enum class DivMode : int { forward_kl = 0, reverse_kl, jsd };

struct DistillParams {
  int mode = int(DivMode::jsd);
  double beta = 0.5, inv_temp = 1;
  int64_t ignore_index = -100;
};

// student, teacher: [N, V] of one float dtype, vocab stride 1, any row stride; labels: [N] int32 /
// int64 or absent (no row ignored); weight: [N] (accumulation dtype), each row's weight in the
// reduced loss. Outputs (accumulation dtype, contiguous): loss [N] (each row's divergence, 0 where
// ignored), total [] = sum_r weight_r loss_r in row order, grad_student [N, V] and grad_teacher
// [N, V] (absent: not formed) = weight_r times the row's gradient w.r.t. the raw logits.
struct DistillArgs {
  TensorArg student, teacher, labels, weight;
  TensorArg loss, total, grad_student, grad_teacher;
  DistillParams p;
};

void distill_cpu(const DistillArgs& a);
#ifdef PYALIGN_WITH_CUDA
void distill_cuda(const DistillArgs& a, void* stream);
#endif

// log((1 - beta) exp(ls) + beta exp(lt)) from log(1 - beta) and log(beta): a two-term log-sum-exp.
template <typename A> PYALIGN_HD A log_mixture(A ls, A lt, A log1mb, A logb) {
  const A x = ls + log1mb, y = lt + logb;
  const A hi = x > y ? x : y, lo = x > y ? y : x;
  if (hi == A(-INFINITY)) return hi;
  return hi + std::log1p(std::exp(lo - hi));
}

// One entry's parts of the row's divergence: the student's (p_s times its log-ratio) and the
// teacher's; the row's divergence is div_total of their row sums.
template <typename A> struct DivParts {
  A s, t;
};
template <typename A> PYALIGN_HD DivParts<A> div_parts(int mode, A ls, A lt, A lm) {
  const A ps = fast_exp(ls), pt = fast_exp(lt);
  if (DivMode(mode) == DivMode::forward_kl) return DivParts<A>{A(0), pt > A(0) ? pt * (lt - ls) : A(0)};
  if (DivMode(mode) == DivMode::reverse_kl) return DivParts<A>{ps > A(0) ? ps * (ls - lt) : A(0), A(0)};
  return DivParts<A>{ps > A(0) ? ps * (ls - lm) : A(0), pt > A(0) ? pt * (lt - lm) : A(0)};
}
template <typename A> PYALIGN_HD A div_total(int mode, A beta, A sum_s, A sum_t) {
  if (DivMode(mode) == DivMode::forward_kl) return sum_t;
  if (DivMode(mode) == DivMode::reverse_kl) return sum_s;
  return beta * sum_t + (A(1) - beta) * sum_s;
}

// One entry's gradients w.r.t. the scaled student and teacher logits (see the header comment);
// L the row's divergence, K_s, K_t the row sums of the parts.
template <typename A> PYALIGN_HD DivParts<A> div_grad(int mode, A beta, A ls, A lt, A lm, A L, A ks, A kt) {
  const A ps = fast_exp(ls), pt = fast_exp(lt);
  if (DivMode(mode) == DivMode::forward_kl) return DivParts<A>{ps - pt, pt > A(0) ? pt * (lt - ls - L) : A(0)};
  if (DivMode(mode) == DivMode::reverse_kl) return DivParts<A>{ps > A(0) ? ps * (ls - lt - L) : A(0), pt - ps};
  return DivParts<A>{ps > A(0) ? (A(1) - beta) * ps * (ls - lm - ks) : A(0),
                     pt > A(0) ? beta * pt * (lt - lm - kt) : A(0)};
}

}  // namespace pyalign
