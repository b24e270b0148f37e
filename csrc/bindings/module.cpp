// The pybind11 module _pyalign (the compiled core): its identity (version, ABI, build) and each
// family's bindings (csrc/bindings/<family>.cpp).
#include "pyalign/bind.h"
#include "pyalign/contract.h"
#include "pyalign/cpu_dispatch.h"

#ifndef PYALIGN_VERSION
#define PYALIGN_VERSION "0+unknown"
#endif

PYBIND11_MODULE(_pyalign, m) {
  m.doc() = "pyalign's compiled kernels (called through the Python package pyalign)";
  m.attr("__version__") = PYALIGN_VERSION;
  m.attr("ABI_VERSION") = pyalign::kAbiVersion;
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
}
