// The pybind11 module _pyalign (the compiled core): its identity (version, ABI, build) and each
// family's bindings (csrc/bindings/<family>.cpp).
#include "pyalign/bind.h"
#include "pyalign/contract.h"
#include "pyalign/cpu_dispatch.h"

#include "pyalign/plasticity.h"
#include "pyalign/rl.h"

#include <iterator>

#ifndef PYALIGN_VERSION
#define PYALIGN_VERSION "0+unknown"
#endif

namespace pyalign {
namespace {

template <size_t N> py::list names(const char* const (&table)[N]) {
  py::list out;
  for (const char* n : table) out.append(n);
  return out;
}
template <size_t N> py::dict codes(const NamedCode (&table)[N]) {
  py::dict out;
  for (const NamedCode& c : table) out[c.name] = c.code;
  return out;
}
template <size_t N, size_t M> py::dict codes(const NamedCode (&a)[N], const NamedCode (&b)[M]) {
  py::dict out = codes(a);
  for (const NamedCode& c : b) out[c.name] = c.code;
  return out;
}

// Every constant of contract.h, by name (read once by pyalign/_ext.py at import).
py::dict contract() {
  py::dict c;
  c["abi"] = kAbiVersion;
  c["dtypes"] = codes(kDTypeNames);
  c["loss_families"] = names(kLossFamilyNames);
  c["dpo_types"] = names(kDpoTypeNames);
  c["cpo_types"] = names(kCpoTypeNames);
  c["kto_types"] = names(kKtoTypeNames);
  c["f_divergences"] = names(kFDivNames);
  c["reductions"] = names(kReductionNames);
  c["max_loss_types"] = kMaxLossTypes;
  c["loss_params"] = names(kLossParamNames);
  c["metric_slots"] = int(kMetricSlots);
  py::dict metrics;
  metrics["dpo"] = codes(kPairedMetrics);
  metrics["kto"] = codes(kUnpairedMetrics, kKtoExtraMetrics);
  metrics["bco"] = codes(kUnpairedMetrics, kBcoExtraMetrics);
  metrics["orpo"] = codes(kPairedMetrics, kOrpoExtraMetrics);
  metrics["cpo"] = codes(kPairedMetrics, kCpoExtraMetrics);
  metrics["rm"] = codes(kRmMetrics);
  c["loss_metrics"] = metrics;
  c["bco_state_size"] = kBcoStateSize;
  c["loss_grad_inputs"] = kLossGradInputs;
  c["pg_loss_types"] = names(kPgTypeNames);
  c["kl_estimators"] = names(kKlEstimatorNames);
  c["is_modes"] = names(kIsModeNames);
  c["pg_agg_modes"] = names(kPgAggNames);
  c["pg_params"] = names(kPgParamNames);
  c["pg_metrics"] = names(kPgMetricNames);
  c["pg_seg_slots"] = int(kSegSlots);
  c["pg_log_ratio_clamp"] = kPgLogRatioClamp;
  c["pg_k3_clamp"] = kPgK3Clamp;
  c["norm_modes"] = names(kNormModeNames);
  c["penalty_chunk"] = kPenaltyChunk;
  return c;
}

}  // namespace
}  // namespace pyalign

PYBIND11_MODULE(_pyalign, m) {
  m.doc() = "pyalign's compiled kernels (called through the Python package pyalign)";
  m.attr("__version__") = PYALIGN_VERSION;
  m.attr("ABI_VERSION") = pyalign::kAbiVersion;
  m.def("contract", &pyalign::contract, "The codes and layouts the Python layer and the kernels share, by name");
  m.def("has_cuda", &pyalign::built_with_cuda, "True when the CUDA kernels were compiled in");
  m.def("cpu_isa", [] { return std::string(pyalign::isa_name(pyalign::cpu_isa())); },
        "The instruction set the CPU kernels dispatch to (PYALIGN_CPU_ISA may lower it)");
  m.def("cpu_isa_supported", [] { return std::string(pyalign::isa_name(pyalign::supported_isa())); },
        "The best instruction set this CPU supports");
  m.def("cuda_device_count", [] {
#ifdef PYALIGN_WITH_CUDA
    return pyalign::cuda_device_count();
#else
    return 0;
#endif
  });
  pyalign::bind_logprob(m);
  pyalign::bind_losses(m);
  pyalign::bind_uncertainty(m);
  pyalign::bind_plasticity(m);
  pyalign::bind_rl(m);
  pyalign::bind_distill(m);
}
