// Bindings of the losses family.
#include "pyalign/bind.h"

namespace pyalign {

void bind_losses(py::module_& m) { (void)m; }

}  // namespace pyalign
