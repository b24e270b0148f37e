// Ensemble uncertainty: shared math and the interface of the CPU (csrc/cpu/uncertainty.cpp) and
// CUDA (csrc/cuda/uncertainty.cu) kernels.
//
// Token distributions of M members, logits [M, ..., V]; per token ("row") r:
//   p_m = softmax(x_m / temperature),  pbar = mean_m p_m
//   total entropy     H(pbar)
//   expected entropy  mean_m H(p_m)
//   mutual info       H(pbar) - mean_m H(p_m)          (>= 0, Jensen)
//   ensemble logprob  log mean_m p_m(label)
//   label variance    var_m p_m(label)                 (population variance, ddof = 0)
// CPU: one read of each member's row (online softmax statistics lse_m, H_m, keeping the chunk-
// relative exps in an O(M x V) per-thread scratch), then pbar chunk by chunk from the scratch.
// CUDA: pass 1 statistics, pass 2 re-reads the rows for pbar. No [M, tokens, V] tensor is formed.
//
// Reward ensembles, rewards [M, N]: per column the (weighted) mean, variance, min, max, a
// linearly interpolated quantile and the mean of per-member variances (aleatoric part).
#pragma once
#include "pyalign/labels.h"
#include "pyalign/softmax.h"
#include "pyalign/tensor.h"

