"""Ops of the plasticity family over the kernels of ``csrc/{cpu,cuda}/plasticity``
(math: ``csrc/include/pyalign/plasticity.h``).

``pyalign::plastic_update_`` mutates a weight (and an optional trace) in place; it is an
optimizer-like update, not differentiable. ``pyalign::quad_penalty_`` returns the per-chunk
partial sums of a quadratic consolidation penalty and accumulates its gradient in place.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pyalign._ext import CONTRACT, desc, kernels, stream_of
from pyalign._tensors import acc_dtype
from pyalign.ops._op import kernel_op

PENALTY_CHUNK = CONTRACT["penalty_chunk"]
NORM_MODES = {name: code for code, name in enumerate(CONTRACT["norm_modes"])}


@kernel_op("plastic_update_", mutates_args=("weight", "trace"))
def plastic_update_(
    weight: Tensor, g: Optional[Tensor], g2: Optional[Tensor], trace: Optional[Tensor], row_coef: Optional[Tensor],
    a: float, b: float, c: float, lam: float, s: float, lr: float, keep: float, w_min: float, w_max: float,
    norm: float, norm_mode: int,
) -> None:
    """The fused rule update (see plasticity.h: PlasticCoeffs), in place; ``g`` None: the update with
    G = 0 (no ``g2`` or ``trace`` then)."""
    kernels.plastic_update(
        desc(weight, "weight"), desc(g, "g"), desc(g2, "g2"), desc(trace, "trace"), desc(row_coef, "row_coef"),
        a, b, c, lam, s, lr, keep, w_min, w_max, norm, norm_mode, stream_of(weight),
    )


@plastic_update_.register_fake
def _(weight, g, g2, trace, row_coef, a, b, c, lam, s, lr, keep, w_min, w_max, norm, norm_mode):
    return None


@kernel_op("quad_penalty_", mutates_args=("grad",))
def quad_penalty_(param: Tensor, anchor: Tensor, importance: Tensor, grad: Optional[Tensor],
                  coef: float) -> Tensor:
    """Chunk partial sums of the penalty, its gradient accumulated into ``grad`` in place."""
    partial = torch.empty((param.numel() + PENALTY_CHUNK - 1) // PENALTY_CHUNK, dtype=acc_dtype(param),
                          device=param.device)
    kernels.quad_penalty(desc(param, "param"), desc(anchor, "anchor"), desc(importance, "importance"),
                         desc(grad, "grad"), desc(partial, "partial"), coef, stream_of(param))
    return partial


@quad_penalty_.register_fake
def _(param, anchor, importance, grad, coef):
    return param.new_empty((param.numel() + PENALTY_CHUNK - 1) // PENALTY_CHUNK, dtype=acc_dtype(param))
