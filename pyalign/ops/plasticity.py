"""Custom ops of the plasticity family over pyalign._C (see csrc/include/pyalign/plasticity.h).

``pyalign::plastic_update_`` mutates a weight (and an optional trace) in place; it is an
optimizer-like update, not differentiable. ``pyalign::quad_penalty_`` returns the per-chunk
partial sums of a quadratic consolidation penalty and accumulates its gradient in place.

Outside ``torch.compile`` the public API calls :func:`plastic_update` and :func:`quad_penalty`
directly (the same kernels without the dispatcher's per-call overhead, which matters for small
weights updated every step); under ``torch.compile`` it goes through the custom ops.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pyalign._ext import kernels, desc, stream_of

PENALTY_CHUNK = 8192  # kPenaltyChunk in plasticity.h
NORM_MODES = {"none": 0, "max": 1, "exact": 2}


def plastic_update(weight, g, g2, trace, row_coef, a, b, c, lam, s, lr, keep, w_min, w_max, norm, norm_mode):
    """The fused rule update (see plasticity.h: PlasticCoeffs), called directly."""
    kernels.plastic_update(
        desc(weight, "weight"), desc(g, "g"), desc(g2, "g2"), desc(trace, "trace"), desc(row_coef, "row_coef"),
        a, b, c, lam, s, lr, keep, w_min, w_max, norm, norm_mode, stream_of(weight),
    )


@torch.library.custom_op("pyalign::plastic_update_", mutates_args=("weight", "trace"))
def plastic_update_(
    weight: Tensor, g: Tensor, g2: Optional[Tensor], trace: Optional[Tensor], row_coef: Optional[Tensor],
    a: float, b: float, c: float, lam: float, s: float, lr: float, keep: float, w_min: float, w_max: float,
    norm: float, norm_mode: int,
) -> None:
    plastic_update(weight, g, g2, trace, row_coef, a, b, c, lam, s, lr, keep, w_min, w_max, norm, norm_mode)


@plastic_update_.register_fake
def _(weight, g, g2, trace, row_coef, a, b, c, lam, s, lr, keep, w_min, w_max, norm, norm_mode):
    return None


def quad_penalty(param, anchor, importance, grad, coef):
    """Chunk partial sums of the penalty, gradient accumulated into ``grad``; called directly."""
    n = param.numel()
    acc = torch.float64 if param.dtype == torch.float64 else torch.float32
    partial = torch.empty((n + PENALTY_CHUNK - 1) // PENALTY_CHUNK, dtype=acc, device=param.device)
    kernels.quad_penalty(desc(param, "param"), desc(anchor, "anchor"), desc(importance, "importance"),
                    desc(grad, "grad"), desc(partial, "partial"), coef, stream_of(param))
    return partial


@torch.library.custom_op("pyalign::quad_penalty_", mutates_args=("grad",))
def quad_penalty_(param: Tensor, anchor: Tensor, importance: Tensor, grad: Optional[Tensor],
                  coef: float) -> Tensor:
    return quad_penalty(param, anchor, importance, grad, coef)


@quad_penalty_.register_fake
def _(param, anchor, importance, grad, coef):
    acc = torch.float64 if param.dtype == torch.float64 else torch.float32
    return param.new_empty((param.numel() + PENALTY_CHUNK - 1) // PENALTY_CHUNK, dtype=acc)
