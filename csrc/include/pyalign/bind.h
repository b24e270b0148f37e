// Shared by the per-family binding files: the tensor descriptor caster, the argument checks (whose
// messages name the argument and say what was expected) and device dispatch.
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <sstream>
#include "pyalign/tensor.h"

namespace pybind11 { namespace detail {
// A TensorArg arrives from pyalign/_ext.py as (tensor, data_ptr, dtype_code, shape, strides,
// device, name), or None for an absent optional tensor. The tensor itself rides along unread: the
// tuple keeps it alive until the kernel returns, whatever the caller does with its own reference.
template <> struct type_caster<pyalign::TensorArg> {
  PYBIND11_TYPE_CASTER(pyalign::TensorArg, const_name("TensorArg"));
  bool load(handle src, bool) {
    if (src.is_none()) { value = pyalign::TensorArg{}; return true; }
    if (!isinstance<tuple>(src)) return false;
    auto t = reinterpret_borrow<tuple>(src);
    if (t.size() != 7) return false;
    value.data = reinterpret_cast<void*>(t[1].cast<uintptr_t>());
    value.dtype = static_cast<pyalign::DType>(t[2].cast<int>());
    auto shape = t[3].cast<tuple>();
    auto strides = t[4].cast<tuple>();
    if (shape.size() > size_t(pyalign::kMaxDims))
      throw std::invalid_argument(t[6].cast<std::string>() + ": expected at most " + std::to_string(pyalign::kMaxDims) +
                                  " dimensions, got " + std::to_string(shape.size()));
    if (strides.size() != shape.size())
      throw std::invalid_argument(t[6].cast<std::string>() + ": expected one stride per dimension, got " +
                                  std::to_string(strides.size()) + " strides for " + std::to_string(shape.size()) +
                                  " dimensions");
    value.ndim = int(shape.size());
    for (int d = 0; d < value.ndim; ++d) {
      value.shape[d] = shape[d].cast<int64_t>();
      value.strides[d] = strides[d].cast<int64_t>();
    }
    value.device = t[5].cast<int>();
    const std::string arg = t[6].cast<std::string>();
    std::strncpy(value.name, arg.c_str(), sizeof(value.name) - 1);
    return true;
  }
  static handle cast(const pyalign::TensorArg&, return_value_policy, handle) { return none().release(); }
};
}}  // namespace pybind11::detail

namespace pyalign {

namespace py = pybind11;

// ---- argument checks: a failure names the argument and says what was expected ----

inline std::string dims_str(const int64_t* v, int n) {
  std::string s = "[";
  for (int d = 0; d < n; ++d) s += (d ? ", " : "") + std::to_string(v[d]);
  return s + "]";
}
inline std::string dims_str(std::initializer_list<int64_t> v) { return dims_str(v.begin(), int(v.size())); }

// A scalar argument's value as the user wrote it (1e-08, not 0.000000).
inline std::string num_str(double v) {
  std::ostringstream o;
  o << v;
  return o.str();
}

// Row-major with no gaps; the strides of size-1 dimensions and of empty tensors are irrelevant.
inline bool is_contiguous(const TensorArg& t) {
  if (t.numel() == 0) return true;
  int64_t expect = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    if (t.shape[d] > 1 && t.strides[d] != expect) return false;
    expect *= t.shape[d];
  }
  return true;
}

inline std::string contiguous_desc(std::initializer_list<int64_t> shape, DType dt) {
  return std::string("a contiguous ") + dtype_name(dt) + " tensor of shape " + dims_str(shape);
}

// An optional tensor: if present, contiguous, of this shape and dtype.
inline void check_contiguous(const TensorArg& t, std::initializer_list<int64_t> shape, DType dt) {
  if (!t.present()) return;
  bool same = t.ndim == int(shape.size());
  for (int d = 0; same && d < t.ndim; ++d) same = t.shape[d] == shape.begin()[d];
  if (!same) fail(t.describe() + ": expected " + contiguous_desc(shape, dt));
  if (!is_contiguous(t))
    fail(t.describe() + ": expected " + contiguous_desc(shape, dt) + ", got strides " + dims_str(t.strides, t.ndim));
  if (t.dtype != dt) fail(t.describe() + ": expected dtype " + dtype_name(dt));
}

