// CPU driver of the distillation divergences (math in pyalign/distill.h): rows across OpenMP
// threads, each row by one thread: the two softmax statistics in one read of each logits row (online,
// per L1-sized chunk), then the divergence's row sums, then the gradients (for the forward KL
// without a teacher gradient, the student's gradient is written with the sums), sweeps that a row's
// few hundred KiB keep in cache. The loops vectorize (ISA clones, PYALIGN_CPU_CLONES) with the
// divergence fixed at compile time; the total in row order on one thread. Deterministic whatever the
// thread count.
#include "pyalign/cpu_dispatch.h"
#include "pyalign/distill.h"
#include "pyalign/labels.h"

#include <algorithm>

namespace pyalign {
namespace {

constexpr int64_t kRowGrain = 4;  // rows per thread below which a second thread costs more than it saves
constexpr int64_t kChunk = 512;   // a chunk of a row stays in L1

// The log-sum-exp of a row of transformed logits, in one read: per chunk its max, then its sum of exps
// relative to the running max (the earlier chunks' sum rescaled when the max grows). -inf for a row
// without a finite logit; NaN for a row holding NaN.
template <typename T, bool SC, typename A = typename acc_type<T>::type>
PYALIGN_HD A row_lse(const T* x, int64_t V, const LogitTransform& tf) {
  A m = -INFINITY, s = 0;
  for (int64_t j0 = 0; j0 < V; j0 += kChunk) {
    const int64_t n = std::min(kChunk, V - j0);
    A cm = -INFINITY;
#pragma omp simd reduction(max : cm)
    for (int64_t j = 0; j < n; ++j) {
      const A z = tf.apply_t<SC>(A(to_float(x[j0 + j])));
      cm = z > cm ? z : cm;
    }
    if (cm > m) {
      s = m == A(-INFINITY) ? A(0) : s * fast_exp(m - cm);
      m = cm;
    }
    if (m == A(-INFINITY)) continue;
    A cs = 0;
#pragma omp simd reduction(+ : cs)
    for (int64_t j = 0; j < n; ++j) cs += fast_exp(tf.apply_t<SC>(A(to_float(x[j0 + j]))) - m);
    s += cs;
  }
  return m == A(-INFINITY) ? m : m + std::log(s);
}

// SS, ST: softcapping of the student's, the teacher's logits.
template <typename T, DivMode M, bool SS, bool ST> PYALIGN_HD void distill_row(const DistillArgs& a, int64_t r) {
  using A = typename acc_type<T>::type;
  const DistillParams& p = a.p;
  const int64_t V = a.student.shape[1];
  A* gs = a.grad_student.ptr<A>() + r * V;
  A* gt = a.grad_teacher.data ? a.grad_teacher.ptr<A>() + r * V : nullptr;
  if (a.labels.data && read_label(a.labels, r * a.labels.strides[0]) == p.ignore_index) {
    a.loss.ptr<A>()[r] = A(0);
    std::fill(gs, gs + V, A(0));
    if (gt) std::fill(gt, gt + V, A(0));
    return;
  }
  const T* xs = a.student.ptr<T>() + r * a.student.strides[0];
  const T* xt = a.teacher.ptr<T>() + r * a.teacher.strides[0];
  const A beta = A(p.beta);
  const LogitTransform ts = p.ts, tt = p.tt;
  const A lse_s = row_lse<T, SS>(xs, V, ts), lse_t = row_lse<T, ST>(xt, V, tt);
  const A w = a.weight.ptr<A>()[r];
  // the forward KL's student gradient, p_s - p_t, needs no row sum: written in the same sweep
  const bool fused_student = M == DivMode::forward_kl;
  A ks = 0, kt = 0;
#pragma omp simd reduction(+ : ks, kt)
  for (int64_t j = 0; j < V; ++j) {
    const A x = A(to_float(xs[j]));
    const DivEntry<A> e = div_entry<M, A>(ts.apply_t<SS>(x) - lse_s, tt.apply_t<ST>(A(to_float(xt[j]))) - lse_t, beta);
    const DivParts<A> d = div_parts<M, A>(e);
    ks += d.s;
    kt += d.t;
    if (fused_student) gs[j] = w * (e.ps - e.pt) * ts.grad_t<SS>(x);
  }
  const A L = div_total<M, A>(beta, ks, kt);
  a.loss.ptr<A>()[r] = L;
  if (fused_student && !gt) return;
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) {
    const A x = A(to_float(xs[j])), y = A(to_float(xt[j]));
    const DivEntry<A> e = div_entry<M, A>(ts.apply_t<SS>(x) - lse_s, tt.apply_t<ST>(y) - lse_t, beta);
    const DivParts<A> g = div_grad<M, A>(e, beta, L, ks, kt);
    if (!fused_student) gs[j] = w * g.s * ts.grad_t<SS>(x);
    if (gt) gt[j] = w * g.t * tt.grad_t<ST>(y);
  }
}

PYALIGN_CPU_CLONES(distill_rows, distill_row, DistillArgs, typename T COMMA DivMode M COMMA bool SS COMMA bool ST,
                   T COMMA M COMMA SS COMMA ST)

// distill_rows with the divergence and the two softcapping switches as template arguments.
template <typename T, DivMode M> void distill_rows_for(const DistillArgs& a, int64_t r0, int64_t r1) {
  const bool ss = a.p.ts.softcap > 0, st = a.p.tt.softcap > 0;
  if (ss && st) distill_rows<T, M, true, true>(a, r0, r1);
  else if (ss) distill_rows<T, M, true, false>(a, r0, r1);
  else if (st) distill_rows<T, M, false, true>(a, r0, r1);
  else distill_rows<T, M, false, false>(a, r0, r1);
}

template <typename T> void run(const DistillArgs& a) {
  using A = typename acc_type<T>::type;
  const int64_t N = a.student.shape[0];
  parallel_rows(N, kRowGrain, [&](int64_t r0, int64_t r1) {
    switch (DivMode(a.p.mode)) {
      case DivMode::forward_kl: return distill_rows_for<T, DivMode::forward_kl>(a, r0, r1);
      case DivMode::reverse_kl: return distill_rows_for<T, DivMode::reverse_kl>(a, r0, r1);
      case DivMode::tvd: return distill_rows_for<T, DivMode::tvd>(a, r0, r1);
      case DivMode::skew_kl: return distill_rows_for<T, DivMode::skew_kl>(a, r0, r1);
      case DivMode::skew_reverse_kl: return distill_rows_for<T, DivMode::skew_reverse_kl>(a, r0, r1);
      default: return distill_rows_for<T, DivMode::jsd>(a, r0, r1);
    }
  });
  A total = 0;
  for (int64_t r = 0; r < N; ++r) total += a.weight.ptr<A>()[r] * a.loss.ptr<A>()[r];
  a.total.ptr<A>()[0] = total;
}

}  // namespace

void distill_cpu(const DistillArgs& a) {
  switch (a.student.dtype) {
    case DType::f64: return run<double>(a);
    case DType::bf16: return run<bf16_t>(a);
    case DType::f16: return run<f16_t>(a);
    default: return run<float>(a);
  }
}

}  // namespace pyalign
