"""Hypothesis strategies for hostile inputs: any dtype, shape, stride pattern and value."""
from __future__ import annotations

import math
import re

import torch
from hypothesis import strategies as st

ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64,
              torch.int8, torch.uint8, torch.bool]
SPECIAL = [0.0, -0.0, 1.0, -1.0, 1e4, -1e4, 1e30, -1e30, math.inf, -math.inf, math.nan]
ABSURD_SCALARS = [0, -1, -0.5, 0.0, 1e-30, 1e30, math.inf, -math.inf, math.nan, 1, 0.5, 2.0, True, None, "x"]

# Exceptions that count as a clean refusal.
CLEAN = (TypeError, ValueError, RuntimeError, NotImplementedError, IndexError)


def names_argument(msg: str, names) -> bool:
    """Whether the message names one of the arguments as a whole word (so "x" is not found in "expected")."""
    return any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", msg) for n in names)


@st.composite
def tensors(draw, *, min_dims=0, max_dims=4, max_side=6, dtypes=ALL_DTYPES, shape=None):
    """A tensor of random dtype/shape/layout: contiguous, transposed, sliced, expanded, overlapping
    (rows that share elements through as_strided) or empty."""
    dtype = draw(st.sampled_from(dtypes))
    if shape is None:
        shape = tuple(draw(st.lists(st.integers(0, max_side), min_size=min_dims, max_size=max_dims)))
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced", "expanded", "overlapping"]))
    base_shape = list(shape)
    if layout == "sliced" and base_shape:
        base_shape[-1] = base_shape[-1] * 2
    if layout == "expanded" and base_shape:
        base_shape[0] = 1
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    base = torch.randn(base_shape, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.1, 3.0, 100.0]))
    if base.numel() and draw(st.booleans()):
        flat = base.view(-1)
        for _ in range(draw(st.integers(1, 3))):
            flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.sampled_from(SPECIAL))
    if dtype.is_floating_point:
        t = base.to(dtype)
    elif dtype == torch.bool:
        t = base > 0
    else:
        t = base.nan_to_num(0, 0, 0).clamp(-100, 100).to(dtype)
    if layout == "transposed" and t.dim() >= 2:
        t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "sliced" and t.dim() >= 1:
        t = t[..., ::2]
    elif layout == "expanded" and t.dim() >= 1:
        t = t.expand(*shape)
    elif layout == "overlapping" and t.dim() >= 2 and t.shape[-1] > 1:
        strides = list(t.contiguous().stride())
        strides[-2] = max(1, t.shape[-1] // 2)  # each row starts inside the previous one
        t = t.contiguous().as_strided(t.shape, strides)
    return t


def scalars(valid):
    """Mostly a valid value, sometimes an absurd one."""
    return st.one_of(st.just(valid), st.sampled_from(ABSURD_SCALARS))
