// Bindings of the policy-gradient losses: validation the Python layer cannot bypass, then dispatch.
#include "pyalign/bind.h"
#include "pyalign/rl.h"

#include <cmath>
#include <iterator>
#include <vector>

namespace pyalign {
namespace {

template <size_t N> int name_code(const char* const (&names)[N], const std::string& name, const char* what) {
  std::string valid;
  for (size_t k = 0; k < N; ++k) {
    if (name == names[k]) return int(k);
    valid += (k ? ", " : "") + std::string(names[k]);
  }
  fail(std::string(what) + ": unknown name '" + name + "'; expected one of " + valid);
}

void tokens(const TensorArg& t, const char* arg, int64_t n, bool numeric) {
  if (!t.present()) return;
  require(t.ndim == 1 && t.shape[0] == n, t.describe() + ": expected a 1-d tensor of " + std::to_string(n) +
                                              " elements (one per token) for " + arg);
  if (!numeric) check_float(t);
}

void forward(TensorArg logp, TensorArg old, TensorArg ref, TensorArg samp, TensorArg ent, TensorArg mask,
             TensorArg adv, TensorArg seg, int64_t num_segs, int64_t row_len, TensorArg loss, TensorArg grad_logp, TensorArg grad_ent,
             TensorArg metrics, TensorArg work, const std::string& loss_type, const std::string& level,
             const std::string& kl, const std::string& is_mode, const std::string& agg, bool bias_correction_kl, bool adv_per_token,
             std::vector<double> params, uintptr_t stream) {
  require_tensor(logp, "logps", "a 1-d float tensor of the tokens' log-probs");
  check_float(logp);
  require(logp.ndim == 1, logp.describe() + ": expected a 1-d tensor (the flat tokens)");
  const int64_t n = logp.shape[0];
  require_tensor(old, "old_logps", "a tensor like logps");
  tokens(old, "old_logps", n, false);
  tokens(ref, "ref_logps", n, false);
  tokens(samp, "sampling_logps", n, false);
  tokens(ent, "entropy", n, false);
  tokens(mask, "mask", n, true);
  int64_t S = num_segs;
  if (!seg.present()) {  // S rows of row_len tokens
    require(num_segs >= 0 && row_len >= 0 && num_segs * row_len == n,
            "segments: without offsets expected num_segs * row_len == " + std::to_string(n) + " tokens, got " +
                std::to_string(num_segs) + " x " + std::to_string(row_len));
  } else {
    require(seg.ndim == 1 && seg.shape[0] >= 1 && seg.dtype == DType::i64 && is_contiguous(seg),
            seg.describe() + ": expected a contiguous int64 tensor [S + 1] of segment offsets");
    S = seg.shape[0] - 1;
  }
  if (seg.present() && seg.device < 0) {  // on CUDA the Python layer checks them (a host sync it makes only when asked)
    const int64_t* o = seg.ptr<int64_t>();
    require(o[0] == 0 && o[S] == n, seg.describe() + ": expected offsets from 0 to " + std::to_string(n) +
                                        ", got " + std::to_string(o[0]) + " to " + std::to_string(o[S]));
    for (int64_t k = 0; k < S; ++k)
      require(o[k] <= o[k + 1], seg.describe() + ": expected non-decreasing offsets, got " + std::to_string(o[k]) +
                                    " then " + std::to_string(o[k + 1]) + " at " + std::to_string(k));
  }
  require_tensor(adv, "advantages", "a float tensor [S] or [N]");
  check_float(adv);
  require(adv.ndim == 1 && adv.shape[0] == (adv_per_token ? n : S),
          adv.describe() + ": expected " + (adv_per_token ? std::to_string(n) + " advantages (one per token)"
                                                          : std::to_string(S) + " advantages (one per sequence)"));
  PgParams p;
  p.loss_type = name_code(kPgTypeNames, loss_type, "loss_type");
  p.kl = name_code(kKlEstimatorNames, kl, "kl_estimator");
  p.is_mode = name_code(kIsModeNames, is_mode, "importance_sampling_mode");
  p.agg = name_code(kPgAggNames, agg, "loss_agg_mode");
  require(level == "token" || level == "sequence",
          "importance_sampling_level: expected 'token' or 'sequence', got '" + level + "'");
  p.seq_level = level == "sequence";
  p.bias_correction_kl = bias_correction_kl;
  p.has_ref = ref.present();
  p.adv_per_token = adv_per_token;
  require(p.is_mode == int(IsMode::none) || samp.present(),
          "sampling_logps: required by importance_sampling_mode " + is_mode);
  require(params.size() == size_t(kPgParams), "params: expected " + std::to_string(kPgParams) +
                                                  " values in the order of contract()['pg_params'], got " +
                                                  std::to_string(params.size()));
  double* fields[] = {&p.eps_low, &p.eps_high, &p.delta, &p.dual_clip, &p.beta, &p.entropy_coef,
                      &p.entropy_threshold, &p.is_clip_min, &p.is_clip_max, &p.off_policy_threshold,
                      &p.horizon, &p.num_items, &p.sapo_pos, &p.sapo_neg, &p.vk_pos, &p.vl_pos, &p.vk_neg,
                      &p.vl_neg};
  static_assert(std::size(fields) == size_t(kPgParams), "one PgParams field per name in kPgParamNames");
  for (int k = 0; k < kPgParams; ++k) {
    *fields[k] = params[k];
    // NaN switches an option off (entropy_threshold, off_policy_threshold, delta, dual_clip)
    require(!std::isinf(params[k]) || k == 6 || k == 7 || k == 8,
            std::string(kPgParamNames[k]) + ": expected a finite value, got " + num_str(params[k]));
  }
  p.has_entropy_mask = !std::isnan(p.entropy_threshold);
  p.has_off_policy = !std::isnan(p.off_policy_threshold);
  if (std::isnan(p.delta)) p.delta = 0;
  if (std::isnan(p.dual_clip)) p.dual_clip = 0;
  require(!p.has_entropy_mask || ent.present(), "entropy: required by top_entropy_quantile < 1");
  require(p.entropy_coef == 0 || ent.present(), "entropy: required by entropy_coef != 0");
  const DType adt = accumulation_dtype(logp.dtype);
  require_contiguous(loss, "loss", {}, adt);
  require_contiguous(grad_logp, "grad_logps", {n}, adt);
  if (ent.present()) require_contiguous(grad_ent, "grad_entropy", {n}, adt);
  require(ent.present() || !grad_ent.present(), "grad_entropy: expected None without entropy");
  require_contiguous(metrics, "metrics", {kPgMetrics}, adt);
  require_contiguous(work, "work", {S + 1, kSegSlots}, adt);
  PgArgs a{logp, old, ref, samp, ent, mask, adv, seg, loss, grad_logp, grad_ent, metrics, work, p, S, row_len};
  int dev = common_device({&logp, &old, &ref, &samp, &ent, &mask, &adv, &seg, &loss, &grad_logp, &grad_ent,
                           &metrics, &work});
  dispatch("policy loss", dev, [&] { policy_loss_cpu(a); }, [&] {
#ifdef PYALIGN_WITH_CUDA
    policy_loss_cuda(a, reinterpret_cast<void*>(stream));
#endif
  });
}

}  // namespace

void bind_rl(py::module_& m) {
  m.def("policy_loss_forward", &forward,
        "Policy-gradient loss of a batch of token segments: loss, gradients w.r.t. the log-probs and the "
        "entropy, metrics (writes the outputs)");
}

}  // namespace pyalign
