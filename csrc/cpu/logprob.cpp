// CPU kernels of the log-prob family: one read of each logits row for the forward (online
// max/sum over L1-sized chunks), one read and one write for the backward.
#include "pyalign/logprob.h"
#include "pyalign/cpu_dispatch.h"

#include <algorithm>

namespace pyalign {
namespace {

constexpr int64_t kChunk = 512;  // a chunk of transformed logits stays in L1

struct FwdCtx {
  LogprobForwardArgs a;
  RowIndexer logits_rows, label_rows;
  int64_t V;
};

template <typename T, bool ENT, bool SQ, bool SC>
PYALIGN_HD void forward_row(const FwdCtx& c, int64_t r) {
  using A = typename acc_type<T>::type;
  const LogprobForwardArgs& a = c.a;
  const int64_t V = c.V;
  const int64_t label = read_label(a.labels, c.label_rows.offset(r));
  A* logp = a.logp.ptr<A>();
  A* lse_out = a.lse.ptr<A>();
  auto write_optional = [&](A ent, A lss, A mean, bool top1) {
    if (a.entropy.data) a.entropy.ptr<A>()[r] = ent;
    if (a.log_sum_sq.data) a.log_sum_sq.ptr<A>()[r] = lss;
    if (a.mean_logit.data) a.mean_logit.ptr<A>()[r] = mean;
    if (a.top1.data) a.top1.ptr<bool>()[r] = top1;
  };
  if (label == a.ignore_index) {
    logp[r] = 0; lse_out[r] = 0;
    write_optional(0, 0, 0, false);
    return;
  }
  const bool in_slice = label_in_vocab(label, V);
  if (!in_slice && !a.vocab_slice) bad_label(r, label, V, a.ignore_index);

  const T* row = a.logits.ptr<T>() + c.logits_rows.offset(r);
  const LogitTransform tf = a.tf;
  const bool want_mean = a.mean_logit.data != nullptr;
  const A* mw = a.mean_weights.data ? a.mean_weights.ptr<A>() : nullptr;
  const bool extras = want_mean || a.top1.data != nullptr;  // the row's raw max and the logits' sum
  A buf[kChunk];
  SoftmaxStats<A, SQ> st;
  A zsum = 0, xmax = -INFINITY;
  int64_t argmax = 0;
  for (int64_t j0 = 0; j0 < V; j0 += kChunk) {
    const int64_t n = std::min(kChunk, V - j0);
    A bm = -INFINITY, bx = 0, bxm = -INFINITY;
    if (extras) {
#pragma omp simd reduction(max : bm, bxm) reduction(+ : bx)
      for (int64_t j = 0; j < n; ++j) {
        A x = to_float(row[j0 + j]);
        A z = tf.apply_t<SC>(x);
        buf[j] = z;
        bm = z > bm ? z : bm;
        bxm = x > bxm ? x : bxm;
        bx += z;
      }
    } else {  // only the softmax statistics: the raw max and the sum are not asked for
#pragma omp simd reduction(max : bm)
      for (int64_t j = 0; j < n; ++j) {
        A z = tf.apply_t<SC>(A(to_float(row[j0 + j])));
        buf[j] = z;
        bm = z > bm ? z : bm;
      }
    }
    if (want_mean) {
      if (mw) {  // class-weighted mean: a second sweep of the chunk while it is in L1
        A ws = 0;
#pragma omp simd reduction(+ : ws)
        for (int64_t j = 0; j < n; ++j) ws += buf[j] * mw[j0 + j];
        zsum += ws;
      } else {
        zsum += bx;
      }
    }
    if (extras && bxm > xmax) {  // a new row maximum: find its first index (ties go to the first, as argmax)
      xmax = bxm;
      for (int64_t j = 0; j < n; ++j)
        if (A(to_float(row[j0 + j])) == bxm) { argmax = j0 + j; break; }
    }
    if (bm == A(-INFINITY)) {  // all masked in this chunk, unless a NaN hides there
      st.poison_if_nan(buf, n);
      continue;
    }
    A s = 0, d = 0, q = 0;
#pragma omp simd reduction(+ : s, d, q)
    for (int64_t j = 0; j < n; ++j) {
      A t = buf[j] - bm;
      A e = fast_exp_nonpos(t);
      s += e;
      if (ENT) d += e > A(0) ? e * t : A(0);
      if (SQ) q += e * e;
    }
    st.merge({bm, s, d, q});
  }
  // The label's transformed logit is recomputed from its (single) element rather than kept.
  const A x_label = in_slice ? A(to_float(row[label])) : A(-INFINITY);
  const A z_label = in_slice ? tf.apply_t<SC>(x_label) : A(-INFINITY);
  const A lse = st.lse();
  logp[r] = z_label - lse;
  lse_out[r] = lse;
  write_optional(ENT ? st.entropy() : A(0), SQ ? st.log_sum_sq() : A(0), zsum / A(V),
                 in_slice && label == argmax);
}

PYALIGN_CPU_CLONES(forward_rows, forward_row, FwdCtx,
                   typename T COMMA bool ENT COMMA bool SQ COMMA bool SC, T COMMA ENT COMMA SQ COMMA SC)

struct BwdCtx {
  LogprobBackwardArgs a;
  RowIndexer logits_rows, label_rows, grad_rows;
  int64_t V;
};

template <typename T, bool ENT, bool SC> PYALIGN_HD void backward_row(const BwdCtx& c, int64_t r) {
  using A = typename acc_type<T>::type;
  const LogprobBackwardArgs& a = c.a;
  const int64_t V = c.V;
  const int64_t label = read_label(a.labels, c.label_rows.offset(r));
  T* out = a.grad_logits.ptr<T>() + c.grad_rows.offset(r);
  const A g_lp = a.grad_logp.data ? a.grad_logp.ptr<A>()[r] : A(0);
  const A g_ent = ENT ? a.grad_entropy.ptr<A>()[r] : A(0);
  const A g_lse = a.grad_lse.data ? a.grad_lse.ptr<A>()[r] : A(0);
  const A g_mean = a.grad_mean.data ? a.grad_mean.ptr<A>()[r] : A(0);
  if (label == a.ignore_index || (g_lp == A(0) && g_ent == A(0) && g_lse == A(0) && g_mean == A(0))) {
    const T zero = from_float<T>(0.f);
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) out[j] = zero;
    return;
  }
  if (!label_in_vocab(label, V) && !a.vocab_slice) bad_label(r, label, V, a.ignore_index);
  const T* row = a.logits.ptr<T>() + c.logits_rows.offset(r);
  const A lse = a.lse.ptr<A>()[r];
  const A ent = ENT ? a.entropy.ptr<A>()[r] : A(0);
  const A g_m = g_mean / A(a.mean_vocab > 0 ? a.mean_vocab : V);  // d mean / dz_v = w_v / V_mean
  const LogitTransform tf = a.tf;
  if (a.mean_weights.data && g_m != A(0)) {
    const A* mw = a.mean_weights.ptr<A>();
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) {
      A x = to_float(row[j]);
      A gz = logprob_grad_z<A>(tf.apply_t<SC>(x), lse, ent, g_lp, g_ent, g_lse, g_m * mw[j], j == label);
      out[j] = to_storage<T, A>(gz * tf.grad_t<SC>(x));
    }
    return;
  }
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) {
    A x = to_float(row[j]);
    A gz = logprob_grad_z<A>(tf.apply_t<SC>(x), lse, ent, g_lp, g_ent, g_lse, g_m, j == label);
    out[j] = to_storage<T, A>(gz * tf.grad_t<SC>(x));
  }
}
PYALIGN_CPU_CLONES(backward_rows, backward_row, BwdCtx, typename T COMMA bool ENT COMMA bool SC,
                   T COMMA ENT COMMA SC)

