// CUDA kernels of the uncertainty family. token_uncertainty: one block per token; pass 1 runs
// online softmax statistics over each member's row (a deterministic block reduction per member,
// log-normalizers kept in shared memory), pass 2 has each thread build the mean distribution for
// its strided slice of the vocabulary (coalesced across the warp, member by member) and sum
// -pbar log pbar, then one more block reduction. Backward: one block per member row, one read and
// one write. Reward statistics: one thread per column, members in a fixed order.
#include "pyalign/uncertainty.h"
#include "common.cuh"

namespace pyalign {
namespace {

struct TokKernelArgs {
  TokenUncertaintyArgs a;
  RowIndexer logits_rows, label_rows;
  int64_t M, rows, V;
};

template <typename T>
__global__ void token_forward_kernel(TokKernelArgs k) {
  using A = typename acc_type<T>::type;
  __shared__ SoftmaxStats<A, false> red[32];  // no sum of squares: only lse and entropy are needed
  __shared__ A red_sum[32];
  extern __shared__ int64_t smem_raw[];
  int64_t* off_s = smem_raw;                          // [M] row offsets of the members
  A* lse_s = reinterpret_cast<A*>(smem_raw + k.M);    // [M] log-normalizers
  const TokenUncertaintyArgs& a = k.a;
  const int64_t r = blockIdx.x, M = k.M, rows = k.rows, V = k.V;
  int64_t label = 0;
  if (a.labels.data) {
    label = read_label(a.labels, k.label_rows.offset(r));
    if (label == a.ignore_index || !label_in_vocab(label, V)) {
      // Out-of-range labels are never read: they give NaN (validate=True checks on the host).
      if (threadIdx.x == 0) {
        const A v = label == a.ignore_index ? A(0) : A(NAN);
        a.total.ptr<A>()[r] = v; a.expected.ptr<A>()[r] = v; a.mutual_info.ptr<A>()[r] = v;
        a.ens_logp.ptr<A>()[r] = v; a.label_var.ptr<A>()[r] = v;
        for (int64_t m = 0; m < M; ++m) { a.lse.ptr<A>()[m * rows + r] = v; a.member_logp.ptr<A>()[m * rows + r] = v; }
      }
      return;
    }
  }
  const A it = A(a.inv_temp);
  const T* base = a.logits.ptr<T>();
  auto add = [](A x, A y) { return x + y; };

  // Pass 1: per-member log-normalizer and entropy.
  A ent_sum = 0;
  for (int64_t m = 0; m < M; ++m) {
    const int64_t off = k.logits_rows.offset(m * rows + r);
    const T* row = base + off;
    SoftmaxStats<A, false> st;
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) st.push(A(to_float(row[i])) * it);
    st = block_merge(st, red);
    if (threadIdx.x == 0) { off_s[m] = off; lse_s[m] = st.lse(); a.lse.ptr<A>()[m * rows + r] = st.lse(); }
    ent_sum += st.entropy();
  }
  __syncthreads();

  if (a.labels.data && threadIdx.x == 0) {
    const EnsembleLabelStats<A> ls = ensemble_label_stats<A>(
        M, it, [&](int64_t m) { return A(to_float(base[off_s[m] + label])); }, [&](int64_t m) { return lse_s[m]; },
        a.member_logp.ptr<A>() + r, rows);
    a.ens_logp.ptr<A>()[r] = ls.logp;
    a.label_var.ptr<A>()[r] = ls.var;
  }

  // Pass 2: entropy of the mean distribution.
  const A inv_m = A(1) / A(M);
  A tot = 0;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
    A s = 0;
    for (int64_t m = 0; m < M; ++m)
      if (lse_s[m] != A(-INFINITY)) s += exp(A(to_float(base[off_s[m] + i])) * it - lse_s[m]);
    tot += neg_plogp(s * inv_m);
  }
  tot = block_reduce(tot, add, red_sum);
  if (threadIdx.x == 0) {
    const A expected = ent_sum * inv_m;
    a.total.ptr<A>()[r] = tot;
    a.expected.ptr<A>()[r] = expected;
    a.mutual_info.ptr<A>()[r] = mutual_information(tot, expected);
  }
}

struct TokBwdKernelArgs {
  TokenUncertaintyBackwardArgs a;
  RowIndexer logits_rows, label_rows, grad_rows;
  int64_t M, rows, V;
};

template <typename T>
__global__ void token_backward_kernel(TokBwdKernelArgs k) {
  using A = typename acc_type<T>::type;
  const TokenUncertaintyBackwardArgs& a = k.a;
  const int64_t fr = blockIdx.x, rows = k.rows, V = k.V;
  const int64_t r = fr % rows;
  const int64_t label = read_label(a.labels, k.label_rows.offset(r));
  T* out = a.grad_logits.ptr<T>() + k.grad_rows.offset(fr);
  const T* row = a.logits.ptr<T>() + k.logits_rows.offset(fr);
  const bool ok = label != a.ignore_index && label_in_vocab(label, V);
  const A it = A(a.inv_temp);
  const A l = ok ? a.lse.ptr<A>()[fr] : A(0);
  const A g = ok && a.grad_ens_logp.data ? a.grad_ens_logp.ptr<A>()[r] : A(0);
  const A gm = ok && a.grad_member_logp.data ? a.grad_member_logp.ptr<A>()[fr] : A(0);
  const A w = g != A(0) ? token_member_weight<A>(A(to_float(row[label])) * it, l, a.ens_logp.ptr<A>()[r], k.M) : A(0);
  const A scale = (g * w + gm) * it;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
    A v = 0;
    if (scale != A(0)) v = token_member_grad<A>(scale, A(to_float(row[i])) * it, l, i == label);
    out[i] = to_storage<T, A>(v);
  }
}

