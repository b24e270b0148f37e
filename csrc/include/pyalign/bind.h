// Shared by the per-family binding files: the tensor descriptor caster and device dispatch.
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
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
    if (shape.size() > size_t(pyalign::kMaxDims) || strides.size() != shape.size())
      throw std::invalid_argument(t[6].cast<std::string>() + ": at most " +
                                  std::to_string(pyalign::kMaxDims) + " dimensions are supported");
    value.ndim = int(shape.size());
    for (int d = 0; d < value.ndim; ++d) {
      value.shape[d] = shape[d].cast<int64_t>();
      value.strides[d] = strides[d].cast<int64_t>();
    }
    value.device = t[5].cast<int>();
    std::string name = t[6].cast<std::string>();
    std::strncpy(value.name, name.c_str(), sizeof(value.name) - 1);
    return true;
  }
  static handle cast(const pyalign::TensorArg&, return_value_policy, handle) { return none().release(); }
};
}}  // namespace pybind11::detail

namespace pyalign {

namespace py = pybind11;

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

}  // namespace pyalign
