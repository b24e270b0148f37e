// Bindings of the preference losses: validation the Python layer cannot bypass, then dispatch.
// Families, loss types, f-divergences and reductions cross as names or as indices into the name
// tables of contract.h; the scalar parameters as a list in kLossParamNames order.
#include "pyalign/bind.h"
#include "pyalign/losses.h"

#include <cmath>
#include <iterator>
#include <vector>

namespace pyalign {
namespace {

template <size_t N> int code_of(const char* const (&names)[N], const std::string& name, const char* what) {
  std::string valid;
  for (size_t k = 0; k < N; ++k) {
    if (name == names[k]) return int(k);
    valid += (k ? ", " : "") + std::string(names[k]);
  }
  fail(std::string(what) + ": unknown name '" + name + "'; expected one of " + valid);
}

void check_vec(const TensorArg& t, int64_t n, bool allow_int) {
  if (!t.present()) return;
  require(t.ndim == 1 && t.shape[0] == n,
          t.describe() + ": expected a 1-d tensor of " + std::to_string(n) + " elements (one per batch element)");
  require(is_float_dtype(t.dtype) || allow_int,
          t.describe() + (allow_int ? ": expected a float, integer or bool tensor" : ": expected a float tensor"));
}

// An output the Python layer allocated: present, of the accumulation dtype, contiguous, this shape.
void check_out(const TensorArg& t, const char* name, std::initializer_list<int64_t> shape, DType dt) {
  std::string want = "[";
  for (auto it = shape.begin(); it != shape.end(); ++it) want += (it == shape.begin() ? "" : ", ") + std::to_string(*it);
  want += "]";
  require(t.present(), std::string("'") + name + "': the output " + want + " is required");
  bool ok = t.dtype == dt && t.ndim == int(shape.size());
  int64_t stride = 1;
  for (int k = int(shape.size()) - 1; ok && k >= 0; --k) {
    const int64_t size = *(shape.begin() + k);
    ok = t.shape[k] == size && (size <= 1 || t.strides[k] == stride);
    stride *= size;
  }
  require(ok, t.describe() + ": expected a contiguous " + dtype_name(dt) + " tensor of shape " + want);
}

void forward(TensorArg a, TensorArg b, TensorArg c, TensorArg d, TensorArg la, TensorArg lb,
             TensorArg w, TensorArg label, TensorArg kla, TensorArg klb, TensorArg state,
             TensorArg loss, TensorArg grads, TensorArg metrics, TensorArg state_out, TensorArg work,
             const std::string& family_name, std::vector<int> types, std::vector<double> type_weights,
             std::vector<double> params, const std::string& fdiv_name, const std::string& reduction_name,
             int grad_rows, uintptr_t stream) {
  const int family = code_of(kLossFamilyNames, family_name, "family");
  const int fdiv = code_of(kFDivNames, fdiv_name, "f_divergence");
  const int reduction = code_of(kReductionNames, reduction_name, "reduction");
  const LossFamily fam = LossFamily(family);
  require(a.present() && a.ndim == 1, "the first log-prob input must be a 1-d tensor");
  const int64_t n = a.shape[0];
  require(n >= 1, a.describe() + ": expected at least one element");
  const bool paired = fam == LossFamily::dpo || fam == LossFamily::orpo || fam == LossFamily::cpo || fam == LossFamily::rm;
  check_vec(a, n, false);
  if (paired) require(b.present(), "family " + family_name + ": the rejected input (second tensor) is required");
  for (const TensorArg* t : {&b, &c, &d, &w}) check_vec(*t, n, false);
  for (const TensorArg* t : {&la, &lb, &label}) check_vec(*t, n, true);
  if (fam == LossFamily::kto || fam == LossFamily::bco) {
    require(c.present() && label.present(), "family " + family_name + ": the reference log-probs and the "
                                             "desirable labels are required");
  }
  if (fam == LossFamily::kto && kla.present()) {
    require(klb.present() && kla.ndim == 1 && klb.ndim == 1 && kla.shape[0] == klb.shape[0] && kla.shape[0] >= 1,
            kla.describe() + " and " + (klb.present() ? klb.describe() : std::string("its reference twin")) +
                ": expected two 1-d tensors of the same non-zero length");
    require(is_float_dtype(kla.dtype) && is_float_dtype(klb.dtype), kla.describe() + ", " + klb.describe() + ": expected float tensors");
  }
  const DType adt = a.dtype == DType::f64 ? DType::f64 : DType::f32;
  if (fam == LossFamily::bco) {
    require(state.present() && state.ndim == 1 && state.shape[0] == kBcoStateSize && is_float_dtype(state.dtype),
            (state.present() ? state.describe() : std::string("'state'")) +
                ": expected a float tensor of 2 elements (running mean, count)");
    check_out(state_out, "state_out", {kBcoStateSize}, adt);
  }
  if (fam == LossFamily::dpo)
    require(c.present() == d.present(), "reference log-probs: give both (chosen and rejected) or neither");
  require(types.size() >= 1 && types.size() <= size_t(kMaxLossTypes) && types.size() == type_weights.size(),
          "types / type_weights: expected 1 to " + std::to_string(kMaxLossTypes) + " loss types, each with a weight (got " +
              std::to_string(types.size()) + " types and " + std::to_string(type_weights.size()) + " weights)");
  require(params.size() == size_t(kLossParams), "params: expected " + std::to_string(kLossParams) +
                                                    " values in the order of contract()['loss_params'], got " +
                                                    std::to_string(params.size()));

  if (reduction == int(Reduction::none)) check_out(loss, "loss", {n}, adt);
  else check_out(loss, "loss", {}, adt);
  require(grad_rows >= 0 && grad_rows < (1 << kLossGradInputs),
          "grad_rows: expected a bit mask of the " + std::to_string(kLossGradInputs) +
              " gradient inputs (0 to " + std::to_string((1 << kLossGradInputs) - 1) + "), got " +
              std::to_string(grad_rows));
  int n_rows = 0;
  for (int k = 0; k < kLossGradInputs; ++k) n_rows += (grad_rows >> k) & 1;
  check_out(grads, "grads", {n_rows, n}, adt);
  check_out(metrics, "metrics", {kMetricSlots}, adt);
  LossArgs s{a, b, c, d, la, lb, w, label, kla, klb, state, loss, grads, metrics, state_out, work, LossParams{}};
  LossParams& p = s.p;
  p.family = family;
  p.n_types = int(types.size());
  const int n_names = fam == LossFamily::dpo ? int(std::size(kDpoTypeNames))
                      : fam == LossFamily::cpo ? int(std::size(kCpoTypeNames))
                      : fam == LossFamily::kto ? int(std::size(kKtoTypeNames)) : 1;
  for (size_t t = 0; t < types.size(); ++t) {
    require(types[t] >= 0 && types[t] < n_names,
            "types: code " + std::to_string(types[t]) + " is not a loss type of family " + family_name);
    p.types[t] = types[t];
    p.type_weights[t] = type_weights[t];
  }
  // In kLossParamNames order.
  double* fields[] = {&p.beta, &p.label_smoothing, &p.f_alpha, &p.tau, &p.gamma, &p.alpha,
                      &p.cpo_alpha, &p.desirable_weight, &p.undesirable_weight, &p.center};
  static_assert(std::size(fields) == size_t(kLossParams), "one LossParams field per name in kLossParamNames");
  for (int k = 0; k < kLossParams; ++k) *fields[k] = params[k];
  p.fdiv = fdiv; p.reduction = reduction; p.has_ref = c.present(); p.grad_rows = grad_rows;
  const int naot = aot_count(p);
  if (naot > 0) {
    require(c.present(), "types: the aot losses need reference log-probs");
    require(n <= int64_t(INT32_MAX), "policy_chosen_logps: the aot losses rank at most 2^31 - 1 pairs, got " +
                                         std::to_string(n));
    check_out(work, "work", {int64_t(4) * naot, n}, DType::i32);
  }
  int dev = common_device({&a, &b, &c, &d, &la, &lb, &w, &label, &kla, &klb, &state, &loss, &grads, &metrics,
                           &state_out, &work});
  dispatch("preference loss", dev, [&] { loss_forward_cpu(s); }, [&] {
#ifdef PYALIGN_WITH_CUDA
    loss_forward_cuda(s, reinterpret_cast<void*>(stream));
#endif
  });
}

void kl_dro(TensorArg loss, TensorArg grads, TensorArg value, double tau, uintptr_t stream) {
  require(loss.present() && loss.ndim == 1 && loss.shape[0] >= 1,
          "'loss': expected the per-pair losses, a 1-d tensor of at least one element");
  const int64_t n = loss.shape[0];
  const DType adt = loss.dtype;
  require(adt == DType::f32 || adt == DType::f64, loss.describe() + ": expected float32 or float64");
  check_out(loss, "loss", {n}, adt);
  require(grads.present() && grads.ndim == 2, "'grads': expected the gradient rows, a [rows, N] tensor");
  check_out(grads, "grads", {grads.shape[0], n}, adt);
  check_out(value, "value", {}, adt);
  require(std::isfinite(tau) && tau > 0, "dro_temperature: expected a finite number > 0, got " + std::to_string(tau));
  KlDroArgs s{loss, grads, value, tau};
  int dev = common_device({&loss, &grads, &value});
  dispatch("KL-DRO reduction", dev, [&] { kl_dro_cpu(s); }, [&] {
#ifdef PYALIGN_WITH_CUDA
    kl_dro_cuda(s, reinterpret_cast<void*>(stream));
#endif
  });
}

}  // namespace

void bind_losses(py::module_& m) {
  m.def("loss_forward", &forward,
        "Preference loss of a batch: per-element or reduced loss, gradients, metrics and (BCO) the new "
        "running state (writes the outputs)");
  m.def("loss_kl_dro", &kl_dro,
        "KL-DRO reduction of a reduction-'none' output: writes the value, scales the gradient rows in place");
}

}  // namespace pyalign
