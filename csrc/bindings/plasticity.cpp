// Bindings of the plasticity family: validation that the Python layer cannot bypass, then dispatch.
#include "pyalign/bind.h"
#include "pyalign/plasticity.h"

namespace pyalign {
namespace {

bool is_float(DType d) { return d == DType::f32 || d == DType::f16 || d == DType::bf16 || d == DType::f64; }
DType acc_dtype(DType d) { return d == DType::f64 ? DType::f64 : DType::f32; }

void check_matrix(const TensorArg& t, const TensorArg& w, DType dt) {
  if (!t.present()) return;
  require(t.ndim == 2 && t.shape[0] == w.shape[0] && t.shape[1] == w.shape[1],
          t.describe() + ": expected the shape of " + w.describe());
  require(t.dtype == dt, t.describe() + ": expected dtype " + dtype_name(dt));
  require(t.strides[1] == 1 || t.shape[1] <= 1, t.describe() + ": the last dimension must have stride 1");
}

void check_vector(const TensorArg& t, int64_t n, DType dt) {
  if (!t.present()) return;
  require(t.ndim == 1 && t.shape[0] == n && (n <= 1 || t.strides[0] == 1),
          t.describe() + ": expected a contiguous 1-d tensor of " + std::to_string(n) + " elements");
  require(t.dtype == dt, t.describe() + ": expected dtype " + dtype_name(dt));
}

void update(TensorArg w, TensorArg g, TensorArg g2, TensorArg e, TensorArg r, double a, double b,
            double c, double lam, double s, double lr, double keep, double w_min, double w_max, double norm,
            int norm_mode, uintptr_t stream) {
  require(w.present() && g.present(), "weight and the matmul result are required");
  require(is_float(w.dtype), w.describe() + ": expected float32, float16, bfloat16 or float64");
  require(w.ndim == 2, w.describe() + ": expected a 2-d weight [out, in]");
  require(w.strides[1] == 1 || w.shape[1] <= 1, w.describe() + ": the last dimension must have stride 1");
  const DType adt = acc_dtype(w.dtype);
  for (const TensorArg* t : {&g, &g2, &e}) check_matrix(*t, w, adt);
  check_vector(r, w.shape[0], adt);
  require(!g2.present() || e.present(), "g2 is only used together with a trace");
  require(norm_mode >= 0 && norm_mode <= 2, "norm_mode: expected 0 (none), 1 (max) or 2 (exact)");
  require(norm_mode == 0 || (norm > 0 && std::isfinite(norm)), "norm: expected a finite value > 0");
  require(!(w_min > w_max), "w_min: expected w_min <= w_max");
  for (double v : {a, b, c, lam, s, lr, keep})
    require(std::isfinite(v), "plasticity coefficients must be finite");
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
  require(p.present() && anchor.present() && imp.present() && partial.present(),
          "param, anchor, importance and partial are required");
  require(is_float(p.dtype), p.describe() + ": expected float32, float16, bfloat16 or float64");
  require(p.ndim == 1 && (p.shape[0] <= 1 || p.strides[0] == 1), p.describe() + ": expected a contiguous 1-d tensor");
  const int64_t n = p.shape[0];
  check_vector(anchor, n, p.dtype);
  check_vector(grad, n, p.dtype);
  check_vector(imp, n, acc_dtype(p.dtype));
  check_vector(partial, (n + kPenaltyChunk - 1) / kPenaltyChunk, acc_dtype(p.dtype));
  require(std::isfinite(coef), "coef: expected a finite value");
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
