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

// The log-sum-exp of a row of x * inv_temp, in one read: per chunk its max, then its sum of exps
// relative to the running max (the earlier chunks' sum rescaled when the max grows). -inf for a row
// without a finite logit; NaN for a row holding NaN.
template <typename T, typename A> PYALIGN_HD A row_lse(const T* x, int64_t V, A it) {
  A m = -INFINITY, s = 0;
  for (int64_t j0 = 0; j0 < V; j0 += kChunk) {
    const int64_t n = std::min(kChunk, V - j0);
    A cm = -INFINITY;
#pragma omp simd reduction(max : cm)
    for (int64_t j = 0; j < n; ++j) {
      const A z = A(to_float(x[j0 + j])) * it;
      cm = z > cm ? z : cm;
    }
    if (cm > m) {
      s = m == A(-INFINITY) ? A(0) : s * fast_exp(m - cm);
      m = cm;
    }
    if (m == A(-INFINITY)) continue;
    A cs = 0;
#pragma omp simd reduction(+ : cs)
    for (int64_t j = 0; j < n; ++j) cs += fast_exp(A(to_float(x[j0 + j])) * it - m);
    s += cs;
  }
  return m == A(-INFINITY) ? m : m + std::log(s);
}

template <typename T, DivMode M> PYALIGN_HD void distill_row(const DistillArgs& a, int64_t r) {
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
  const A it = A(p.inv_temp), beta = A(p.beta);
  const A lse_s = row_lse<T, A>(xs, V, it), lse_t = row_lse<T, A>(xt, V, it);
  const A w = a.weight.ptr<A>()[r] * it;
  // the forward KL's student gradient, p_s - p_t, needs no row sum: written in the same sweep
  const bool fused_student = M == DivMode::forward_kl;
  A ks = 0, kt = 0;
#pragma omp simd reduction(+ : ks, kt)
  for (int64_t j = 0; j < V; ++j) {
    const DivEntry<A> e = div_entry<M, A>(A(to_float(xs[j])) * it - lse_s, A(to_float(xt[j])) * it - lse_t, beta);
    const DivParts<A> d = div_parts<M, A>(e);
    ks += d.s;
    kt += d.t;
    if (fused_student) gs[j] = w * (e.ps - e.pt);
  }
  const A L = div_total<M, A>(beta, ks, kt);
  a.loss.ptr<A>()[r] = L;
  if (fused_student && !gt) return;
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) {
    const DivEntry<A> e = div_entry<M, A>(A(to_float(xs[j])) * it - lse_s, A(to_float(xt[j])) * it - lse_t, beta);
    const DivParts<A> g = div_grad<M, A>(e, beta, L, ks, kt);
    if (!fused_student) gs[j] = w * g.s;
    if (gt) gt[j] = w * g.t;
  }
}

PYALIGN_CPU_CLONES(distill_rows, distill_row, DistillArgs, typename T COMMA DivMode M, T COMMA M)

template <typename T> void run(const DistillArgs& a) {
  using A = typename acc_type<T>::type;
  const int64_t N = a.student.shape[0];
  parallel_rows(N, kRowGrain, [&](int64_t r0, int64_t r1) {
    switch (DivMode(a.p.mode)) {
      case DivMode::forward_kl: return distill_rows<T, DivMode::forward_kl>(a, r0, r1);
      case DivMode::reverse_kl: return distill_rows<T, DivMode::reverse_kl>(a, r0, r1);
      default: return distill_rows<T, DivMode::jsd>(a, r0, r1);
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
