"""numpy in, numpy out: the CPU-side evaluation functions (reward aggregation, calibration,
conformal bounds) also take numpy arrays, through zero-copy ``torch.from_numpy`` views, and then
return numpy arrays (zero-copy views of the CPU result tensors) in the same structure."""
from __future__ import annotations

import functools
import warnings

import numpy as np
import torch


def _to_torch(x):
    if isinstance(x, np.ndarray):
        if any(s < 0 for s in x.strides) or not x.dtype.isnative:
            x = np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("="))  # views torch cannot express
        with warnings.catch_warnings():  # a read-only array is only read here
            warnings.filterwarnings("ignore", message=".*not writable.*")
            return torch.from_numpy(x)
    if isinstance(x, np.generic):
        return x.item()
    return x


def _to_numpy(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, tuple):
        converted = [_to_numpy(v) for v in x]
        return type(x)(*converted) if hasattr(x, "_fields") else tuple(converted)
    return x


def accepts_numpy(fn):
    """Decorates ``fn`` so that numpy array arguments become CPU tensors and, when any was given,
    the results come back as numpy arrays (NamedTuples keep their type, fields converted); numpy
    scalars (``np.float32(0.1)``) become Python numbers either way."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        values = (*args, *kwargs.values())
        if not any(isinstance(a, (np.ndarray, np.generic)) for a in values):
            return fn(*args, **kwargs)
        out = fn(*(_to_torch(a) for a in args), **{k: _to_torch(v) for k, v in kwargs.items()})
        return _to_numpy(out) if any(isinstance(a, np.ndarray) for a in values) else out
    return wrapper
