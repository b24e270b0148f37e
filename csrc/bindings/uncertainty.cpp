// Bindings of the uncertainty family: validation that the Python layer cannot bypass, then dispatch.
#include "pyalign/bind.h"
#include "pyalign/uncertainty.h"

#include <cmath>

namespace pyalign {
namespace {

bool is_float(DType d) { return d == DType::f32 || d == DType::f16 || d == DType::bf16 || d == DType::f64; }
DType acc_dtype(DType d) { return d == DType::f64 ? DType::f64 : DType::f32; }

void check_contig(const TensorArg& t, std::initializer_list<int64_t> shape, DType dt) {
  if (!t.present()) return;
  bool ok = t.ndim == int(shape.size());
  int64_t numel = 1;
  for (auto s : shape) numel *= s;
  int64_t expect_stride = 1;
  std::string want = "[";
  int d = int(shape.size()) - 1;
  for (auto it = shape.end(); it != shape.begin();) {
    --it;
    // Strides of an empty tensor are irrelevant.
    if (ok && (t.shape[d] != *it || (numel > 0 && *it > 1 && t.strides[d] != expect_stride))) ok = false;
    expect_stride *= *it;
    --d;
  }
  for (auto s : shape) want += (want.size() > 1 ? ", " : "") + std::to_string(s);
  require(ok, t.describe() + ": expected a contiguous tensor of shape " + want + "]");
  require(t.dtype == dt, t.describe() + ": expected dtype " + dtype_name(dt));
}

double inv_temperature(double temperature) {
  require(temperature > 0 && std::isfinite(temperature),
          "temperature: expected a finite value > 0, got " + std::to_string(temperature));
  return 1.0 / temperature;
}

// logits [M, ..., V]; labels (optional) of shape logits.shape[1:-1]. Returns (M, rows).
std::pair<int64_t, int64_t> check_logits_labels(const TensorArg& logits, const TensorArg& labels) {
  require(is_float(logits.dtype), logits.describe() + ": expected float32, float16, bfloat16 or float64");
  require(logits.ndim >= 2, logits.describe() + ": expected at least 2 dimensions [M, ..., V]");
  require(logits.size(-1) >= 1, logits.describe() + ": the vocabulary dimension is empty");
  require(logits.shape[0] >= 1, logits.describe() + ": the member dimension M is empty");
  require(logits.stride(-1) == 1 || logits.size(-1) == 1, logits.describe() + ": the vocabulary dimension must have stride 1");
  int64_t rows = 1;
  for (int d = 1; d < logits.ndim - 1; ++d) rows *= logits.shape[d];
  if (labels.present()) {
    require(labels.dtype == DType::i32 || labels.dtype == DType::i64, labels.describe() + ": expected int32 or int64");
    bool ok = labels.ndim == logits.ndim - 2;
    for (int d = 0; ok && d < labels.ndim; ++d) ok = labels.shape[d] == logits.shape[d + 1];
    require(ok, labels.describe() + ": expected the shape of " + logits.describe() + " without its first (member) and last (vocabulary) dimensions");
  }
  return {logits.shape[0], rows};
}

void token_forward(TensorArg logits, TensorArg labels, TensorArg total, TensorArg expected,
                   TensorArg mutual_info, TensorArg ens_logp, TensorArg label_var, TensorArg member_logp,
                   TensorArg lse, double temperature, int64_t ignore_index, uintptr_t stream) {
  auto [M, rows] = check_logits_labels(logits, labels);
  const DType adt = acc_dtype(logits.dtype);
  require(total.present() && expected.present() && mutual_info.present() && lse.present(),
          "token_uncertainty: total, expected, mutual_info and lse outputs are required");
  for (const TensorArg* t : {&total, &expected, &mutual_info}) check_contig(*t, {rows}, adt);
  check_contig(lse, {M, rows}, adt);
  if (labels.present()) {
    require(ens_logp.present() && label_var.present() && member_logp.present(),
            "token_uncertainty: with labels, ens_logp, label_var and member_logp outputs are required");
    check_contig(ens_logp, {rows}, adt);
    check_contig(label_var, {rows}, adt);
    check_contig(member_logp, {M, rows}, adt);
  }
  TokenUncertaintyArgs a{logits, labels, total, expected, mutual_info, ens_logp, label_var, member_logp,
                         lse, inv_temperature(temperature), ignore_index};
  int dev = common_device({&logits, &labels, &total, &expected, &mutual_info, &ens_logp, &label_var, &member_logp, &lse});
  dispatch("token_uncertainty", dev, [&] { token_uncertainty_forward_cpu(a); }, [&] {
#ifdef PYALIGN_WITH_CUDA
    token_uncertainty_forward_cuda(a, reinterpret_cast<void*>(stream));
#endif
  });
}

void token_backward(TensorArg logits, TensorArg labels, TensorArg lse, TensorArg ens_logp,
                    TensorArg grad_ens_logp, TensorArg grad_member_logp, TensorArg grad_logits, double temperature,
                    int64_t ignore_index, uintptr_t stream) {
  require(labels.present(), "token_uncertainty backward: labels are required");
  auto [M, rows] = check_logits_labels(logits, labels);
  const DType adt = acc_dtype(logits.dtype);
  require(lse.present() && ens_logp.present() && grad_logits.present(),
          "token_uncertainty backward: lse, ens_logp and grad_logits are required");
  check_contig(lse, {M, rows}, adt);
  check_contig(ens_logp, {rows}, adt);
  check_contig(grad_ens_logp, {rows}, adt);
  check_contig(grad_member_logp, {M, rows}, adt);
  require(grad_logits.dtype == logits.dtype && grad_logits.ndim == logits.ndim,
          grad_logits.describe() + ": expected the dtype and shape of " + logits.describe());
  for (int d = 0; d < logits.ndim; ++d)
    require(grad_logits.shape[d] == logits.shape[d], grad_logits.describe() + ": expected the shape of " + logits.describe());
  require(grad_logits.stride(-1) == 1 || logits.size(-1) == 1, grad_logits.describe() + ": the vocabulary dimension must have stride 1");
  TokenUncertaintyBackwardArgs a{logits, labels, lse, ens_logp, grad_ens_logp, grad_member_logp, grad_logits,
                                 inv_temperature(temperature), ignore_index};
  int dev = common_device({&logits, &labels, &lse, &ens_logp, &grad_ens_logp, &grad_member_logp, &grad_logits});
  dispatch("token_uncertainty backward", dev, [&] { token_uncertainty_backward_cpu(a); }, [&] {
#ifdef PYALIGN_WITH_CUDA
    token_uncertainty_backward_cuda(a, reinterpret_cast<void*>(stream));
#endif
  });
}

void reward_stats(TensorArg rewards, TensorArg variances, TensorArg weights, TensorArg mean, TensorArg var,
                  TensorArg mn, TensorArg mx, TensorArg quantile, TensorArg aleatoric, double var_denom,
                  double q, uintptr_t stream) {
  require(is_float(rewards.dtype), rewards.describe() + ": expected float32, float16, bfloat16 or float64");
  require(rewards.ndim == 2, rewards.describe() + ": expected shape [M, N]");
  const int64_t M = rewards.shape[0], N = rewards.shape[1];
  require(M >= 1, rewards.describe() + ": the member dimension M is empty");
  const DType adt = acc_dtype(rewards.dtype);
  if (variances.present()) {
    require(variances.dtype == rewards.dtype && variances.ndim == 2 && variances.shape[0] == M && variances.shape[1] == N,
            variances.describe() + ": expected the shape and dtype of " + rewards.describe());
    require(aleatoric.present(), "aleatoric output is required with variances");
  }
  require(aleatoric.present() == variances.present(), aleatoric.describe() + ": the aleatoric output comes with variances, and only then");
  check_contig(weights, {M}, adt);
  require(mean.present() && var.present() && mn.present() && mx.present(), "reward_stats: mean, var, min and max outputs are required");
  for (const TensorArg* t : {&mean, &var, &mn, &mx, &quantile, &aleatoric}) check_contig(*t, {N}, adt);
  require(var_denom > 0 && std::isfinite(var_denom), "var_denom: expected a finite value > 0");
  require(q >= 0 && q <= 1, "q: expected a value in [0, 1], got " + std::to_string(q));
  RewardStatsArgs a{rewards, variances, weights, mean, var, mn, mx, quantile, aleatoric, var_denom, q};
  int dev = common_device({&rewards, &variances, &weights, &mean, &var, &mn, &mx, &quantile, &aleatoric});
  dispatch("reward_stats", dev, [&] { reward_stats_cpu(a); }, [&] {
#ifdef PYALIGN_WITH_CUDA
    reward_stats_cuda(a, reinterpret_cast<void*>(stream));
#endif
  });
}

}  // namespace

void bind_uncertainty(py::module_& m) {
  m.def("token_uncertainty_forward", &token_forward,
        "Ensemble entropies, mutual information and label log-prob per token (writes the given outputs)");
  m.def("token_uncertainty_backward", &token_backward,
        "Gradient of the ensemble log-prob w.r.t. the logits (writes grad_logits)");
  m.def("reward_stats", &reward_stats,
        "Mean, variance, min, max, quantile and mean variance over the member dimension (writes the outputs)");
}

}  // namespace pyalign
