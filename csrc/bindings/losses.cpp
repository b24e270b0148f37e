// Bindings of the preference losses: validation the Python layer cannot bypass, then dispatch.
#include "pyalign/bind.h"
#include "pyalign/losses.h"

#include <vector>

namespace pyalign {
namespace {

bool is_float(DType d) { return d == DType::f32 || d == DType::f16 || d == DType::bf16 || d == DType::f64; }

void check_vec(const TensorArg& t, int64_t n, bool allow_int) {
  if (!t.present()) return;
  require(t.ndim == 1 && t.shape[0] == n,
          t.describe() + ": expected a 1-d tensor of " + std::to_string(n) + " elements");
  require(is_float(t.dtype) || allow_int,
          t.describe() + (allow_int ? ": expected a float, integer or bool tensor" : ": expected a float tensor"));
}

void check_out(const TensorArg& t, std::initializer_list<int64_t> shape, DType dt) {
  require(t.present(), "missing output tensor");
  require(t.dtype == dt, t.describe() + ": expected dtype " + dtype_name(dt));
  require(t.ndim == int(shape.size()), t.describe() + ": wrong number of dimensions");
  int d = 0;
  int64_t expect_stride = 1;
  for (auto it = shape.end(); it != shape.begin();) {
    --it;
    const int k = int(shape.size()) - 1 - d;
    require(t.shape[k] == *it, t.describe() + ": wrong shape");
    require(t.shape[k] <= 1 || t.strides[k] == expect_stride, t.describe() + ": expected a contiguous tensor");
    expect_stride *= *it;
    ++d;
  }
}

void forward(TensorArg a, TensorArg b, TensorArg c, TensorArg d, TensorArg la, TensorArg lb,
             TensorArg w, TensorArg label, TensorArg kla, TensorArg klb, TensorArg state,
             TensorArg loss, TensorArg grads, TensorArg metrics, TensorArg work, int family,
             std::vector<int> types, std::vector<double> type_weights, std::vector<double> params,
             int fdiv, int reduction, uintptr_t stream) {
  require(a.present() && a.ndim == 1, "the first log-prob input must be a 1-d tensor");
  const int64_t n = a.shape[0];
  require(n >= 1, a.describe() + ": expected at least one element");
  require(family >= 0 && family <= 5, "unknown loss family " + std::to_string(family));
  const LossFamily fam = LossFamily(family);
  const bool paired = fam == LossFamily::dpo || fam == LossFamily::orpo || fam == LossFamily::cpo || fam == LossFamily::rm;
  check_vec(a, n, false);
  if (paired) require(b.present(), "the rejected input is required");
  for (const TensorArg* t : {&b, &c, &d, &w}) check_vec(*t, n, false);
  for (const TensorArg* t : {&la, &lb, &label}) check_vec(*t, n, true);
  if (fam == LossFamily::kto || fam == LossFamily::bco) {
    require(c.present() && label.present(), "reference log-probs and labels are required");
  }
  if (fam == LossFamily::kto && kla.present()) {
    require(klb.present() && kla.ndim == 1 && klb.ndim == 1 && kla.shape[0] == klb.shape[0] && kla.shape[0] >= 1,
            kla.describe() + " and " + klb.describe() + ": expected two 1-d tensors of the same non-zero length");
    require(is_float(kla.dtype) && is_float(klb.dtype), "KL log-probs: expected float tensors");
  }
  if (fam == LossFamily::bco) {
    require(state.present() && state.ndim == 1 && state.shape[0] == 2 && is_float(state.dtype),
            "state: expected a float tensor of 2 elements (running mean, count)");
  }
  if (fam == LossFamily::dpo) require(c.present() == d.present(), "give both reference log-probs or neither");
  require(types.size() >= 1 && types.size() <= size_t(kMaxLossTypes) && types.size() == type_weights.size(),
          "expected 1 to " + std::to_string(kMaxLossTypes) + " loss types, each with a weight");
  require(params.size() == 10, "expected 10 loss parameters");
  require(reduction >= 0 && reduction <= 2, "reduction: expected 0 (none), 1 (mean) or 2 (sum)");
  require(fdiv >= 0 && fdiv <= 3, "unknown f-divergence " + std::to_string(fdiv));

  const DType adt = a.dtype == DType::f64 ? DType::f64 : DType::f32;
  if (reduction == 0) check_out(loss, {n}, adt);
  else require(loss.present() && loss.numel() == 1 && loss.dtype == adt, loss.describe() + ": expected one element of dtype " + dtype_name(adt));
  check_out(grads, {5, n}, adt);
  check_out(metrics, {kMetrics}, adt);
  LossArgs s{a, b, c, d, la, lb, w, label, kla, klb, state, loss, grads, metrics, work, LossParams{}};
  LossParams& p = s.p;
  p.family = family;
  p.n_types = int(types.size());
  for (size_t t = 0; t < types.size(); ++t) {
    require(types[t] >= 0 && types[t] <= int(DpoType::sft), "unknown loss type code " + std::to_string(types[t]));
    p.types[t] = types[t];
    p.type_weights[t] = type_weights[t];
  }
  p.beta = params[0]; p.label_smoothing = params[1]; p.f_alpha = params[2]; p.tau = params[3];
  p.gamma = params[4]; p.alpha = params[5]; p.cpo_alpha = params[6]; p.desirable_weight = params[7];
  p.undesirable_weight = params[8]; p.center = params[9];
  p.fdiv = fdiv; p.reduction = reduction; p.has_ref = c.present();
  const int naot = aot_count(p);
  if (naot > 0) {
    require(c.present(), "the aot losses need reference log-probs");
    check_out(work, {int64_t(4) * naot, n}, DType::i32);
  }
  int dev = common_device({&a, &b, &c, &d, &la, &lb, &w, &label, &kla, &klb, &state, &loss, &grads, &metrics, &work});
  dispatch("preference loss", dev, [&] { loss_forward_cpu(s); }, [&] {
#ifdef PYALIGN_WITH_CUDA
    loss_forward_cuda(s, reinterpret_cast<void*>(stream));
#endif
  });
}

}  // namespace

void bind_losses(py::module_& m) {
  m.def("loss_forward", &forward,
        "Preference loss of a batch: per-element or reduced loss, gradients and metrics (writes the outputs)");
}

}  // namespace pyalign
