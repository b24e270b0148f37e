// Bindings of the uncertainty family.
#include "pyalign/bind.h"

namespace pyalign {

void bind_uncertainty(py::module_& m) { (void)m; }

}  // namespace pyalign
