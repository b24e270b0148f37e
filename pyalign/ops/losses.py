"""Custom op of the preference losses: ``pyalign::preference_loss``.

One op serves every loss family (see ``csrc/include/pyalign/losses.h``). Its forward computes the
(per-element or reduced) loss, the gradient of that loss w.r.t. each log-prob input and the
per-pair weights, and the metrics; the backward only scales the saved gradients by the incoming
gradient, so it needs no second kernel.

Outside ``torch.compile`` the same computation is reached through a ``torch.autograd.Function``
(``preference_loss``), which skips the custom-op dispatch (about 10 µs a call, comparable to the
whole kernel for a batch of 64 pairs). Under ``torch.compile`` the custom op is used, so the graph
has no break. Both paths run the same kernel and give bitwise the same results.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pyalign._ext import kernels, desc, stream_of

FAMILIES = {"dpo": 0, "kto": 1, "bco": 2, "orpo": 3, "cpo": 4, "rm": 5}
# Same order as csrc/include/pyalign/losses.h: DpoType.
DPO_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
             "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
CPO_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
KTO_TYPES = ("kto", "apo_zero_unpaired")
REDUCTIONS = ("none", "mean", "sum")
N_METRICS = 16
N_PARAMS = 10  # beta, label_smoothing, f_alpha, tau, gamma, alpha, cpo_alpha, desirable_w, undesirable_w, center
_AOT = (DPO_TYPES.index("aot"), DPO_TYPES.index("aot_unpaired"))


def _acc_dtype(a: Tensor) -> torch.dtype:
    return torch.float64 if a.dtype == torch.float64 else torch.float32


def _compute(a, b, c, d, la, lb, w, label, kla, klb, state, family, types, type_weights, params,
             fdiv, reduction):
    n = a.shape[0]
    acc = _acc_dtype(a)
    dev = a.device
    loss = torch.empty(n if reduction == 0 else (), dtype=acc, device=dev)
    grads = torch.empty(5, n, dtype=acc, device=dev)
    metrics = torch.empty(N_METRICS, dtype=acc, device=dev)
    naot = sum(1 for t in types if t in _AOT) if family == 0 else 0
    work = torch.empty(4 * naot, n, dtype=torch.int32, device=dev) if naot else None
    kernels.loss_forward(
        desc(a, "a"), desc(b, "b"), desc(c, "c"), desc(d, "d"), desc(la, "la"), desc(lb, "lb"),
        desc(w, "w"), desc(label, "label"), desc(kla, "kla"), desc(klb, "klb"), desc(state, "state"),
        desc(loss, "loss"), desc(grads, "grads"), desc(metrics, "metrics"), desc(work, "work"),
        family, types, type_weights, params, fdiv, reduction, stream_of(a),
    )
    return loss, grads, metrics


@torch.library.custom_op("pyalign::preference_loss", mutates_args=())
def preference_loss_op(
    a: Tensor, b: Optional[Tensor], c: Optional[Tensor], d: Optional[Tensor], la: Optional[Tensor],
    lb: Optional[Tensor], w: Optional[Tensor], label: Optional[Tensor], kla: Optional[Tensor],
    klb: Optional[Tensor], state: Optional[Tensor], family: int, types: list[int],
    type_weights: list[float], params: list[float], fdiv: int, reduction: int,
) -> tuple[Tensor, Tensor, Tensor]:
    return _compute(a, b, c, d, la, lb, w, label, kla, klb, state, family, types, type_weights,
                    params, fdiv, reduction)


@preference_loss_op.register_fake
def _(a, b, c, d, la, lb, w, label, kla, klb, state, family, types, type_weights, params, fdiv,
      reduction):
    n = a.shape[0]
    acc = _acc_dtype(a)
    loss = a.new_empty(n if reduction == 0 else (), dtype=acc)
    return loss, a.new_empty(5, n, dtype=acc), a.new_empty(N_METRICS, dtype=acc)


_GRAD_SLOT = {0: 0, 1: 1, 2: 2, 3: 3, 6: 4}  # input index (a, b, c, d, w) -> row of grads


def _input_grads(needs, dtypes, grads, g_loss):
    """Gradients of the 11 tensor inputs (None for the non-differentiable ones), then 6 Nones."""
    out = [None] * 17
    if g_loss is None:  # no gradient reached the loss (grads are not materialized as zeros)
        return tuple(out)
    for idx, k in _GRAD_SLOT.items():
        if dtypes[idx] is not None and needs[idx]:
            out[idx] = (grads[k] * g_loss).to(dtypes[idx])
    return tuple(out)


def _setup_context(ctx, inputs, output):
    _, grads, metrics = output
    ctx.mark_non_differentiable(grads, metrics)
    # The gradients and metrics outputs never receive a gradient: without this, autograd would
    # allocate and zero-fill a [5, N] tensor for them on every backward (as costly as the kernel).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grads)
    ctx.dtypes = [None if t is None else t.dtype for t in inputs[:11]]


def _backward(ctx, g_loss, g_grads, g_metrics):
    (grads,) = ctx.saved_tensors
    return _input_grads(ctx.needs_input_grad, ctx.dtypes, grads, g_loss)


preference_loss_op.register_autograd(_backward, setup_context=_setup_context)


class _Direct(torch.autograd.Function):
    """The same forward/backward as the custom op, without the dispatcher (eager mode only)."""

    @staticmethod
    def forward(ctx, a, b, c, d, la, lb, w, label, kla, klb, state, family, types, type_weights,
                params, fdiv, reduction):
        loss, grads, metrics = _compute(a, b, c, d, la, lb, w, label, kla, klb, state, family, types,
                                        type_weights, params, fdiv, reduction)
        ctx.mark_non_differentiable(grads, metrics)
        ctx.set_materialize_grads(False)  # as in _setup_context: no zero-filled [5, N] per backward
        ctx.save_for_backward(grads)
        ctx.dtypes = [None if t is None else t.dtype for t in (a, b, c, d, la, lb, w, label, kla, klb, state)]
        return loss, grads, metrics

    @staticmethod
    def backward(ctx, g_loss, g_grads, g_metrics):
        (grads,) = ctx.saved_tensors
        return _input_grads(ctx.needs_input_grad, ctx.dtypes, grads, g_loss)


def preference_loss(a, b, c, d, la, lb, w, label, kla, klb, state, family, types, type_weights,
                    params, fdiv, reduction):
    """Runs the loss kernel with autograd: the custom op under torch.compile, else a direct call."""
    args = (a, b, c, d, la, lb, w, label, kla, klb, state, family, types, type_weights, params, fdiv,
            reduction)
    if torch.compiler.is_compiling():
        return preference_loss_op(*args)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (a, b, c, d, w)):
        return _Direct.apply(*args)
    return _compute(*args)
