// Bindings of the plasticity family.
#include "pyalign/bind.h"

namespace pyalign {

void bind_plasticity(py::module_& m) { (void)m; }

}  // namespace pyalign
