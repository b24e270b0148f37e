// CPU kernels of the uncertainty family. token_uncertainty: tokens across OpenMP threads; per
// token, one read of each member's row (online max/sum over L1-sized chunks, vectorized
// fast_exp) that also keeps exp(z - chunk max) in a per-thread [M, V] scratch (L2-resident for
// usual sizes); the mean distribution is then rebuilt from the scratch with one scale per member
// and chunk and -pbar log pbar summed (vectorized neg_plogp): one exp per logit, one log per
// vocabulary entry. Backward: one read and one write per member row.
// Reward statistics: columns across threads, members in a fixed order (deterministic).
#include "pyalign/uncertainty.h"
#include "pyalign/cpu_dispatch.h"

#include <algorithm>
#include <string>
#include <vector>

namespace pyalign {
namespace {

constexpr int64_t kChunk = 512;  // a chunk of transformed logits stays in L1

struct TokCtx {
  TokenUncertaintyArgs a;
  RowIndexer logits_rows, label_rows;
  int64_t M, rows, V;
};

// Per-thread view: the shared context plus the thread's scratch for one token (all members):
// exp(z - chunk max) for every logit [M * V] and one scale per member and chunk [M * chunks].
template <typename A> struct TokThread {
  const TokCtx* c;
  A* ws;
  A* scale;
  A* buf;  // [kChunk]
};

template <typename T, bool LAB> PYALIGN_HD void token_row(const TokThread<typename acc_type<T>::type>& th, int64_t r) {
  using A = typename acc_type<T>::type;
  const TokCtx& c = *th.c;
  const TokenUncertaintyArgs& a = c.a;
  const int64_t M = c.M, rows = c.rows, V = c.V;
  const int64_t nch = (V + kChunk - 1) / kChunk;
  A* lse = a.lse.ptr<A>();
  int64_t label = 0;
  if (LAB) {
    label = read_label(a.labels, c.label_rows.offset(r));
    if (label == a.ignore_index) {
      a.total.ptr<A>()[r] = 0; a.expected.ptr<A>()[r] = 0; a.mutual_info.ptr<A>()[r] = 0;
      a.ens_logp.ptr<A>()[r] = 0; a.label_var.ptr<A>()[r] = 0;
      for (int64_t m = 0; m < M; ++m) { lse[m * rows + r] = 0; a.member_logp.ptr<A>()[m * rows + r] = 0; }
      return;
    }
    if (!label_in_vocab(label, V)) bad_label(r, label, V, a.ignore_index);
  }
  const A it = A(a.inv_temp);
  const T* base = a.logits.ptr<T>();
  const A inv_m = A(1) / A(M);

  // The only pass over the logits: per member and chunk, e = exp(z - chunk max) into the
  // scratch (L2-resident for usual M x V) and online softmax statistics (lse_m, H_m).
  A ent_sum = 0;
  for (int64_t m = 0; m < M; ++m) {
    const T* row = base + c.logits_rows.offset(m * rows + r);
    A* ws = th.ws + m * V;
    A* sc = th.scale + m * nch;
    SoftmaxStats<A, false> st;
    for (int64_t ci = 0; ci < nch; ++ci) {
      const int64_t j0 = ci * kChunk, n = std::min(kChunk, V - j0);
      A* w = ws + j0;
      A bm = -INFINITY;
#pragma omp simd reduction(max : bm)
      for (int64_t j = 0; j < n; ++j) {
        A z = A(to_float(row[j0 + j])) * it;
        w[j] = z;
        bm = z > bm ? z : bm;
      }
      sc[ci] = bm;
      if (bm == A(-INFINITY)) {  // an all-masked chunk contributes nothing, unless a NaN hides there
        st.poison_if_nan(w, n);
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) w[j] = 0;
        continue;
      }
      A s = 0, d = 0;
#pragma omp simd reduction(+ : s, d)
      for (int64_t j = 0; j < n; ++j) {
        A t = w[j] - bm;
        A e = fast_exp(t);
        w[j] = e;
        s += e;
        d += e > A(0) ? e * t : A(0);
      }
      st.merge({bm, s, d});
    }
    const A l = st.lse();
    lse[m * rows + r] = l;
    ent_sum += st.entropy();
    // p_mv = e_v * exp(chunk max - lse_m); the 1/M of the mean is folded in.
    for (int64_t ci = 0; ci < nch; ++ci)
      sc[ci] = sc[ci] == A(-INFINITY) ? A(0) : std::exp(sc[ci] - l) * inv_m;
  }