// A required argument: None is refused, naming it by `arg` (an absent descriptor carries no name).
inline void require_tensor(const TensorArg& t, const char* arg, const std::string& expected) {
  if (!t.present()) fail(std::string(arg) + ": expected " + expected + ", got None");
}
inline void require_contiguous(const TensorArg& t, const char* arg, std::initializer_list<int64_t> shape, DType dt) {
  if (!t.present()) fail(std::string(arg) + ": expected " + contiguous_desc(shape, dt) + ", got None");
  check_contiguous(t, shape, dt);
}

inline void check_float(const TensorArg& t) {
  if (!is_float_dtype(t.dtype)) fail(t.describe() + ": expected dtype float32, float16, bfloat16 or float64");
}

// The kernels read and write rows of the last dimension (`what`: its meaning) with unit stride.
inline void check_last_stride(const TensorArg& t, const char* what) {
  if (t.ndim >= 1 && t.size(-1) > 1 && t.stride(-1) != 1)
    fail(t.describe() + ": expected stride 1 along the last (" + what + ") dimension, got stride " +
         std::to_string(t.stride(-1)));
}

// A gradient written like its input: the dtype and shape of ref.
inline void check_like(const TensorArg& t, const TensorArg& ref) {
  if (t.dtype != ref.dtype)
    fail(t.describe() + ": expected dtype " + dtype_name(ref.dtype) + " (the dtype of " + ref.describe() + ")");
  bool same = t.ndim == ref.ndim;
  for (int d = 0; same && d < t.ndim; ++d) same = t.shape[d] == ref.shape[d];
  if (!same) fail(t.describe() + ": expected the shape of " + ref.describe());
}

// All present tensors must be on the same device; returns it (-1 for CPU).
inline int common_device(std::initializer_list<const TensorArg*> ts) {
  int dev = -2;
  std::string first;
  for (const TensorArg* t : ts) {
    if (!t->present()) continue;
    if (dev == -2) { dev = t->device; first = t->name; continue; }
    require(t->device == dev, "'" + std::string(t->name) + "' is on " + (t->device < 0 ? std::string("cpu") : "cuda:" + std::to_string(t->device)) +
                                  " but '" + first + "' is on " + (dev < 0 ? std::string("cpu") : "cuda:" + std::to_string(dev)));
  }
  return dev == -2 ? -1 : dev;
}

#ifdef PYALIGN_WITH_CUDA
int cuda_device_count();  // csrc/cuda/device.cu
#endif

inline bool built_with_cuda() {
#ifdef PYALIGN_WITH_CUDA
  return true;
#else
  return false;
#endif
}

[[noreturn]] inline void no_cuda(const char* what) {
  fail(std::string(what) + ": got CUDA tensors, but this pyalign build has no CUDA kernels "
       "(built without nvcc or with PYALIGN_CUDA=OFF); reinstall with a CUDA toolkit present");
}

// Runs cpu() or cuda() with the GIL released.
template <typename Cpu, typename Cuda>
void dispatch(const char* what, int device, Cpu&& cpu, Cuda&& cuda) {
  if (device >= 0) {
    if (!built_with_cuda()) no_cuda(what);
    py::gil_scoped_release nogil;
    cuda();
  } else {
    py::gil_scoped_release nogil;
    cpu();
  }
}

void bind_logprob(py::module_& m);
void bind_losses(py::module_& m);
void bind_uncertainty(py::module_& m);
void bind_plasticity(py::module_& m);
void bind_rl(py::module_& m);
void bind_distill(py::module_& m);

}  // namespace pyalign
