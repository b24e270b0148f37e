"""The one module that touches the compiled core: loads it, checks its stamps, and turns tensors
into the descriptors its kernels take.

The core is the top-level extension module ``_pyalign``, installed beside this package (not inside
it), so this package works the same from site-packages and from a source checkout. It does not
link libtorch: each tensor crosses as a descriptor ``(tensor, data_ptr, dtype_code, shape, strides,
device_index, name)`` and every output is allocated here with torch, so the caching allocator and
memory statistics see it. The descriptor holds the tensor itself, so a tensor made on the fly
(``desc(x.contiguous(), "x")``) lives until the kernel has returned.
"""
from __future__ import annotations

import os

import torch

from pyalign._version import __version__

# Changes together with kAbiVersion in csrc/include/pyalign/contract.h.
ABI_VERSION = 4

_REINSTALL = "reinstall it from this source tree with `pip install .`"

try:
    import _pyalign as kernels
except ImportError as e:  # pragma: no cover - only without a built core
    raise ImportError(f"pyalign's compiled core (the module _pyalign) is not installed: {_REINSTALL} "
                      f"(a C++17 compiler and CMake >= 3.24 are needed; see docs/development.md)") from e

if getattr(kernels, "ABI_VERSION", None) != ABI_VERSION or kernels.__version__ != __version__:
    raise ImportError(
        f"pyalign's compiled core at {kernels.__file__} is stale: it has version {kernels.__version__} and ABI "
        f"{getattr(kernels, 'ABI_VERSION', 'none')}, this package needs version {__version__} and ABI {ABI_VERSION}; "
        f"{_REINSTALL}")


def _check_isa_request() -> None:
    want = os.environ.get("PYALIGN_CPU_ISA")
    if want is None:
        return
    levels = ("baseline", "avx2", "avx512")
    best = kernels.cpu_isa_supported()
    if want not in levels:
        raise ImportError(f"PYALIGN_CPU_ISA: expected one of {', '.join(levels)}, got {want!r}")
    if levels.index(want) > levels.index(best):
        raise ImportError(f"PYALIGN_CPU_ISA: {want!r} is not supported by this CPU (at most {best!r})")
    if kernels.cpu_isa() != want:  # the core read the variable before it was set
        raise ImportError(f"PYALIGN_CPU_ISA: {want!r} was set after the core chose {kernels.cpu_isa()!r}; "
                          "set it before the process starts")


_check_isa_request()

# Every code and layout shared with the kernels (csrc/include/pyalign/contract.h), by name.
CONTRACT = kernels.contract()
DTYPE_CODES = {getattr(torch, name): code for name, code in CONTRACT["dtypes"].items()}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
HAS_CUDA = bool(kernels.has_cuda())  # read once: no call into the core while torch.compile traces


def desc(t: torch.Tensor | None, name: str):
    """The descriptor of ``t`` for the compiled core (None stays None: an absent argument). It
    holds ``t``, so ``t`` stays alive for as long as the descriptor does."""
    if t is None:
        return None
    code = DTYPE_CODES.get(t.dtype)
    if code is None:
        raise TypeError(f"{name}: dtype {t.dtype} is not supported by pyalign")
    if t.is_cuda:
        device = t.get_device()
    elif t.is_cpu:
        device = -1
    else:
        raise ValueError(f"{name}: tensors on {t.device.type} are not supported (cpu or cuda only)")
    return (t, t.data_ptr(), code, t.shape, t.stride(), device, name)  # torch.Size is a tuple


def stream_of(t: torch.Tensor) -> int:
    """The raw handle of the current CUDA stream of ``t``'s device (0 on CPU)."""
    if t.device.type == "cuda":
        return torch.cuda.current_stream(t.device).cuda_stream
    return 0


def check_cuda_supported(t: torch.Tensor, what: str) -> None:
    if t.device.type == "cuda" and not HAS_CUDA:
        raise RuntimeError(
            f"{what}: got a CUDA tensor, but this pyalign build has no CUDA kernels "
            "(built without nvcc or with PYALIGN_CUDA=OFF); reinstall with a CUDA toolkit present"
        )
