// Bindings of the uncertainty family: validation that the Python layer cannot bypass, then dispatch.
#include "pyalign/bind.h"
#include "pyalign/uncertainty.h"

#include <cmath>

namespace pyalign {
namespace {

double inv_temperature(double temperature) {
  require(temperature > 0 && std::isfinite(temperature), "temperature: expected a finite value > 0, got " + num_str(temperature));
  return 1.0 / temperature;
}

// logits [M, ..., V]; labels (optional) of shape logits.shape[1:-1]. Returns (M, rows).
std::pair<int64_t, int64_t> check_logits_labels(const TensorArg& logits, const TensorArg& labels) {
  require_tensor(logits, "logits", "a float tensor [M, ..., V]");
  check_float(logits);
  require(logits.ndim >= 2, logits.describe() + ": expected at least 2 dimensions [M, ..., V]");
  require(logits.size(-1) >= 1, logits.describe() + ": expected a non-empty last (vocabulary) dimension");
  require(logits.shape[0] >= 1, logits.describe() + ": expected a non-empty first (member) dimension M");
  check_last_stride(logits, "vocabulary");
  int64_t rows = 1;
  for (int d = 1; d < logits.ndim - 1; ++d) rows *= logits.shape[d];
  if (labels.present()) {
    require(labels.dtype == DType::i32 || labels.dtype == DType::i64, labels.describe() + ": expected dtype int32 or int64");
    bool ok = labels.ndim == logits.ndim - 2;
    for (int d = 0; ok && d < labels.ndim; ++d) ok = labels.shape[d] == logits.shape[d + 1];
    require(ok, labels.describe() + ": expected shape " + dims_str(logits.shape + 1, logits.ndim - 2) + " (the shape of " +
                    logits.describe() + " without its first (member) and last (vocabulary) dimensions)");
  }
  return {logits.shape[0], rows};
}

void token_forward(TensorArg logits, TensorArg labels, TensorArg total, TensorArg expected,
                   TensorArg mutual_info, TensorArg ens_logp, TensorArg label_var, TensorArg member_logp,
                   TensorArg lse, double temperature, int64_t ignore_index, uintptr_t stream) {
  auto [M, rows] = check_logits_labels(logits, labels);
  const DType adt = accumulation_dtype(logits.dtype);
  require_contiguous(total, "total", {rows}, adt);
  require_contiguous(expected, "expected", {rows}, adt);
  require_contiguous(mutual_info, "mutual_info", {rows}, adt);
  require_contiguous(lse, "lse", {M, rows}, adt);
  if (labels.present()) {  // the label outputs are written only with labels
    require_contiguous(ens_logp, "ens_logp", {rows}, adt);
    require_contiguous(label_var, "label_var", {rows}, adt);
    require_contiguous(member_logp, "member_logp", {M, rows}, adt);
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
  require_tensor(labels, "labels", "an int32 or int64 tensor (the backward is that of the label log-probs)");
  auto [M, rows] = check_logits_labels(logits, labels);
  const DType adt = accumulation_dtype(logits.dtype);
  require_contiguous(lse, "lse", {M, rows}, adt);
  require_contiguous(ens_logp, "ens_logp", {rows}, adt);
  check_contiguous(grad_ens_logp, {rows}, adt);
  check_contiguous(grad_member_logp, {M, rows}, adt);
  require_tensor(grad_logits, "grad_logits", "an output tensor of the dtype and shape of " + logits.describe());
  check_like(grad_logits, logits);
  check_last_stride(grad_logits, "vocabulary");
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
  require_tensor(rewards, "rewards", "a float tensor [M, N]");
  check_float(rewards);
  require(rewards.ndim == 2, rewards.describe() + ": expected 2 dimensions [M, N]");
  const int64_t M = rewards.shape[0], N = rewards.shape[1];
  require(M >= 1, rewards.describe() + ": expected a non-empty first (member) dimension M");
  const DType adt = accumulation_dtype(rewards.dtype);
  if (variances.present()) {  // any strides, like rewards
    check_like(variances, rewards);
    require_contiguous(aleatoric, "aleatoric", {N}, adt);
  } else {
    require(!aleatoric.present(), aleatoric.describe() + ": expected None without variances (it is their weighted mean)");
  }
  check_contiguous(weights, {M}, adt);
  require_contiguous(mean, "mean", {N}, adt);
  require_contiguous(var, "var", {N}, adt);
  require_contiguous(mn, "min", {N}, adt);
  require_contiguous(mx, "max", {N}, adt);
  check_contiguous(quantile, {N}, adt);
  require(var_denom > 0 && std::isfinite(var_denom), "var_denom: expected a finite value > 0, got " + num_str(var_denom));
  require(q >= 0 && q <= 1, "q: expected a value in [0, 1], got " + num_str(q));
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
