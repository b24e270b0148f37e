// Plasticity family: the elementwise part of every local learning-rule update and of the
// consolidation penalties, shared by the CPU (csrc/cpu/plasticity.cpp) and CUDA
// (csrc/cuda/plasticity.cu) kernels. The matrix products (y^T x, tril(y^T y) w) are computed by
// torch.matmul in Python; one kernel then reads and writes the weight once.
#pragma once
#include "pyalign/contract.h"
#include "pyalign/tensor.h"

namespace pyalign {

// One update of a weight w [out, in] from matmul results G (and optionally G2) [out, in]:
//
//   e'  = lam * e + s * G                              (only with a trace e)
//   d   = a * G + b * e + c * G2                       (e: the trace before this update)
//   w'  = keep * w + lr * (d - r_i * w)                (keep = 1 - lr * weight_decay)
//   w'' = clip(s_i * w', w_min, w_max)
//
// where r_i is an optional per-row coefficient (Oja: mean_b y_bi^2; SoftHebb: mean_b y_bi u_bi)
// and s_i rescales row i to the norm target (1 without a norm constraint):
//   norm_mode 1 ("max"):   s_i = min(1, norm / |w'_i|)
//   norm_mode 2 ("exact"): s_i = norm / |w'_i|   (rows of norm 0 stay 0)
// Clipping comes last, so the bounds always hold; when w_min <= 0 <= w_max clipping only
// shrinks magnitudes, so the norm constraint holds too. Without G (no e and G2 then either) the
// update is the formula with G = 0: the row scaling r_i and keep of a weight that a GEMM updates
// (into the weight itself) after or before this pass, or, with keep = 1 and lr = 0, only the norm
// scaling and clipping of a weight that a GEMM already updated.
struct PlasticCoeffs {
  double a = 1, b = 0, c = 0, lam = 0, s = 1;
  double lr = 0, keep = 1;
  double w_min = -INFINITY, w_max = INFINITY;
  double norm = 0;
  int norm_mode = 0;  // 0: none, 1: max, 2: exact
};

// w' (before the norm scaling and clipping) for one element; writes the new trace value.
template <typename A>
PYALIGN_HD A plastic_value(const PlasticCoeffs& k, A w, A g, A e, A g2, A r, A* e_new) {
  *e_new = A(k.lam) * e + A(k.s) * g;
  const A d = A(k.a) * g + A(k.b) * e + A(k.c) * g2;
  return A(k.keep) * w + A(k.lr) * (d - r * w);
}

template <typename A> PYALIGN_HD A clip_value(A v, A lo, A hi) {
  v = v < lo ? lo : v;  // NaN passes through unchanged
  return v > hi ? hi : v;
}

// Row scale from the squared norm of the updated row.
template <typename A> PYALIGN_HD A norm_scale(int mode, A target, A sumsq) {
  if (mode == 0) return A(1);
  const A n = std::sqrt(sumsq);
  if (mode == 1) return n > target ? target / n : A(1);
  return n > A(0) ? target / n : A(1);
}

struct PlasticArgs {
  TensorArg w;      // [out, in] f32/f16/bf16 (f64 on CPU), updated in place; stride 1 along in
  TensorArg g;      // optional [out, in] f32 (f64 for f64 w), stride 1 along in
  TensorArg g2;     // optional, like g
  TensorArg e;      // optional trace [out, in], like g, updated in place
  TensorArg r;      // optional [out] f32 (f64), contiguous
  PlasticCoeffs k;
};

// Quadratic consolidation penalty of one parameter (EWC, SI, MAS), flattened to 1-d:
//   penalty = coef * sum_i imp_i (p_i - anchor_i)^2,   grad_i += 2 coef imp_i (p_i - anchor_i)
// The sum is written as fixed-size chunk partials (kPenaltyChunk elements each, summed in a fixed
// order within a chunk), so the result does not depend on the thread or block count.

template <typename A> PYALIGN_HD A penalty_term(A p, A anchor, A imp, A coef, A* grad) {
  const A d = p - anchor;
  *grad = A(2) * coef * imp * d;
  return coef * imp * d * d;
}

struct PenaltyArgs {
  TensorArg p;        // [n] f32/f16/bf16 (f64 on CPU), contiguous
  TensorArg anchor;   // [n] same dtype as p, contiguous
  TensorArg imp;      // [n] f32 (f64 for f64 p), contiguous
  TensorArg grad;     // optional [n] same dtype as p, contiguous, accumulated in place
  TensorArg partial;  // [ceil(n / kPenaltyChunk)] f32 (f64 for f64 p)
  double coef = 1;
};

void plastic_update_cpu(const PlasticArgs& a);
void quad_penalty_cpu(const PenaltyArgs& a);
#ifdef PYALIGN_WITH_CUDA
void plastic_update_cuda(const PlasticArgs& a, void* stream);
void quad_penalty_cuda(const PenaltyArgs& a, void* stream);
#endif

}  // namespace pyalign
