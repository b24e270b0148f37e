"""Loads the compiled core and turns tensors into the descriptors it takes.

The core (``pyalign._C``) does not link libtorch: each tensor crosses as
``(data_ptr, dtype_code, shape, strides, device_index, name)`` and every output is allocated
here with torch, so the caching allocator and memory statistics see it.
"""
from __future__ import annotations

import torch

try:
    from pyalign import _C
except ImportError as e:  # pragma: no cover - only without a built extension
    raise ImportError(
        "pyalign's compiled core (pyalign._C) is missing: install pyalign with `pip install .` "
        "rather than importing it from a source tree; if you run from the repository root, the "
        "source folder pyalign/ shadows the installed package"
    ) from e

# Same codes as csrc/include/pyalign/common.h: DType.
DTYPE_CODES = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float64: 3,
    torch.int32: 4,
    torch.int64: 5,
    torch.uint8: 6,
    torch.bool: 7,
}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def desc(t: torch.Tensor | None, name: str):
    """The descriptor of ``t`` for the compiled core (None stays None: an absent argument).

    It holds ``t``'s data pointer, not ``t``: the caller keeps ``t`` alive until the kernel has run
    (never ``desc(x.contiguous(), ...)`` on a temporary)."""
    if t is None:
        return None
    code = DTYPE_CODES.get(t.dtype)
    if code is None:
        raise TypeError(f"{name}: dtype {t.dtype} is not supported by pyalign")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: tensors on {t.device.type} are not supported (cpu or cuda only)")
    device = t.device.index if t.device.type == "cuda" else -1
    return (t.data_ptr(), code, tuple(t.shape), tuple(t.stride()), device, name)


def empty_rows_like(t: torch.Tensor) -> torch.Tensor:
    """A fresh buffer shaped like ``t`` whose last dimension has stride 1 (the layout the kernels
    write): ``t``'s own layout where that has it, else row-major."""
    out = torch.empty_like(t)
    if out.ndim and out.shape[-1] > 1 and out.stride(-1) != 1:
        out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    return out


def stream_of(t: torch.Tensor) -> int:
    """The raw handle of the current CUDA stream of ``t``'s device (0 on CPU)."""
    if t.device.type == "cuda":
        return torch.cuda.current_stream(t.device).cuda_stream
    return 0


def check_cuda_supported(t: torch.Tensor, what: str) -> None:
    if t.device.type == "cuda" and not _C.has_cuda():
        raise RuntimeError(
            f"{what}: got a CUDA tensor, but this pyalign build has no CUDA kernels "
            "(built without nvcc or with PYALIGN_CUDA=OFF); reinstall with a CUDA toolkit present"
        )