namespace pyalign {

// -p log p for p in [0, 1] (0 at p == 0), branch-free so the host compiler inlines and
// vectorizes it (#pragma omp simd): log is taken of p + FLT_MIN (equal to p for p > 2^-100; for
// smaller p, p log p is below 1e-28 either way), x = 2^k * m with m in [sqrt(1/2), sqrt(2)) by
// integer arithmetic on the bits, and log(m) by the Cephes degree-9 polynomial in m - 1 (max
// rel. error ~2 ulp). NaN propagates through the final product.
PYALIGN_HD float neg_plogp(float p) {
#if defined(__CUDA_ARCH__)
  return p == 0.0f ? 0.0f : -p * logf(p);
#else
  const float x = p + 1.17549435e-38f;
  const int32_t u = int32_t(float_to_bits(x));
  const int32_t ix = u - 0x3f3504f3;                 // offset so that m lands in [sqrt(1/2), sqrt(2))
  const float k = float(ix >> 23);                   // arithmetic shift: the exponent
  const float m = bits_to_float(uint32_t(u - (ix & int32_t(0xff800000u))));
  const float f = m - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y += -2.12194440e-4f * k;
  y += -0.5f * z;
  const float logx = f + y + 0.693359375f * k;
  return -p * logx;
#endif
}
PYALIGN_HD double neg_plogp(double p) { return p > 0 ? -p * std::log(p) : p * 0.0; }

// The label's statistics over the ensemble for one token.
template <typename A> struct EnsembleLabelStats {
  A logp;  // log mean_m p_m(y): -inf when every member gives the label probability 0
  A var;   // var_m p_m(y), population variance
};

// The label's log-prob under each member m < M, log p_m(y) = x_label(m) * inv_temp - lse(m)
// (x_label(m): the member's raw logit of the label, lse(m): its log-normalizer), written to
// member_logp[m * stride], and the statistics over the members.
template <typename A, typename LabelLogit, typename Lse>
PYALIGN_HD EnsembleLabelStats<A> ensemble_label_stats(int64_t M, A inv_temp, LabelLogit x_label, Lse lse,
                                                      A* member_logp, int64_t stride) {
  A mx = -INFINITY;
  for (int64_t m = 0; m < M; ++m) {
    const A lp = x_label(m) * inv_temp - lse(m);
    member_logp[m * stride] = lp;
    mx = lp > mx ? lp : mx;
  }
  A s = 0, pm = 0;
  for (int64_t m = 0; m < M; ++m) {
    const A lp = member_logp[m * stride];
    s += mx == A(-INFINITY) ? A(0) : std::exp(lp - mx);
    pm += std::exp(lp);
  }
  pm /= A(M);
  A pv = 0;
  for (int64_t m = 0; m < M; ++m) {
    const A dl = std::exp(member_logp[m * stride]) - pm;
    pv += dl * dl;
  }
  return {mx == A(-INFINITY) ? mx : mx + std::log(s / A(M)), pv / A(M)};
}

// H(pbar) - mean_m H(p_m), >= 0 exactly: rounding can dip below (NaN stays NaN).
template <typename A> PYALIGN_HD A mutual_information(A total, A expected) {
  const A mi = total - expected;
  return mi < A(0) ? A(0) : mi;
}

// Weight of member m in the gradient of the ensemble log-prob: p_m(y) / sum_k p_k(y), from the
// label's transformed logit z_y, the member's log-normalizer and the ensemble log-prob.
template <typename A> PYALIGN_HD A token_member_weight(A z_label, A lse_m, A ens_logp, int64_t M) {
  return std::exp(z_label - lse_m - ens_logp) / A(M);
}

// d/dz_mv of  g log mean_k p_k(y) + gm log p_m(y)  =  scale (1[v = y] - p_mv)  with
// scale = g w_m + gm (w_m: token_member_weight), for the transformed logit z = z_mv; the kernels
// fold 1 / temperature into scale, which makes it the gradient w.r.t. the raw logit.
template <typename A> PYALIGN_HD A token_member_grad(A scale, A z, A lse_m, bool is_label) {
  return scale * ((is_label ? A(1) : A(0)) - fast_exp(z - lse_m));
}

struct TokenUncertaintyArgs {
  TensorArg logits;        // [M, ..., V] float, vocab stride 1, any leading strides
  TensorArg labels;        // [...] int32/int64 or absent
  // outputs, contiguous, fp32 (fp64 for fp64 logits)
  TensorArg total, expected, mutual_info;   // [rows]
  TensorArg ens_logp, label_var;            // [rows] (labels only)
  TensorArg member_logp;                    // [M, rows] (labels only)
  TensorArg lse;                            // [M, rows]: saved for the backward
  double inv_temp = 1;
  int64_t ignore_index = -100;
};

struct TokenUncertaintyBackwardArgs {
  TensorArg logits, labels;     // as in the forward (labels required)
  TensorArg lse;                // [M, rows] from the forward
  TensorArg ens_logp;           // [rows] from the forward
  TensorArg grad_ens_logp;      // [rows] fp32/fp64 contiguous, or absent (zero)
  TensorArg grad_member_logp;   // [M, rows] fp32/fp64 contiguous, or absent (zero)
  TensorArg grad_logits;        // like logits, vocab stride 1
  double inv_temp = 1;
  int64_t ignore_index = -100;
};

struct RewardStatsArgs {
  TensorArg rewards;     // [M, N] float, any strides
  TensorArg variances;   // [M, N] float or absent (heteroscedastic members)
  TensorArg weights;     // [M] acc dtype contiguous, normalized to sum 1, or absent (uniform)
  // outputs [N] acc dtype contiguous
  TensorArg mean, var, min, max;
  TensorArg quantile;    // or absent
  TensorArg aleatoric;   // present iff variances
  double var_denom = 1;  // variance = sum_m w_m (r_m - mean)^2 / var_denom
  double q = 0.5;
};

void token_uncertainty_forward_cpu(const TokenUncertaintyArgs& a);
void token_uncertainty_backward_cpu(const TokenUncertaintyBackwardArgs& a);
void reward_stats_cpu(const RewardStatsArgs& a);
#ifdef PYALIGN_WITH_CUDA
void token_uncertainty_forward_cuda(const TokenUncertaintyArgs& a, void* stream);
void token_uncertainty_backward_cuda(const TokenUncertaintyBackwardArgs& a, void* stream);
void reward_stats_cuda(const RewardStatsArgs& a, void* stream);
#endif

// lo + frac (hi - lo), exact at frac = 0 and for equal ends: no 0 * inf or inf - inf when the
// neighbouring order statistic is infinite.
template <typename A> PYALIGN_HD A interpolate(A lo, A hi, A frac) {
  return (frac == A(0) || lo == hi) ? lo : lo + frac * (hi - lo);
}

// Linear-interpolated quantile (torch.quantile's default) of sorted values x[0..M-1].
template <typename A> PYALIGN_HD A quantile_of_sorted(const A* x, int64_t M, double q) {
  const double pos = q * double(M - 1);
  int64_t lo = int64_t(pos);
  if (lo > M - 1) lo = M - 1;
  const int64_t hi = lo + 1 < M ? lo + 1 : lo;
  return interpolate(x[lo], x[hi], A(pos - double(lo)));
}

// Linear-interpolated quantile (torch.quantile's default) of column values x(0..M-1) read
// through `at`: the order statistics are found by rank counting (O(M^2), no workspace, the same
// code on host and device; ties are broken by member index). NaN if any value is NaN.
template <typename A, typename At> PYALIGN_HD A column_quantile(At at, int64_t M, double q) {
  const double pos = q * double(M - 1);
  int64_t lo = int64_t(pos);
  if (lo > M - 1) lo = M - 1;
  const int64_t hi = lo + 1 < M ? lo + 1 : lo;
  const A frac = A(pos - double(lo));
  A vlo = A(NAN), vhi = A(NAN);
  for (int64_t i = 0; i < M; ++i) {
    const A xi = at(i);
    if (xi != xi) return xi;
    int64_t rank = 0;
    for (int64_t j = 0; j < M; ++j) {
      const A xj = at(j);
      rank += (xj < xi || (xj == xi && j < i)) ? 1 : 0;
    }
    if (rank == lo) vlo = xi;
    if (rank == hi) vhi = xi;
  }
  return interpolate(vlo, vhi, frac);
}

}  // namespace pyalign