int64_t grain_for(int64_t V) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1)); }

template <typename T, bool SC> void forward_sc(const FwdCtx& c, int64_t b, int64_t e, bool ent, bool sq) {
  if (ent && sq) forward_rows<T, true, true, SC>(c, b, e);
  else if (ent) forward_rows<T, true, false, SC>(c, b, e);
  else if (sq) forward_rows<T, false, true, SC>(c, b, e);
  else forward_rows<T, false, false, SC>(c, b, e);
}

template <typename T> void forward_typed(const FwdCtx& c, int64_t rows) {
  const bool ent = c.a.entropy.data != nullptr, sq = c.a.log_sum_sq.data != nullptr;
  const bool sc = c.a.tf.softcap > 0;
  parallel_rows(rows, grain_for(c.V), [&](int64_t b, int64_t e) {
    if (sc) forward_sc<T, true>(c, b, e, ent, sq);
    else forward_sc<T, false>(c, b, e, ent, sq);
  });
}

template <typename T> void backward_typed(const BwdCtx& c, int64_t rows) {
  const bool ent = c.a.grad_entropy.data != nullptr, sc = c.a.tf.softcap > 0;
  parallel_rows(rows, grain_for(c.V), [&](int64_t b, int64_t e) {
    if (ent && sc) backward_rows<T, true, true>(c, b, e);
    else if (ent) backward_rows<T, true, false>(c, b, e);
    else if (sc) backward_rows<T, false, true>(c, b, e);
    else backward_rows<T, false, false>(c, b, e);
  });
}

}  // namespace

void logprob_forward_cpu(const LogprobForwardArgs& a) {
  FwdCtx c{a, RowIndexer(a.logits, a.logits.ndim - 1), RowIndexer(a.labels, a.labels.ndim), a.logits.size(-1)};
  const int64_t rows = a.labels.numel();
  switch (a.logits.dtype) {
    case DType::f32: forward_typed<float>(c, rows); break;
    case DType::bf16: forward_typed<bf16_t>(c, rows); break;
    case DType::f16: forward_typed<f16_t>(c, rows); break;
    case DType::f64: forward_typed<double>(c, rows); break;
    default: fail("logits: unsupported dtype " + std::string(dtype_name(a.logits.dtype)));
  }
}

void logprob_backward_cpu(const LogprobBackwardArgs& a) {
  BwdCtx c{a, RowIndexer(a.logits, a.logits.ndim - 1), RowIndexer(a.labels, a.labels.ndim),
           RowIndexer(a.grad_logits, a.grad_logits.ndim - 1), a.logits.size(-1)};
  const int64_t rows = a.labels.numel();
  switch (a.logits.dtype) {
    case DType::f32: backward_typed<float>(c, rows); break;
    case DType::bf16: backward_typed<bf16_t>(c, rows); break;
    case DType::f16: backward_typed<f16_t>(c, rows); break;
    case DType::f64: backward_typed<double>(c, rows); break;
    default: fail("logits: unsupported dtype " + std::string(dtype_name(a.logits.dtype)));
  }
}

}  // namespace pyalign
