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
// Pass 1 over each member's row: online softmax statistics (lse_m, H_m). Pass 2: pbar chunk by
// chunk and sum pbar log pbar. No [M, tokens, V] tensor is formed.
//
// Reward ensembles, rewards [M, N]: per column the (weighted) mean, variance, min, max, a
// linearly interpolated quantile and the mean of per-member variances (aleatoric part).
#pragma once
#include "pyalign/logprob.h"

namespace pyalign {

// log(x) for finite x > 0 that the host compiler can inline and vectorize (#pragma omp simd):
// x = 2^e * m with m in [sqrt(1/2), sqrt(2)), log(m) by the Cephes degree-9 polynomial in m - 1
// (max rel. error ~2 ulp). Returns -inf for x == 0 (callers guard 0 * log 0 themselves).
PYALIGN_HD float fast_log(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  uint32_t u = float_to_bits(x);
  // Subnormals are scaled up by 2^23 first so their exponent is read correctly.
  const bool sub = u < 0x00800000u;
  const float xs = sub ? x * 8388608.0f : x;
  u = float_to_bits(xs);
  int32_t e = int32_t(u >> 23) - 127 - (sub ? 23 : 0);
  float m = bits_to_float((u & 0x007fffffu) | 0x3f800000u);  // [1, 2)
  const bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1 : e;
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
  const float ef = float(e);
  y += -2.12194440e-4f * ef;
  y += -0.5f * z;
  float r = f + y + 0.693359375f * ef;
  r = x == 0.0f ? -INFINITY : r;
  return x != x ? x : r;
#endif
}
PYALIGN_HD double fast_log(double x) { return std::log(x); }

// -p log p, 0 at p == 0.
template <typename A> PYALIGN_HD A neg_plogp(A p) { return p > A(0) ? -p * fast_log(p) : A(0); }

// Weight of member m in the gradient of the ensemble log-prob: p_m(y) / sum_k p_k(y), from the
// label's transformed logit z_y, the member's log-normalizer and the ensemble log-prob.
template <typename A> PYALIGN_HD A token_member_weight(A z_label, A lse_m, A ens_logp, int64_t M) {
  return std::exp(z_label - lse_m - ens_logp) / A(M);
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
  return vlo + frac * (vhi - vlo);
}

}  // namespace pyalign
