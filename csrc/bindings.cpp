// The pybind11 module pyalign._C: registers each family's bindings (csrc/bindings/<family>.cpp).
#include "pyalign/bind.h"
#include "pyalign/cpu_dispatch.h"

#ifndef PYALIGN_VERSION
#define PYALIGN_VERSION "0+unknown"
#endif

#ifdef PYALIGN_WITH_CUDA
namespace pyalign { int cuda_device_count(); }
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyalign compiled kernels (called through pyalign's Python API)";
  m.attr("__version__") = PYALIGN_VERSION;
  m.def("has_cuda", &pyalign::built_with_cuda, "True when the CUDA kernels were compiled in");
  m.def("cpu_isa", [] { return std::string(pyalign::isa_name(pyalign::cpu_isa())); },
        "The instruction set the CPU kernels dispatch to on this machine");
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
}
