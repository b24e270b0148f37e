"""Argument checks shared by the public API: each error names the argument and what was expected."""
from __future__ import annotations

import math

import torch

from pyalign._ext import FLOAT_DTYPES, check_cuda_supported


def tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def float_tensor(x, name: str, *, allow_fp64: bool = True) -> torch.Tensor:
    tensor(x, name)
    ok = FLOAT_DTYPES if allow_fp64 else FLOAT_DTYPES[:3]
    if x.dtype not in ok:
        raise TypeError(f"{name}: expected a floating tensor ({', '.join(str(d) for d in ok)}), got {x.dtype}")
    check_cuda_supported(x, name)
    return x


def index_tensor(x, name: str) -> torch.Tensor:
    tensor(x, name)
    if x.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: expected an int32 or int64 tensor, got {x.dtype}")
    return x


def same_device(*named: tuple[str, torch.Tensor | None]) -> None:
    present = [(n, t) for n, t in named if t is not None]
    for n, t in present[1:]:
        if t.device != present[0][1].device:
            raise ValueError(f"{n}: expected a tensor on {present[0][1].device} like {present[0][0]}, got {t.device}")


def positive(x, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {x!r}")
    return float(x)


def finite(x, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ValueError(f"{name}: expected a finite number, got {x!r}")
    return float(x)


def choice(x, name: str, options) -> str:
    if x not in options:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, options))}, got {x!r}")
    return x


def _elements_disjoint(shape, stride) -> bool:
    """True when no two indices of a strided view address the same element: sorted by stride, each
    dimension must step past everything the smaller-strided dimensions can reach (transposes and
    slices pass; expanded and overlapping as_strided views do not)."""
    reach = 0
    for st, n in sorted((st, n) for st, n in zip(stride, shape) if n > 1):
        if st <= reach:
            return False
        reach += (n - 1) * st
    return True


def writable(x: torch.Tensor, name: str) -> torch.Tensor:
    """Refuses a tensor to be written in place whose elements share memory (expanded/overlapping views)."""
    if torch.compiler.is_compiling():  # symbolic strides: only the zero-stride case is decidable
        overlap = any(st == 0 and n > 1 for st, n in zip(x.stride(), x.shape))
    else:
        overlap = not _elements_disjoint(x.shape, x.stride())
    if overlap:
        raise ValueError(f"{name}: is written in place, so its elements must not overlap in memory "
                         f"(got shape {tuple(x.shape)} with strides {tuple(x.stride())}; pass a .clone() or "
                         ".contiguous() tensor)")
    return x
