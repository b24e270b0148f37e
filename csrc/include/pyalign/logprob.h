// Per-token log-probs and softmax statistics of a transformed logits row: shared math (the
// statistics themselves: softmax.h) and the interface of the CPU (csrc/cpu/logprob.cpp) and CUDA
// (csrc/cuda/logprob.cu) kernels.
#pragma once
#include "pyalign/labels.h"
#include "pyalign/softmax.h"
#include "pyalign/tensor.h"

namespace pyalign {

// z = transform(x) = softcap * tanh(scale * x / softcap) / temperature  (softcap > 0)
//                  = scale * x / temperature                          (softcap == 0)
struct LogitTransform {
  double scale_over_temp = 1;  // scale / temperature
  double softcap = 0;          // 0: no softcapping
  double inv_temp = 1;
  double scale = 1;

  // SC: softcapping on; a compile-time flag so the CPU loops stay branch-free and vectorize.
  template <bool SC, typename A> PYALIGN_HD A apply_t(A x) const {
    if (SC) return A(softcap) * fast_tanh(A(scale) * x / A(softcap)) * A(inv_temp);
    return x * A(scale_over_temp);
  }
  // dz/dx at x.
  template <bool SC, typename A> PYALIGN_HD A grad_t(A x) const {
    if (SC) {
      A t = fast_tanh(A(scale) * x / A(softcap));
      return A(scale_over_temp) * (A(1) - t * t);
    }
    return A(scale_over_temp);
  }
  template <typename A> PYALIGN_HD A apply(A x) const { return softcap > 0 ? apply_t<true>(x) : apply_t<false>(x); }
  template <typename A> PYALIGN_HD A grad(A x) const { return softcap > 0 ? grad_t<true>(x) : grad_t<false>(x); }
};

// d/dz_v of  g_lp * log p_label + g_ent * H + g_lse * lse + g_mean * mean_logit  for one
// vocabulary entry, with g_mw = g_mean * w_v / V (w_v: the entry's weight in the mean, 1 when
// unweighted). d lse/dz_v = p_v and d mean/dz_v = w_v / V.
template <typename A>
PYALIGN_HD A logprob_grad_z(A z, A lse, A ent, A g_lp, A g_ent, A g_lse, A g_mw, bool is_label) {
  A logp = z - lse;
  A p = fast_exp(logp);
  A g = (g_lse - g_lp) * p + g_mw;
  // dH/dz_v = -p_v (log p_v + H); zero (not 0 * -inf) for masked entries.
  g -= p > A(0) ? g_ent * p * (logp + ent) : A(0);
  return is_label ? g + g_lp : g;
}

struct LogprobForwardArgs {
  TensorArg logits;    // [..., V] fp32/fp16/bf16/fp64, vocab stride 1, any leading strides
  TensorArg labels;    // [...] int32/int64, any strides
  TensorArg logp;      // [rows] fp32 (fp64 for fp64 logits), contiguous
  TensorArg lse;       // [rows] same dtype as logp: saved for the backward
  TensorArg entropy, log_sum_sq, mean_logit;  // [rows] or empty (data == nullptr)
  TensorArg top1;      // [rows] bool or empty
  LogitTransform tf;
  int64_t ignore_index = -100;
  // The logits are one slice of a larger vocabulary (vocab-parallel shards, vocab chunks): a
  // label outside [0, V) that is not ignore_index then names an entry of another slice. The
  // row's statistics are those of the slice; logp is -inf and top1 false for such a label.
  bool vocab_slice = false;
  // [V] fp32 (fp64 for fp64 logits) or empty: mean_logit is then sum_v w_v z_v / V (the
  // class-weighted smoothing term of a cross-entropy). On a vocabulary slice: the weights of the
  // slice's entries, and mean_logit is the slice's sum divided by the slice's V.
  TensorArg mean_weights;
};

struct LogprobBackwardArgs {
  TensorArg logits, labels, lse, entropy;   // entropy: saved forward entropy (needed if grad_entropy)
  TensorArg grad_logp, grad_entropy;        // [rows] fp32/fp64 or empty (zero gradient)
  TensorArg grad_logits;                    // like logits (may alias it: in-place backward)
  LogitTransform tf;
  int64_t ignore_index = -100;
  // As in LogprobForwardArgs; lse and entropy are then those of the whole vocabulary, and a
  // label outside the slice contributes no label term.
  bool vocab_slice = false;
  // Upstream gradients of the forward's lse and mean_logit ([rows] like grad_logp, or empty),
  // folded into the same pass. mean_weights: [V] weights of the entries of these logits (on a
  // slice: the slice of the whole vocabulary's weights), or empty (all 1).
  TensorArg grad_lse, grad_mean, mean_weights;
  // The V that divides mean_logit = sum_v w_v z_v / mean_vocab: d mean/dz_v = w_v / mean_vocab.
  // 0 means the logits' own V; on a vocabulary slice the whole vocabulary's size (so grad_mean
  // of the global mean_logit works slice by slice).
  int64_t mean_vocab = 0;
};

void logprob_forward_cpu(const LogprobForwardArgs& a);
void logprob_backward_cpu(const LogprobBackwardArgs& a);
#ifdef PYALIGN_WITH_CUDA
void logprob_forward_cuda(const LogprobForwardArgs& a, void* stream);
void logprob_backward_cuda(const LogprobBackwardArgs& a, void* stream);
#endif

}  // namespace pyalign
