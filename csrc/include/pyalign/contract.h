// The contract between the compiled core and the Python layer (pyalign/_ext.py): constants both
// sides must agree on. The core exports them by name (contract() in bindings/module.cpp) and
// Python reads them from there; kAbiVersion changes whenever a kernel's signature or a constant's
// meaning changes, and `import pyalign` refuses a core whose version differs from its own.
#pragma once

namespace pyalign {

constexpr int kAbiVersion = 1;

}  // namespace pyalign
