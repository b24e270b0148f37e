// Bindings of the plasticity family: validation that the Python layer cannot bypass, then dispatch.
#include "pyalign/bind.h"
#include "pyalign/plasticity.h"

namespace pyalign {
namespace {

// A matmul result or trace [out, in] beside the weight w: w's shape, stride 1 along in.
void check_matrix(const TensorArg& t, const TensorArg& w, DType dt) {
  if (!t.present()) return;
  require(t.ndim == 2 && t.shape[0] == w.shape[0] && t.shape[1] == w.shape[1],
          t.describe() + ": expected the shape of " + w.describe());
  require(t.dtype == dt, t.describe() + ": expected dtype " + dtype_name(dt));
  check_last_stride(t, "in");
}

void update(TensorArg w, TensorArg g, TensorArg g2, TensorArg e, TensorArg r, double a, double b,
            double c, double lam, double s, double lr, double keep, double w_min, double w_max, double norm,
            int norm_mode, uintptr_t stream) {
  require_tensor(w, "weight", "a float tensor [out, in]");
  check_float(w);
  require(w.ndim == 2, w.describe() + ": expected a 2-d weight [out, in]");
  check_last_stride(w, "in");
  const DType adt = accumulation_dtype(w.dtype);
  for (const TensorArg* t : {&g, &g2, &e}) check_matrix(*t, w, adt);
  require(g.present() || !(g2.present() || e.present()),
          "g: expected a " + std::string(dtype_name(adt)) + " tensor of the shape of " + w.describe() +
              " with g2 or a trace (None, the update with G = 0, takes neither)");
  check_contiguous(r, {w.shape[0]}, adt);
  require(!g2.present() || e.present(), g2.describe() + ": expected None without a trace (g2 is only used together with one)");
  require(norm_mode >= 0 && norm_mode <= 2,
          "norm_mode: expected 0 (none), 1 (max) or 2 (exact), got " + std::to_string(norm_mode));
  require(norm_mode == 0 || (norm > 0 && std::isfinite(norm)),
          "norm: expected a finite value > 0 with a norm constraint, got " + num_str(norm));
  require(!(w_min > w_max), "w_min: expected w_min <= w_max, got w_min " + num_str(w_min) + " > w_max " + num_str(w_max));
  const std::pair<const char*, double> coeffs[] = {{"a", a}, {"b", b},   {"c", c},      {"lam", lam},
                                                   {"s", s}, {"lr", lr}, {"keep", keep}};
  for (const auto& [name, v] : coeffs)
    require(std::isfinite(v), std::string(name) + ": expected a finite plasticity coefficient, got " + num_str(v));
  PlasticArgs args{w, g, g2, e, r, PlasticCoeffs{a, b, c, lam, s, lr, keep, w_min, w_max, norm, norm_mode}};
  int dev = common_device({&w, &g, &g2, &e, &r});
  dispatch("plastic_update", dev, [&] { plastic_update_cpu(args); }, [&] {
#ifdef PYALIGN_WITH_CUDA
    plastic_update_cuda(args, reinterpret_cast<void*>(stream));
#endif
  });
}

void penalty(TensorArg p, TensorArg anchor, TensorArg imp, TensorArg grad, TensorArg partial,
             double coef, uintptr_t stream) {
  require_tensor(p, "param", "a contiguous 1-d float tensor");
  check_float(p);
  require(p.ndim == 1 && is_contiguous(p), p.describe() + ": expected a contiguous 1-d tensor");
  const int64_t n = p.shape[0];
  const DType adt = accumulation_dtype(p.dtype);
  require_contiguous(anchor, "anchor", {n}, p.dtype);
  check_contiguous(grad, {n}, p.dtype);
  require_contiguous(imp, "importance", {n}, adt);
  require_contiguous(partial, "partial", {(n + kPenaltyChunk - 1) / kPenaltyChunk}, adt);
  require(std::isfinite(coef), "coef: expected a finite value, got " + num_str(coef));
  PenaltyArgs args{p, anchor, imp, grad, partial, coef};
  int dev = common_device({&p, &anchor, &imp, &grad, &partial});
  dispatch("quad_penalty", dev, [&] { quad_penalty_cpu(args); }, [&] {
#ifdef PYALIGN_WITH_CUDA
    quad_penalty_cuda(args, reinterpret_cast<void*>(stream));
#endif
  });
}

}  // namespace

void bind_plasticity(py::module_& m) {
  m.def("plastic_update", &update, "Fused elementwise weight update of a local learning rule (in place)");
  m.def("quad_penalty", &penalty, "Quadratic consolidation penalty partial sums, gradient accumulated in place");
}

}  // namespace pyalign
