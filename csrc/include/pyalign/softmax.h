// Online softmax statistics of a row (the running max / running sum recurrence), shared by the
// log-prob and uncertainty kernels on CPU and CUDA. The CPU kernels merge per-chunk statistics;
// the CUDA threads push their logits one by one, then merge across the block (cuda/common.cuh).
#pragma once
#include "pyalign/common.h"

namespace pyalign {

// Statistics of one row, relative to the running max m:
//   s = sum exp(z - m),  d = sum exp(z - m) (z - m),  q = sum exp(2 (z - m))  (q only if SQ).
// The entropy is log s - d / s and log sum p^2 = log q - 2 log s. Keeping z - m (not z) in d
// avoids cancellation when |z| is large and the entropy small. s = d = q = 0 while m == -inf
// (nothing but masked logits seen), so push and merge never rescale from -inf (no -inf * 0).
template <typename A, bool SQ = true> struct SoftmaxStats {
  A m = -INFINITY, s = 0, d = 0, q = 0;

  // A NaN logit: the statistics become NaN, and merges keep them so.
  PYALIGN_HD void poison(A nan) {
    m = s = d = nan;
    if (SQ) q = nan;
  }
  // A chunk whose maximum is -inf is all masked, unless it holds a NaN (max skips NaN).
  PYALIGN_HD void poison_if_nan(const A* z, int64_t n) {
    for (int64_t j = 0; j < n; ++j)
      if (z[j] != z[j]) { poison(z[j]); break; }
  }

  // Adds one transformed logit (the streaming form, one logit at a time).
  PYALIGN_HD void push(A z) {
    if (z == A(-INFINITY)) return;
    if (z != z) { poison(z); return; }  // NaN survives merge (m is no longer -inf)
    if (z > m) {
      if (m != A(-INFINITY)) {  // rescale to the new max (nothing to rescale before the first)
        const A c = fast_exp(m - z);
        d = c * (d + (m - z) * s);
        s = c * s;
        if (SQ) q = c * c * q;
      }
      m = z;
    }
    const A t = z - m, e = fast_exp(t);
    s += e;
    d += e * t;
    if (SQ) q += e * e;
  }

  // Merges another partial result (a chunk's, or another thread's in a block reduction).
  PYALIGN_HD void merge(const SoftmaxStats& o) {
    if (o.m == A(-INFINITY)) return;
    if (m == A(-INFINITY)) { *this = o; return; }
    A nm = m > o.m ? m : o.m;
    A ca = fast_exp(m - nm), cb = fast_exp(o.m - nm);
    // sum e^{z-nm}(z-nm) = c * (sum e^{z-m}(z-m) + (m - nm) * sum e^{z-m})
    d = ca * (d + (m - nm) * s) + cb * (o.d + (o.m - nm) * o.s);
    s = ca * s + cb * o.s;
    if (SQ) q = ca * ca * q + cb * cb * o.q;
    m = nm;
  }
  PYALIGN_HD A lse() const { return m + std::log(s); }
  PYALIGN_HD A entropy() const { return std::log(s) - d / s; }
  PYALIGN_HD A log_sum_sq() const { return std::log(q) - A(2) * std::log(s); }
};

}  // namespace pyalign
