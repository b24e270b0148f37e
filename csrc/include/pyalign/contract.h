// The contract between the compiled core and the Python layer (pyalign/_ext.py): every code and
// layout both sides must agree on, defined here once. The core exports it by name (contract() in
// bindings/module.cpp) and Python reads the values from there, so no number is mirrored by hand.
// kAbiVersion changes whenever a kernel's signature or a constant's meaning changes; `import
// pyalign` refuses a core whose ABI differs from the one it was written for.
#pragma once
#include <cstdint>

#include "pyalign/common.h"

namespace pyalign {

constexpr int kAbiVersion = 2;

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

// ---- plasticity (plasticity.h) -----------------------------------------------------------------
// Row-norm modes of the fused update (PlasticCoeffs::norm_mode), in code order.
constexpr const char* kNormModeNames[] = {"none", "max", "exact"};
// The quadratic penalty is written as partial sums of this many elements each (a fixed order).
constexpr int64_t kPenaltyChunk = 8192;

}  // namespace pyalign
