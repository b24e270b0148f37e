// CUDA kernels of the log-prob family: one block per row; each thread keeps online softmax
// statistics over a strided slice of the row (16-byte vector loads when aligned), then a
// deterministic block reduction. Backward: one block per row, one read and one write.
#include "pyalign/logprob.h"
#include "common.cuh"

namespace pyalign {

namespace {

// Row maximum of the raw logits with the first index attaining it (argmax semantics).
template <typename A> struct ArgMax {
  A v = -INFINITY;
  int64_t i = 0;
  __device__ void merge(const ArgMax& o) {
    if (o.v > v || (o.v == v && o.i < i)) *this = o;
  }
};
template <typename A> __device__ __forceinline__ ArgMax<A> shfl_xor(ArgMax<A> v, int o) {
  ArgMax<A> r;
  r.v = pyalign::shfl_xor(v.v, o);
  r.i = __shfl_xor_sync(0xffffffffu, (long long)v.i, o);
  return r;
}

// Streaming update of a thread's row statistics with one logit x (transformed: z) at index i;
// wz: the contribution of z to the (possibly class-weighted) sum behind mean_logit.
template <typename A> __device__ __forceinline__ void push(SoftmaxStats<A>& st, A z, A wz, A& zsum, ArgMax<A>& am, A x, int64_t i) {
  zsum += wz;
  if (x > am.v) { am.v = x; am.i = i; }  // each thread visits increasing indices
  st.push(z);
}

struct KernelArgs {
  LogprobForwardArgs a;
  RowIndexer logits_rows, label_rows;
  int64_t V;
};

template <typename T, int VEC>
__global__ void forward_kernel(KernelArgs k) {
  using A = typename acc_type<T>::type;
  __shared__ SoftmaxStats<A> smem[32];
  __shared__ A smem_x[32];
  __shared__ ArgMax<A> smem_am[32];
  const LogprobForwardArgs& a = k.a;
  const int64_t r = blockIdx.x;
  const int64_t V = k.V;
  const int64_t label = read_label(a.labels, k.label_rows.offset(r));
  const bool in_slice = label_in_vocab(label, V);
  if (label == a.ignore_index || (!in_slice && !a.vocab_slice)) {
    if (threadIdx.x == 0) {
      // Out-of-range labels never index memory: they give NaN (see token_logprobs' docs).
      A v = label == a.ignore_index ? A(0) : A(NAN);
      a.logp.ptr<A>()[r] = v; a.lse.ptr<A>()[r] = v;
      if (a.entropy.data) a.entropy.ptr<A>()[r] = v;
      if (a.log_sum_sq.data) a.log_sum_sq.ptr<A>()[r] = v;
      if (a.mean_logit.data) a.mean_logit.ptr<A>()[r] = v;
      if (a.top1.data) a.top1.ptr<bool>()[r] = false;
    }
    return;
  }
  const T* row = a.logits.ptr<T>() + k.logits_rows.offset(r);
  const LogitTransform tf = a.tf;
  const A* mw = a.mean_weights.data ? a.mean_weights.ptr<A>() : nullptr;
  SoftmaxStats<A> st;
  A zsum = 0;
  ArgMax<A> am;
  int64_t start = 0;
  if (VEC > 1 && (reinterpret_cast<uintptr_t>(row) % 16) == 0) {
    const int64_t nvec = V / VEC;
    const uint4* vrow = reinterpret_cast<const uint4*>(row);
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
      uint4 raw = __ldg(vrow + i);
      const T* el = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        A x = to_float(el[j]);
        A z = tf.apply(x);
        push(st, z, mw ? z * mw[i * VEC + j] : z, zsum, am, x, i * VEC + j);
      }
    }
    start = nvec * VEC;
  }
  for (int64_t i = start + threadIdx.x; i < V; i += blockDim.x) {
    A x = to_float(row[i]);
    A z = tf.apply(x);
    push(st, z, mw ? z * mw[i] : z, zsum, am, x, i);
  }
  st = block_merge(st, smem);
  zsum = block_sum(zsum, smem_x);
  am = block_reduce(am, [](ArgMax<A> x, const ArgMax<A>& y) { x.merge(y); return x; }, smem_am);
  if (threadIdx.x == 0) {
    const A zl = in_slice ? tf.apply(A(to_float(row[label]))) : A(-INFINITY);
    const A lse = st.lse();
    a.logp.ptr<A>()[r] = zl - lse;
    a.lse.ptr<A>()[r] = lse;
    if (a.entropy.data) a.entropy.ptr<A>()[r] = st.entropy();
    if (a.log_sum_sq.data) a.log_sum_sq.ptr<A>()[r] = st.log_sum_sq();
    if (a.mean_logit.data) a.mean_logit.ptr<A>()[r] = zsum / A(V);
    if (a.top1.data) a.top1.ptr<bool>()[r] = in_slice && am.i == label;
  }
}

struct BwdKernelArgs {
  LogprobBackwardArgs a;
  RowIndexer logits_rows, label_rows, grad_rows;
  int64_t V;
};