  // The label's probability under each member, their log-mean and variance.
  if (LAB) {
    const EnsembleLabelStats<A> ls = ensemble_label_stats<A>(
        M, it, [&](int64_t m) { return A(to_float(base[c.logits_rows.offset(m * rows + r) + label])); },
        [&](int64_t m) { return lse[m * rows + r]; }, a.member_logp.ptr<A>() + r, rows);
    a.ens_logp.ptr<A>()[r] = ls.logp;
    a.label_var.ptr<A>()[r] = ls.var;
  }

  // Entropy of the mean distribution, from the scratch (no second exp).
  A* buf = th.buf;
  A tot = 0;
  for (int64_t ci = 0; ci < nch; ++ci) {
    const int64_t j0 = ci * kChunk, n = std::min(kChunk, V - j0);
    {
      const A* w = th.ws + j0;
      const A f = th.scale[ci];
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) buf[j] = w[j] * f;
    }
    for (int64_t m = 1; m < M; ++m) {
      const A* w = th.ws + m * V + j0;
      const A f = th.scale[m * nch + ci];
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) buf[j] += w[j] * f;
    }
    A acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < n; ++j) acc += neg_plogp(buf[j]);
    tot += acc;
  }
  const A expected = ent_sum * inv_m;
  a.total.ptr<A>()[r] = tot;
  a.expected.ptr<A>()[r] = expected;
  a.mutual_info.ptr<A>()[r] = mutual_information(tot, expected);
}

PYALIGN_CPU_CLONES(token_rows, token_row, TokThread<typename acc_type<T>::type>, typename T COMMA bool LAB,
                   T COMMA LAB)

struct TokBwdCtx {
  TokenUncertaintyBackwardArgs a;
  RowIndexer logits_rows, label_rows, grad_rows;
  int64_t M, rows, V;
};

// d/dx_mv log mean_k p_k(y) = w_m (1[v = y] - p_mv) / temperature, w_m = p_m(y) / sum_k p_k(y);
// d/dx_mv log p_m(y) = (1[v = y] - p_mv) / temperature (token_member_grad).
template <typename T> PYALIGN_HD void token_bwd_row(const TokBwdCtx& c, int64_t fr) {
  using A = typename acc_type<T>::type;
  const TokenUncertaintyBackwardArgs& a = c.a;
  const int64_t rows = c.rows, V = c.V;
  const int64_t r = fr % rows;
  const int64_t label = read_label(a.labels, c.label_rows.offset(r));
  T* out = a.grad_logits.ptr<T>() + c.grad_rows.offset(fr);
  const T* row = a.logits.ptr<T>() + c.logits_rows.offset(fr);
  const A it = A(a.inv_temp);
  const bool ok = label != a.ignore_index;
  if (ok && !label_in_vocab(label, V)) bad_label(r, label, V, a.ignore_index);
  const A l = ok ? a.lse.ptr<A>()[fr] : A(0);
  const A g = ok && a.grad_ens_logp.data ? a.grad_ens_logp.ptr<A>()[r] : A(0);
  const A gm = ok && a.grad_member_logp.data ? a.grad_member_logp.ptr<A>()[fr] : A(0);
  const A w = g != A(0) ? token_member_weight<A>(A(to_float(row[label])) * it, l, a.ens_logp.ptr<A>()[r], c.M) : A(0);
  const A scale = (g * w + gm) * it;
  if (scale == A(0)) {
    const T zero = from_float<T>(0.f);
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) out[j] = zero;
    return;
  }
