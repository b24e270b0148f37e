"""Custom ops of the log-prob family: ``pyalign::token_logprobs`` and its backward.

The forward returns flat ``[rows]`` tensors; absent optional outputs are empty ``[0]`` tensors so
the schema stays fixed. ``shift`` is an op argument (not a view taken outside) so that the
gradient is written for the full logits at once, with no slice-backward copy.

Differentiable outputs: the log-probs, the entropy, the log-sum-exp (``lse``) and ``mean_logit``
(``d lse/dz_v = p_v``, ``d mean/dz_v = w_v / V``); all four upstream gradients are folded into
the one backward pass over the logits. ``mean_weights`` (``[V]``, optional) turns ``mean_logit``
into ``sum_v w_v z_v / V`` (the class-weighted label-smoothing term); it gets no gradient.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pyalign._ext import kernels, desc, empty_rows_like, stream_of

ENTROPY, LOG_SUM_SQ, MEAN_LOGIT, TOP1 = 1, 2, 4, 8


def _shifted(logits: Tensor, labels: Tensor, shift: bool) -> tuple[Tensor, Tensor]:
    if shift:
        return logits[..., :-1, :], labels[..., 1:]
    return logits, labels


def _acc_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


@torch.library.custom_op("pyalign::token_logprobs", mutates_args=())
def token_logprobs_op(
    logits: Tensor, labels: Tensor, ignore_index: int, temperature: float, logit_scale: float,
    softcap: float, shift: bool, outputs: int, inplace_backward: bool,
    mean_weights: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    lg, lb = _shifted(logits, labels, shift)
    rows = lb.numel()
    acc = _acc_dtype(logits)
    new = lambda flag, dt=acc: torch.empty(rows if outputs & flag else 0, dtype=dt, device=logits.device)
    logp = torch.empty(rows, dtype=acc, device=logits.device)
    lse = torch.empty(rows, dtype=acc, device=logits.device)
    ent, lss, mean, top1 = new(ENTROPY), new(LOG_SUM_SQ), new(MEAN_LOGIT), new(TOP1, torch.bool)
    opt = lambda t, name: desc(t, name) if t.numel() == rows and t.numel() > 0 else None
    kernels.logprob_forward(
        desc(lg, "logits"), desc(lb, "labels"), desc(logp, "logp"), desc(lse, "lse"),
        opt(ent, "entropy"), opt(lss, "log_sum_sq"), opt(mean, "mean_logit"), opt(top1, "top1"),
        temperature, logit_scale, softcap, ignore_index, stream_of(logits),
        desc(mean_weights, "mean_weights"),
    )
    return logp, lse, ent, lss, mean, top1


@token_logprobs_op.register_fake
def _(logits, labels, ignore_index, temperature, logit_scale, softcap, shift, outputs,
      inplace_backward, mean_weights=None):
    lg, lb = _shifted(logits, labels, shift)
    rows = lb.numel()
    acc = _acc_dtype(logits)
    new = lambda flag, dt=acc: logits.new_empty(rows if outputs & flag else 0, dtype=dt)
    return (logits.new_empty(rows, dtype=acc), logits.new_empty(rows, dtype=acc), new(ENTROPY),
            new(LOG_SUM_SQ), new(MEAN_LOGIT), new(TOP1, torch.bool))


def _backward_into(grad_logits: Tensor, grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor],
                   logits: Tensor, labels: Tensor, lse: Tensor, entropy: Optional[Tensor],
                   ignore_index: int, temperature: float, logit_scale: float, softcap: float,
                   shift: bool, grad_lse: Optional[Tensor] = None, grad_mean: Optional[Tensor] = None,
                   mean_weights: Optional[Tensor] = None) -> None:
    lg, lb = _shifted(logits, labels, shift)
    gl, _ = _shifted(grad_logits, labels, shift)
    kernels.logprob_backward(
        desc(lg, "logits"), desc(lb, "labels"), desc(lse, "lse"), desc(entropy, "entropy"),
        desc(grad_logp, "grad_logp"), desc(grad_entropy, "grad_entropy"), desc(gl, "grad_logits"),
        temperature, logit_scale, softcap, ignore_index, stream_of(logits),
        desc(grad_lse, "grad_lse"), desc(grad_mean, "grad_mean"), desc(mean_weights, "mean_weights"),
    )
    if shift and grad_logits.shape[-2] > 0:
        grad_logits[..., -1, :].zero_()  # the last position predicts nothing


@torch.library.custom_op("pyalign::token_logprobs_backward", mutates_args=())
def token_logprobs_backward_op(
    grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor], logits: Tensor, labels: Tensor,
    lse: Tensor, entropy: Optional[Tensor], ignore_index: int, temperature: float,
    logit_scale: float, softcap: float, shift: bool, grad_lse: Optional[Tensor] = None,
    grad_mean: Optional[Tensor] = None, mean_weights: Optional[Tensor] = None,
) -> Tensor:
    grad = empty_rows_like(logits)
    _backward_into(grad, grad_logp, grad_entropy, logits, labels, lse, entropy, ignore_index,
                   temperature, logit_scale, softcap, shift, grad_lse, grad_mean, mean_weights)
    return grad


@token_logprobs_backward_op.register_fake
def _(grad_logp, grad_entropy, logits, labels, lse, entropy, ignore_index, temperature,
      logit_scale, softcap, shift, grad_lse=None, grad_mean=None, mean_weights=None):
    return empty_rows_like(logits)


@torch.library.custom_op("pyalign::token_logprobs_backward_", mutates_args=("logits",))
def token_logprobs_backward_inplace_op(
    grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor], logits: Tensor, labels: Tensor,
    lse: Tensor, entropy: Optional[Tensor], ignore_index: int, temperature: float,
    logit_scale: float, softcap: float, shift: bool, grad_lse: Optional[Tensor] = None,
    grad_mean: Optional[Tensor] = None, mean_weights: Optional[Tensor] = None,
) -> None:
    _backward_into(logits, grad_logp, grad_entropy, logits, labels, lse, entropy, ignore_index,
                   temperature, logit_scale, softcap, shift, grad_lse, grad_mean, mean_weights)


@token_logprobs_backward_inplace_op.register_fake
def _(grad_logp, grad_entropy, logits, labels, lse, entropy, ignore_index, temperature,
      logit_scale, softcap, shift, grad_lse=None, grad_mean=None, mean_weights=None):
    return None


def _setup_context(ctx, inputs, output):
    (logits, labels, ignore_index, temperature, logit_scale, softcap, shift, outputs,
     inplace_backward, *rest) = inputs
    mean_weights = rest[0] if rest else None
    logp, lse, ent, lss, mean, top1 = output
    ctx.mark_non_differentiable(lss, top1)
    has_ent, has_mean = bool(outputs & ENTROPY), bool(outputs & MEAN_LOGIT)
    ctx.has_mean = has_mean
    ctx.save_for_backward(logits, labels, lse, ent if has_ent else None,
                          mean_weights if has_mean else None)
    ctx.params = (ignore_index, temperature, logit_scale, softcap, shift)
    ctx.inplace = inplace_backward


def dense_grad(g: Optional[Tensor], dtype: torch.dtype, present: bool = True) -> Optional[Tensor]:
    """An upstream gradient as the kernels want it (dense, accumulation dtype), or None."""
    # Upstream gradients may be expanded (stride 0, e.g. from .sum()); the kernel wants them dense.
    return None if (g is None or not present) else g.to(dtype).contiguous()


def _backward(ctx, g_logp, g_lse, g_ent, g_lss, g_mean, g_top1):
    logits, labels, lse, ent, mw = ctx.saved_tensors
    dt = lse.dtype
    args = (dense_grad(g_logp, dt), dense_grad(g_ent, dt, ent is not None), logits, labels, lse, ent,
            *ctx.params, dense_grad(g_lse, dt), dense_grad(g_mean, dt, ctx.has_mean), mw)
    if ctx.inplace:
        token_logprobs_backward_inplace_op(*args)
        grad = logits
    else:
        grad = token_logprobs_backward_op(*args)
    return grad, None, None, None, None, None, None, None, None, None


token_logprobs_op.register_autograd(_backward, setup_context=_setup_context)
