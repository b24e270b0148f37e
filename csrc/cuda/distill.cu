// CUDA driver of the distillation divergences (math in pyalign/distill.h): one block per row,
// threads striding over the vocabulary (the softmax statistics, the row sums, the gradients), every row sum a fixed-order
// block reduction; the total by one thread in row order. Bitwise reproducible.
#include "pyalign/distill.h"
#include "pyalign/labels.h"
#include "common.cuh"

namespace pyalign {
namespace {

constexpr int kThreads = 256;

// The log-sum-exp of a row of transformed logits (online statistics, merged across the block).
template <typename T, typename A> __device__ A row_lse(const T* x, int64_t V, const LogitTransform& tf,
                                                       SoftmaxStats<A, false>* smem) {
  SoftmaxStats<A, false> st;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) st.push(tf.apply(A(to_float(x[j]))));
  st = block_merge(st, smem);
  return st.lse();
}

template <typename T, DivMode M> __global__ void distill_rows(DistillArgs a) {
  using A = typename acc_type<T>::type;
  __shared__ SoftmaxStats<A, false> st_smem[32];
  __shared__ A smem[32];
  const DistillParams& p = a.p;
  const int64_t r = blockIdx.x, V = a.student.shape[1];
  A* gs = a.grad_student.ptr<A>() + r * V;
  A* gt = a.grad_teacher.data ? a.grad_teacher.ptr<A>() + r * V : nullptr;
  if (a.labels.data && read_label(a.labels, r * a.labels.strides[0]) == p.ignore_index) {
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
      gs[j] = A(0);
      if (gt) gt[j] = A(0);
    }
    if (threadIdx.x == 0) a.loss.ptr<A>()[r] = A(0);
    return;
  }
  const T* xs = a.student.ptr<T>() + r * a.student.strides[0];
  const T* xt = a.teacher.ptr<T>() + r * a.teacher.strides[0];
  const A beta = A(p.beta);
  const LogitTransform ts = p.ts, tt = p.tt;
  const A lse_s = row_lse<T, A>(xs, V, ts, st_smem), lse_t = row_lse<T, A>(xt, V, tt, st_smem);
  A ks = 0, kt = 0;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    const A zs = ts.apply(A(to_float(xs[j]))), zt = tt.apply(A(to_float(xt[j])));
    const DivParts<A> d = div_parts<M, A>(div_entry<M, A>(zs - lse_s, zt - lse_t, beta));
    ks += d.s;
    kt += d.t;
  }
  ks = block_sum(ks, smem);
  kt = block_sum(kt, smem);
  const A L = div_total<M, A>(beta, ks, kt);
  if (threadIdx.x == 0) a.loss.ptr<A>()[r] = L;
  const A w = a.weight.ptr<A>()[r];
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    const A x = A(to_float(xs[j])), y = A(to_float(xt[j]));
    const DivEntry<A> e = div_entry<M, A>(ts.apply(x) - lse_s, tt.apply(y) - lse_t, beta);
    const DivParts<A> g = div_grad<M, A>(e, beta, L, ks, kt);
    gs[j] = w * g.s * ts.grad(x);
    if (gt) gt[j] = w * g.t * tt.grad(y);
  }
}

template <typename A> __global__ void distill_total(DistillArgs a, int64_t N) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  A total = 0;
  for (int64_t r = 0; r < N; ++r) total += a.weight.ptr<A>()[r] * a.loss.ptr<A>()[r];
  a.total.ptr<A>()[0] = total;
}

template <typename T> void launch_all(const DistillArgs& a, cudaStream_t st) {
  using A = typename acc_type<T>::type;
  const int64_t N = a.student.shape[0];
  if (N > 0) {
    void (*rows)(DistillArgs);
    switch (DivMode(a.p.mode)) {
      case DivMode::forward_kl: rows = distill_rows<T, DivMode::forward_kl>; break;
      case DivMode::reverse_kl: rows = distill_rows<T, DivMode::reverse_kl>; break;
      case DivMode::tvd: rows = distill_rows<T, DivMode::tvd>; break;
      case DivMode::skew_kl: rows = distill_rows<T, DivMode::skew_kl>; break;
      case DivMode::skew_reverse_kl: rows = distill_rows<T, DivMode::skew_reverse_kl>; break;
      default: rows = distill_rows<T, DivMode::jsd>;
    }
    launch("distillation rows", rows, unsigned(N), kThreads, 0, st, a);
  }
  launch("distillation total", distill_total<A>, 1, 1, 0, st, a, N);
}

}  // namespace

void distill_cuda(const DistillArgs& a, void* stream) {
  require(a.student.shape[0] < (int64_t(1) << 31), "student_logits: at most 2^31 - 1 rows are supported on CUDA");
  DeviceGuard guard(a.student.device);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (a.student.dtype) {
    case DType::f64: launch_all<double>(a, st); break;
    case DType::bf16: launch_all<bf16_t>(a, st); break;
    case DType::f16: launch_all<f16_t>(a, st); break;
    default: launch_all<float>(a, st);
  }
}

}  // namespace pyalign