#pragma omp simd
  for (int64_t j = 0; j < V; ++j)
    out[j] = to_storage<T, A>(token_member_grad<A>(scale, A(to_float(row[j])) * it, l, j == label));
}

PYALIGN_CPU_CLONES(token_bwd_rows, token_bwd_row, TokBwdCtx, typename T, T)

int64_t grain_for(int64_t work) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(work, 1)); }

template <typename T> void token_forward_typed(const TokCtx& c) {
  using A = typename acc_type<T>::type;
  const bool lab = c.a.labels.present();
  const int64_t nch = (c.V + kChunk - 1) / kChunk;
  parallel_rows(c.rows, grain_for(c.V * c.M), [&](int64_t b, int64_t e) {
    // Thread scratch: O(M x V), independent of the number of tokens.
    std::vector<A> ws(size_t(c.M * c.V)), scale(size_t(c.M * nch)), buf(static_cast<size_t>(kChunk));
    const TokThread<A> th{&c, ws.data(), scale.data(), buf.data()};
    if (lab) token_rows<T, true>(th, b, e);
    else token_rows<T, false>(th, b, e);
  });
}

template <typename T> void token_backward_typed(const TokBwdCtx& c) {
  parallel_rows(c.M * c.rows, grain_for(c.V), [&](int64_t b, int64_t e) { token_bwd_rows<T>(c, b, e); });
}

// ---- reward statistics over the member dimension ----

constexpr int64_t kCols = 256;
constexpr int64_t kLocal = 128;

template <typename T> void reward_cols(const RewardStatsArgs& a, int64_t n0, int64_t n1) {
  using A = typename acc_type<T>::type;
  const int64_t M = a.rewards.shape[0];
  const int64_t s0 = a.rewards.strides[0], s1 = a.rewards.strides[1];
  const T* R = a.rewards.ptr<T>();
  const A* w = a.weights.data ? a.weights.ptr<A>() : nullptr;
  const A uni = A(1) / A(M);
  A mean[kCols], mn[kCols], mx[kCols], v[kCols];
  bool nan[kCols];  // per column: chunks follow the thread partition, so nothing may be shared across columns
  for (int64_t c0 = n0; c0 < n1; c0 += kCols) {
    const int64_t n = std::min(kCols, n1 - c0);
    for (int64_t j = 0; j < n; ++j) { mean[j] = 0; mn[j] = INFINITY; mx[j] = -INFINITY; v[j] = 0; nan[j] = false; }
    for (int64_t m = 0; m < M; ++m) {
      const A wm = w ? w[m] : uni;
      const T* row = R + m * s0 + c0 * s1;
      for (int64_t j = 0; j < n; ++j) {
        A x = to_float(row[j * s1]);
        mean[j] += wm * x;
        mn[j] = x < mn[j] ? x : mn[j];
        mx[j] = x > mx[j] ? x : mx[j];
        nan[j] = nan[j] || x != x;
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      const A wm = w ? w[m] : uni;
      const T* row = R + m * s0 + c0 * s1;
      for (int64_t j = 0; j < n; ++j) {
        A dlt = A(to_float(row[j * s1])) - mean[j];
        v[j] += wm * dlt * dlt;
      }
    }
    for (int64_t j = 0; j < n; ++j) {
      const int64_t col = c0 + j;
      a.mean.ptr<A>()[col] = mean[j];
      a.var.ptr<A>()[col] = v[j] / A(a.var_denom);
      // min/max propagate NaN like torch.amin/amax (a NaN in the column; never inf - inf in the mean).
      a.min.ptr<A>()[col] = nan[j] ? A(NAN) : mn[j];
      a.max.ptr<A>()[col] = nan[j] ? A(NAN) : mx[j];
    }
    if (a.quantile.data) {
      A local[kLocal];  // the column's values, contiguous, when M is small (the usual case)
      for (int64_t j = 0; j < n; ++j) {
        const T* col = R + (c0 + j) * s1;
        if (M <= kLocal) {
          // Insertion sort of the (small) column: the same value as column_quantile's ranks.
          bool has_nan = false;
          for (int64_t i = 0; i < M; ++i) {
            const A x = to_float(col[i * s0]);
            has_nan |= x != x;
            int64_t k = i;
            for (; k > 0 && local[k - 1] > x; --k) local[k] = local[k - 1];
            local[k] = x;
          }
          a.quantile.ptr<A>()[c0 + j] = has_nan ? A(NAN) : quantile_of_sorted<A>(local, M, a.q);
        } else {
          auto at = [&](int64_t i) { return A(to_float(col[i * s0])); };
          a.quantile.ptr<A>()[c0 + j] = column_quantile<A>(at, M, a.q);
        }
      }
    }
    if (a.aleatoric.data) {
      const T* Vr = a.variances.ptr<T>();
      const int64_t t0 = a.variances.strides[0], t1 = a.variances.strides[1];
      for (int64_t j = 0; j < n; ++j) v[j] = 0;
      for (int64_t m = 0; m < M; ++m) {
        const A wm = w ? w[m] : uni;
        const T* row = Vr + m * t0 + c0 * t1;
        for (int64_t j = 0; j < n; ++j) v[j] += wm * A(to_float(row[j * t1]));
      }
      for (int64_t j = 0; j < n; ++j) a.aleatoric.ptr<A>()[c0 + j] = v[j];
    }
  }
}

}  // namespace