template <typename T>
__global__ void reward_stats_kernel(RewardStatsArgs a) {
  using A = typename acc_type<T>::type;
  const int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t M = a.rewards.shape[0], N = a.rewards.shape[1];
  if (n >= N) return;
  const int64_t s0 = a.rewards.strides[0];
  const T* col = a.rewards.ptr<T>() + n * a.rewards.strides[1];
  const A* w = a.weights.data ? a.weights.ptr<A>() : nullptr;
  const A uni = A(1) / A(M);
  A mean = 0, mn = INFINITY, mx = -INFINITY;
  bool nan = false;
  for (int64_t m = 0; m < M; ++m) {
    const A x = to_float(col[m * s0]);
    mean += (w ? w[m] : uni) * x;
    mn = x < mn ? x : mn;
    mx = x > mx ? x : mx;
    nan |= x != x;
  }
  A v = 0;
  for (int64_t m = 0; m < M; ++m) {
    const A dl = A(to_float(col[m * s0])) - mean;
    v += (w ? w[m] : uni) * dl * dl;
  }
  a.mean.ptr<A>()[n] = mean;
  a.var.ptr<A>()[n] = v / A(a.var_denom);
  a.min.ptr<A>()[n] = nan ? A(NAN) : mn;
  a.max.ptr<A>()[n] = nan ? A(NAN) : mx;
  if (a.quantile.data) {
    auto at = [&](int64_t i) { return A(to_float(col[i * s0])); };
    a.quantile.ptr<A>()[n] = column_quantile<A>(at, M, a.q);
  }
  if (a.aleatoric.data) {
    const T* vc = a.variances.ptr<T>() + n * a.variances.strides[1];
    const int64_t t0 = a.variances.strides[0];
    A al = 0;
    for (int64_t m = 0; m < M; ++m) al += (w ? w[m] : uni) * A(to_float(vc[m * t0]));
    a.aleatoric.ptr<A>()[n] = al;
  }
}

int threads_for(int64_t V) { return V >= 16384 ? 512 : V >= 2048 ? 256 : 128; }

template <typename F> void by_dtype(DType d, const char* what, F&& f) {
  switch (d) {
    case DType::f32: f(float{}); break;
    case DType::bf16: f(bf16_t{}); break;
    case DType::f16: f(f16_t{}); break;
    case DType::f64: f(double{}); break;
    default: fail(std::string(what) + ": unsupported dtype");
  }
}

}  // namespace

void token_uncertainty_forward_cuda(const TokenUncertaintyArgs& a, void* stream) {
  const int64_t M = a.logits.shape[0], V = a.logits.size(-1);
  const int64_t rows = a.logits.numel() / (M * V);
  if (rows == 0) return;
  require(rows < (int64_t(1) << 31), "logits: at most 2^31 - 1 tokens are supported on CUDA");
  require(M <= 2048, "logits: at most 2048 members are supported on CUDA, got " + std::to_string(M));
  DeviceGuard g(a.logits.device);
  TokKernelArgs k{a, RowIndexer(a.logits, a.logits.ndim - 1),
                  a.labels.present() ? RowIndexer(a.labels, a.labels.ndim) : RowIndexer(), M, rows, V};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  by_dtype(a.logits.dtype, "logits", [&](auto tag) {
    using T = decltype(tag);
    launch("token_uncertainty forward", token_forward_kernel<T>, dim3(unsigned(rows)), threads_for(V), size_t(M) * 16, s, k);
  });
}

void token_uncertainty_backward_cuda(const TokenUncertaintyBackwardArgs& a, void* stream) {
  const int64_t M = a.logits.shape[0], V = a.logits.size(-1);
  const int64_t rows = a.logits.numel() / (M * V);
  if (rows == 0) return;
  require(M * rows < (int64_t(1) << 31), "logits: at most 2^31 - 1 member rows are supported on CUDA");
  DeviceGuard g(a.logits.device);
  TokBwdKernelArgs k{a, RowIndexer(a.logits, a.logits.ndim - 1), RowIndexer(a.labels, a.labels.ndim),
                     RowIndexer(a.grad_logits, a.grad_logits.ndim - 1), M, rows, V};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  by_dtype(a.logits.dtype, "logits", [&](auto tag) {
    using T = decltype(tag);
    launch("token_uncertainty backward", token_backward_kernel<T>, dim3(unsigned(M * rows)), threads_for(V), 0, s, k);
  });
}

void reward_stats_cuda(const RewardStatsArgs& a, void* stream) {
  const int64_t N = a.rewards.shape[1];
  if (N == 0) return;
  DeviceGuard g(a.rewards.device);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const unsigned blocks = unsigned((N + 255) / 256);
  by_dtype(a.rewards.dtype, "rewards", [&](auto tag) {
    using T = decltype(tag);
    launch("reward_stats", reward_stats_kernel<T>, blocks, 256, 0, s, a);
  });
}

}  // namespace pyalign
