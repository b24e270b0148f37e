// The contract between the compiled core and the Python layer (pyalign/_ext.py): every code and
// layout both sides must agree on, defined here once. The core exports it by name (contract() in
// bindings/module.cpp) and Python reads the values from there, so no number is mirrored by hand.
// kAbiVersion changes whenever a kernel's signature or a constant's meaning changes; `import
// pyalign` refuses a core whose ABI differs from the one it was written for.
#pragma once
#include <cstdint>

#include "pyalign/common.h"

namespace pyalign {

constexpr int kAbiVersion = 4;

// A name and its code, as exported.
struct NamedCode {
  const char* name;
  int code;
};

// ---- tensors ---------------------------------------------------------------------------------
// The descriptors' dtype codes (common.h: DType), by torch's dtype names.
constexpr NamedCode kDTypeNames[] = {
    {"float32", int(DType::f32)}, {"float16", int(DType::f16)}, {"bfloat16", int(DType::bf16)},
    {"float64", int(DType::f64)}, {"int32", int(DType::i32)},   {"int64", int(DType::i64)},
    {"uint8", int(DType::u8)},    {"bool", int(DType::b8)}};

// ---- preference losses (losses.h) --------------------------------------------------------------
enum class LossFamily : int { dpo = 0, kto = 1, bco = 2, orpo = 3, cpo = 4, rm = 5 };
constexpr const char* kLossFamilyNames[] = {"dpo", "kto", "bco", "orpo", "cpo", "rm"};

enum class DpoType : int {
  sigmoid = 0, sigmoid_norm, hinge, ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot,
  aot_unpaired, apo_zero, apo_down, discopop, sft
};
constexpr const char* kDpoTypeNames[] = {"sigmoid",   "sigmoid_norm", "hinge",    "ipo",       "exo_pair",
                                         "nca_pair",  "robust",       "bco_pair", "sppo_hard", "aot",
                                         "aot_unpaired", "apo_zero",  "apo_down", "discopop",  "sft"};
enum class CpoType : int { sigmoid = 0, hinge = 1, ipo = 2, simpo = 3 };
constexpr const char* kCpoTypeNames[] = {"sigmoid", "hinge", "ipo", "simpo"};
enum class KtoType : int { kto = 0, apo_zero_unpaired = 1 };
constexpr const char* kKtoTypeNames[] = {"kto", "apo_zero_unpaired"};
enum class FDiv : int { reverse_kl = 0, forward_kl = 1, js_divergence = 2, alpha_divergence = 3 };
constexpr const char* kFDivNames[] = {"reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"};
enum class Reduction : int { none = 0, mean = 1, sum = 2 };
constexpr const char* kReductionNames[] = {"none", "mean", "sum"};

constexpr int kMaxLossTypes = 16;  // loss types in one call (a weighted sum, e.g. MPO)

// The scalar parameters of a loss call, passed as a list in this order (Python builds it from
// these names: bindings/losses.cpp maps each to its LossParams field).
constexpr const char* kLossParamNames[] = {"beta",   "label_smoothing", "f_alpha",          "tau",
                                           "gamma",  "alpha",           "cpo_alpha",        "desirable_weight",
                                           "undesirable_weight", "center"};
constexpr int kLossParams = sizeof(kLossParamNames) / sizeof(kLossParamNames[0]);

// Slots of the metrics output; which name each slot has depends on the family (tables below).
enum MetricSlot : int {
  kRewardChosen = 0, kRewardRejected, kRewardMargin, kRewardAccuracy, kLogpChosen, kLogpRejected,
  kFamilyMetric0, kFamilyMetric1, kFamilyMetric2,
  kMetricSlots
};
constexpr NamedCode kPairedMetrics[] = {{"rewards/chosen", kRewardChosen},     {"rewards/rejected", kRewardRejected},
                                        {"rewards/margins", kRewardMargin},    {"rewards/accuracies", kRewardAccuracy},
                                        {"logps/chosen", kLogpChosen},         {"logps/rejected", kLogpRejected}};
// Unpaired data (KTO, BCO): class means, no accuracy; the family value, then the class sizes.
constexpr NamedCode kUnpairedMetrics[] = {{"rewards/chosen", kRewardChosen}, {"rewards/rejected", kRewardRejected},
                                          {"rewards/margins", kRewardMargin}, {"logps/chosen", kLogpChosen},
                                          {"logps/rejected", kLogpRejected},  {"count/chosen", kFamilyMetric1},
                                          {"count/rejected", kFamilyMetric2}};
constexpr NamedCode kKtoExtraMetrics[] = {{"kl", kFamilyMetric0}};      // the reference point z0
constexpr NamedCode kBcoExtraMetrics[] = {{"delta", kFamilyMetric0}};   // the running reward mean
constexpr NamedCode kOrpoExtraMetrics[] = {{"nll_loss", kFamilyMetric0}, {"log_odds_ratio", kFamilyMetric1},
                                           {"log_odds_chosen", kFamilyMetric2}};
constexpr NamedCode kCpoExtraMetrics[] = {{"nll_loss", kFamilyMetric0}};
constexpr NamedCode kRmMetrics[] = {{"rewards/chosen", kRewardChosen},  {"rewards/rejected", kRewardRejected},
                                    {"rewards/margins", kRewardMargin}, {"rewards/accuracies", kRewardAccuracy}};

// BCO's running reward mean crosses as its own [2] state (mean, count) in and out.
constexpr int kBcoStateSize = 2;

// The loss gradients a call can form, d loss / d (a, b, c, d, weight): bit k of a call's
// grad_rows asks for input k's, written to row popcount(grad_rows & ((1 << k) - 1)) of grads.
constexpr int kLossGradInputs = 5;

// ---- online RL: policy-gradient losses (rl.h) ---------------------------------------------------
enum class PgType : int { grpo = 0, bnpo, dr_grpo, dapo, luspo, ppo, cispo, sapo, vespo };
constexpr const char* kPgTypeNames[] = {"grpo", "bnpo", "dr_grpo", "dapo", "luspo", "ppo", "cispo", "sapo", "vespo"};
// KL estimators of log(pi / pi_ref); the "+" forms keep the value with the gradient of k2.
enum class KlEstimator : int { k1 = 0, k2, k3, abs, k1_st, k3_st };
constexpr const char* kKlEstimatorNames[] = {"k1", "k2", "k3", "abs", "k1+", "k3+"};
// Correction for rollouts from another engine (sampling_logps): none, then TRL's four modes.
enum class IsMode : int { none = 0, token_truncate, token_mask, sequence_truncate, sequence_mask };
constexpr const char* kIsModeNames[] = {"none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"};
// How the per-token losses become one number: the loss type's own rule (TRL), or verl's modes.
enum class PgAgg : int { by_type = 0, token_mean, token_sum, seq_mean_token_sum, seq_mean_token_mean,
                         seq_mean_token_sum_norm };
constexpr const char* kPgAggNames[] = {"by_type", "token-mean", "token-sum", "seq-mean-token-sum",
                                       "seq-mean-token-mean", "seq-mean-token-sum-norm"};
// The scalar parameters of a policy-loss call, passed as a list in this order.
constexpr const char* kPgParamNames[] = {"epsilon_low", "epsilon_high", "delta", "dual_clip", "beta",
                                         "entropy_coef", "entropy_threshold", "is_clip_min", "is_clip_max",
                                         "off_policy_threshold", "horizon", "num_items", "sapo_temperature_pos",
                                         "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg",
                                         "vespo_lambda_neg"};
constexpr int kPgParams = sizeof(kPgParamNames) / sizeof(kPgParamNames[0]);
// Slots of the metrics output, named as TRL logs them.
constexpr const char* kPgMetricNames[] = {
    "policy_loss", "kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
    "clip_ratio/low_min", "clip_ratio/high_max", "cispo_clip_ratio", "vespo/phi_seq_mean",
    "sampling/importance_sampling_ratio/mean", "sampling/importance_sampling_ratio/min",
    "sampling/importance_sampling_ratio/max", "num_tokens"};
constexpr int kPgMetrics = sizeof(kPgMetricNames) / sizeof(kPgMetricNames[0]);
constexpr double kPgLogRatioClamp = 20.0;  // |log(pi / pi_old)| and the k3 log-ratio, as verl clamps them
constexpr double kPgK3Clamp = 10.0;        // the k3 value, as verl clamps it

// ---- plasticity (plasticity.h) -----------------------------------------------------------------
// Row-norm modes of the fused update (PlasticCoeffs::norm_mode), in code order.
constexpr const char* kNormModeNames[] = {"none", "max", "exact"};
// The quadratic penalty is written as partial sums of this many elements each (a fixed order).
constexpr int64_t kPenaltyChunk = 8192;

}  // namespace pyalign