void token_uncertainty_forward_cpu(const TokenUncertaintyArgs& a) {
  const int64_t M = a.logits.shape[0], V = a.logits.size(-1);
  const int64_t rows = M > 0 ? a.logits.numel() / (M * V) : 0;
  TokCtx c{a, RowIndexer(a.logits, a.logits.ndim - 1),
           a.labels.present() ? RowIndexer(a.labels, a.labels.ndim) : RowIndexer(), M, rows, V};
  switch (a.logits.dtype) {
    case DType::f32: token_forward_typed<float>(c); break;
    case DType::bf16: token_forward_typed<bf16_t>(c); break;
    case DType::f16: token_forward_typed<f16_t>(c); break;
    case DType::f64: token_forward_typed<double>(c); break;
    default: fail("logits: unsupported dtype " + std::string(dtype_name(a.logits.dtype)));
  }
}

void token_uncertainty_backward_cpu(const TokenUncertaintyBackwardArgs& a) {
  const int64_t M = a.logits.shape[0], V = a.logits.size(-1);
  const int64_t rows = M > 0 ? a.logits.numel() / (M * V) : 0;
  TokBwdCtx c{a, RowIndexer(a.logits, a.logits.ndim - 1), RowIndexer(a.labels, a.labels.ndim),
              RowIndexer(a.grad_logits, a.grad_logits.ndim - 1), M, rows, V};
  switch (a.logits.dtype) {
    case DType::f32: token_backward_typed<float>(c); break;
    case DType::bf16: token_backward_typed<bf16_t>(c); break;
    case DType::f16: token_backward_typed<f16_t>(c); break;
    case DType::f64: token_backward_typed<double>(c); break;
    default: fail("logits: unsupported dtype " + std::string(dtype_name(a.logits.dtype)));
  }
}

void reward_stats_cpu(const RewardStatsArgs& a) {
  const int64_t N = a.rewards.shape[1];
  const int64_t grain = std::max<int64_t>(kCols, 65536 / std::max<int64_t>(a.rewards.shape[0], 1));
  auto run = [&](auto tag) {
    using T = decltype(tag);
    parallel_rows(N, grain, [&](int64_t b, int64_t e) { reward_cols<T>(a, b, e); });
  };
  switch (a.rewards.dtype) {
    case DType::f32: run(float{}); break;
    case DType::bf16: run(bf16_t{}); break;
    case DType::f16: run(f16_t{}); break;
    case DType::f64: run(double{}); break;
    default: fail("rewards: unsupported dtype " + std::string(dtype_name(a.rewards.dtype)));
  }
}

}  // namespace pyalign
