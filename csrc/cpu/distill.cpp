// CPU driver of the distillation divergences (math in pyalign/distill.h): rows across OpenMP
// threads, each row by one thread in three sweeps over both logits rows (the softmax statistics,
// the divergence's row sums, the gradients), which a row's few hundred KiB keep in cache; the
// total in row order on one thread. Deterministic whatever the thread count.
#include "pyalign/cpu_dispatch.h"
#include "pyalign/distill.h"
#include "pyalign/labels.h"

#include <algorithm>

namespace pyalign {
namespace {

constexpr int64_t kRowGrain = 4;  // rows per thread below which a second thread costs more than it saves

// The log-sum-exp of a row of x * inv_temp.
template <typename T, typename A> PYALIGN_HD A row_lse(const T* x, int64_t V, A inv_temp) {
  A m = -INFINITY, s = 0;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < V; ++j) {
    const A z = A(to_float(x[j])) * inv_temp;
    m = z > m ? z : m;
  }
  if (m == A(-INFINITY)) return m;  // no support: the row's log-probs are NaN below
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < V; ++j) s += fast_exp(A(to_float(x[j])) * inv_temp - m);
  return m + std::log(s);
}

template <typename T> PYALIGN_HD void distill_row(const DistillArgs& a, int64_t r) {
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
  const bool jsd = DivMode(p.mode) == DivMode::jsd;
  const A log1mb = jsd ? A(std::log1p(-p.beta)) : A(0), logb = jsd ? A(std::log(p.beta)) : A(0);
  A ks = 0, kt = 0;
  for (int64_t j = 0; j < V; ++j) {
    const A ls = A(to_float(xs[j])) * it - lse_s, lt = A(to_float(xt[j])) * it - lse_t;
    const A lm = jsd ? log_mixture(ls, lt, log1mb, logb) : A(0);
    const DivParts<A> d = div_parts<A>(p.mode, ls, lt, lm);
    ks += d.s;
    kt += d.t;
  }
  const A L = div_total<A>(p.mode, beta, ks, kt);
  a.loss.ptr<A>()[r] = L;
  const A w = a.weight.ptr<A>()[r] * it;
  for (int64_t j = 0; j < V; ++j) {
    const A ls = A(to_float(xs[j])) * it - lse_s, lt = A(to_float(xt[j])) * it - lse_t;
    const A lm = jsd ? log_mixture(ls, lt, log1mb, logb) : A(0);
    const DivParts<A> g = div_grad<A>(p.mode, beta, ls, lt, lm, L, ks, kt);
    gs[j] = w * g.s;
    if (gt) gt[j] = w * g.t;
  }
}

PYALIGN_CPU_CLONES(distill_rows, distill_row, DistillArgs, typename T, T)

template <typename T> void run(const DistillArgs& a) {
  using A = typename acc_type<T>::type;
  const int64_t N = a.student.shape[0];
  parallel_rows(N, kRowGrain, [&](int64_t r0, int64_t r1) { distill_rows<T>(a, r0, r1); });
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
