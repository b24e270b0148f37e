"""Tensor rules shared by every family: the accumulation dtype, the head's compute dtype, dense
upstream gradients, output buffers, the label codes of the vocabulary-slice kernels."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

# Label codes handed to the vocabulary-slice kernels (vocab-blocked backward, vocab-parallel shards),
# which take the code of an ignored row as their ignore_index: an ignored row, and a label that lies in
# another slice (any negative label other than the ignore code means "elsewhere").
LABEL_IGNORE = -(1 << 62)
LABEL_ELSEWHERE = -1


def acc_dtype(x) -> torch.dtype:
    """The accumulation (and result) dtype for inputs of ``x``'s dtype: fp64 for fp64, else fp32."""
    dt = x.dtype if isinstance(x, Tensor) else x
    return torch.float64 if dt == torch.float64 else torch.float32


def dense_grad(g: Optional[Tensor], dtype: torch.dtype, present: bool = True) -> Optional[Tensor]:
    """An upstream gradient as the kernels want it (dense, in ``dtype``), or None. Upstream gradients
    may be expanded (stride 0, e.g. from ``.sum()``)."""
    return None if (g is None or not present) else g.to(dtype).contiguous()


def empty_rows_like(t: Tensor) -> Tensor:
    """A fresh buffer shaped like ``t`` whose last dimension has stride 1 (the layout the kernels
    write): ``t``'s own layout where that has it, else row-major."""
    out = torch.empty_like(t)
    if out.ndim and out.shape[-1] > 1 and out.stride(-1) != 1:
        out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    return out


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """Autocast's dtype for ``device_type`` when autocast is enabled there, else None."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # older torch: no per-device query
        enabled = torch.is_autocast_enabled() if device_type == "cuda" else (
            device_type == "cpu" and torch.is_autocast_cpu_enabled())
    if not enabled:
        return None
    try:
        return torch.get_autocast_dtype(device_type)
    except (AttributeError, TypeError):
        return torch.get_autocast_gpu_dtype() if device_type == "cuda" else torch.get_autocast_cpu_dtype()


def compute_dtype(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> torch.dtype:
    """The dtype an LM head's GEMMs run in: autocast's dtype under ``torch.autocast`` for the device
    (fp64 inputs excepted), else the promotion of the inputs' dtypes."""
    ts = [t for t in (hidden, weight, bias) if t is not None]
    if all(t.dtype != torch.float64 for t in ts):
        ac = _autocast_dtype(hidden.device.type)
        if ac is not None:
            return ac
    dt = hidden.dtype
    for t in ts[1:]:
        dt = torch.promote_types(dt, t.dtype)
    return dt


def gathered(t: Optional[Tensor]) -> Optional[Tensor]:
    """A DTensor-sharded parameter (an FSDP2 ``fully_shard`` LM head, read outside its module's
    forward) gathered whole for the call, differentiably: its gradient goes back to the shards
    averaged over the mesh's ranks (``Partial("avg")``), as FSDP2 averages the gradients it reduces.
    Plain tensors pass through."""
    if t is None or type(t) in (Tensor, torch.nn.Parameter):
        return t
    try:
        from torch.distributed.tensor import DTensor, Partial
    except ImportError:  # a torch built without distributed has no DTensor
        return t
    if isinstance(t, DTensor):
        return t.full_tensor(grad_placements=[Partial("avg")] * t.device_mesh.ndim)
    return t


def cast_head(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """``(hidden, weight, bias)`` in :func:`compute_dtype` (differentiable casts, no-ops when equal)."""
    dt = compute_dtype(hidden, weight, bias)
    cast = lambda t: t if (t is None or t.dtype == dt) else t.to(dt)
    return cast(hidden), cast(weight), cast(bias)