template <typename T, int VEC>
__global__ void backward_kernel(BwdKernelArgs k) {
  using A = typename acc_type<T>::type;
  const LogprobBackwardArgs& a = k.a;
  const int64_t r = blockIdx.x;
  const int64_t V = k.V;
  const int64_t label = read_label(a.labels, k.label_rows.offset(r));
  T* out = a.grad_logits.ptr<T>() + k.grad_rows.offset(r);
  const T* row = a.logits.ptr<T>() + k.logits_rows.offset(r);
  const bool skip = label == a.ignore_index || (!label_in_vocab(label, V) && !a.vocab_slice);
  const A g_lp = (!skip && a.grad_logp.data) ? a.grad_logp.ptr<A>()[r] : A(0);
  const A g_ent = (!skip && a.grad_entropy.data) ? a.grad_entropy.ptr<A>()[r] : A(0);
  const A lse = skip ? A(0) : a.lse.ptr<A>()[r];
  const A ent = (!skip && a.entropy.data) ? a.entropy.ptr<A>()[r] : A(0);
  const A g_lse = (!skip && a.grad_lse.data) ? a.grad_lse.ptr<A>()[r] : A(0);
  // d mean/dz_v = w_v / V_mean (V_mean: the whole vocabulary's size on a slice)
  const A g_m = (!skip && a.grad_mean.data) ? a.grad_mean.ptr<A>()[r] / A(a.mean_vocab > 0 ? a.mean_vocab : V) : A(0);
  const A* mw = a.mean_weights.data ? a.mean_weights.ptr<A>() : nullptr;
  const LogitTransform tf = a.tf;
  // Rows with no upstream gradient are exact zeros, as on the CPU (never 0 * p with an infinite lse).
  const bool zero = skip || (g_lp == A(0) && g_ent == A(0) && g_lse == A(0) && g_m == A(0));
  auto grad_at = [&](A x, int64_t j) -> A {
    if (zero) return A(0);
    const A g_mw = mw ? g_m * mw[j] : g_m;
    return logprob_grad_z<A>(tf.apply(x), lse, ent, g_lp, g_ent, g_lse, g_mw, j == label) * tf.grad(x);
  };
  int64_t start = 0;
  if (VEC > 1 && (reinterpret_cast<uintptr_t>(row) % 16) == 0 && (reinterpret_cast<uintptr_t>(out) % 16) == 0) {
    const int64_t nvec = V / VEC;
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
      uint4 raw = reinterpret_cast<const uint4*>(row)[i];
      const T* el = reinterpret_cast<const T*>(&raw);
      uint4 res;
      T* o = reinterpret_cast<T*>(&res);
#pragma unroll
      for (int j = 0; j < VEC; ++j) o[j] = to_storage<T, A>(grad_at(to_float(el[j]), i * VEC + j));
      reinterpret_cast<uint4*>(out)[i] = res;
    }
    start = nvec * VEC;
  }
  for (int64_t i = start + threadIdx.x; i < V; i += blockDim.x) out[i] = to_storage<T, A>(grad_at(to_float(row[i]), i));
}

int threads_for(int64_t V) { return V >= 16384 ? 512 : V >= 2048 ? 256 : 128; }

template <typename T> void launch_forward(const KernelArgs& k, int64_t rows, cudaStream_t s) {
  constexpr int VEC = 16 / sizeof(T);
  launch("token_logprobs forward", forward_kernel<T, VEC>, dim3(unsigned(rows)), threads_for(k.V), 0, s, k);
}

template <typename T> void launch_backward(const BwdKernelArgs& k, int64_t rows, cudaStream_t s) {
  constexpr int VEC = 16 / sizeof(T);
  launch("token_logprobs backward", backward_kernel<T, VEC>, dim3(unsigned(rows)), threads_for(k.V), 0, s, k);
}

}  // namespace

void logprob_forward_cuda(const LogprobForwardArgs& a, void* stream) {
  const int64_t rows = a.labels.numel();
  if (rows == 0) return;
  require(rows < (int64_t(1) << 31), "logits: at most 2^31 - 1 rows are supported on CUDA");
  DeviceGuard g(a.logits.device);
  KernelArgs k{a, RowIndexer(a.logits, a.logits.ndim - 1), RowIndexer(a.labels, a.labels.ndim), a.logits.size(-1)};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.logits.dtype) {
    case DType::f32: launch_forward<float>(k, rows, s); break;
    case DType::bf16: launch_forward<bf16_t>(k, rows, s); break;
    case DType::f16: launch_forward<f16_t>(k, rows, s); break;
    case DType::f64: launch_forward<double>(k, rows, s); break;
    default: fail("logits: unsupported dtype");
  }
}

void logprob_backward_cuda(const LogprobBackwardArgs& a, void* stream) {
  const int64_t rows = a.labels.numel();
  if (rows == 0) return;
  require(rows < (int64_t(1) << 31), "logits: at most 2^31 - 1 rows are supported on CUDA");
  DeviceGuard g(a.logits.device);
  BwdKernelArgs k{a, RowIndexer(a.logits, a.logits.ndim - 1), RowIndexer(a.labels, a.labels.ndim),
                  RowIndexer(a.grad_logits, a.grad_logits.ndim - 1), a.logits.size(-1)};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.logits.dtype) {
    case DType::f32: launch_backward<float>(k, rows, s); break;
    case DType::bf16: launch_backward<bf16_t>(k, rows, s); break;
    case DType::f16: launch_backward<f16_t>(k, rows, s); break;
    case DType::f64: launch_backward<double>(k, rows, s); break;
    default: fail("logits: unsupported dtype");
  }
}

}  // namespace pyalign
