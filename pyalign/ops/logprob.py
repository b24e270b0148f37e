"""Ops of the log-prob family over the kernels of ``csrc/{cpu,cuda}/logprob``:
``pyalign::token_logprobs`` and its backward, and the row kernels the fused linear head and the
vocab-parallel variant build on (:func:`forward_rows`, :func:`backward_rows`).

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

from pyalign._ext import desc, kernels, stream_of
from pyalign._outputs import ENTROPY, LOG_SUM_SQ, MEAN_LOGIT, TOP1
from pyalign._tensors import acc_dtype, dense_grad, empty_rows_like
from pyalign.ops._op import kernel_op


def _present(t: Optional[Tensor], name: str):
    """The descriptor of an optional output, None where it is absent (empty)."""
    return desc(t, name) if (t is not None and t.numel() > 0) else None


def forward_rows(logits: Tensor, labels: Tensor, logp: Tensor, lse: Tensor, entropy: Optional[Tensor],
                 log_sum_sq: Optional[Tensor], mean_logit: Optional[Tensor], top1: Optional[Tensor],
                 temperature: float, logit_scale: float, softcap: float, ignore_index: int,
                 mean_weights: Optional[Tensor] = None, *, vocab_slice: bool = False) -> None:
    """Softmax statistics of each row of ``logits [..., V]`` into the given ``[rows]`` outputs (empty or
    None optional outputs are not computed). ``vocab_slice``: the logits are one slice of a larger
    vocabulary and a label outside ``[0, V)`` names an entry of another slice."""
    kernel = kernels.logprob_forward_slice if vocab_slice else kernels.logprob_forward
    kernel(desc(logits, "logits"), desc(labels, "labels"), desc(logp, "logp"), desc(lse, "lse"),
           _present(entropy, "entropy"), _present(log_sum_sq, "log_sum_sq"), _present(mean_logit, "mean_logit"),
           _present(top1, "top1"), temperature, logit_scale, softcap, ignore_index, stream_of(logits),
           desc(mean_weights, "mean_weights"))


def backward_rows(logits: Tensor, labels: Tensor, lse: Tensor, entropy: Optional[Tensor],
                  grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor], grad_logits: Tensor,
                  temperature: float, logit_scale: float, softcap: float, ignore_index: int,
                  grad_lse: Optional[Tensor] = None, grad_mean: Optional[Tensor] = None,
                  mean_weights: Optional[Tensor] = None, *, vocab_slice: bool = False, mean_vocab: int = 0) -> None:
    """The gradient w.r.t. ``logits`` of ``sum(grad_logp * logp + grad_entropy * entropy + grad_lse *
    lse + grad_mean * mean_logit)`` into ``grad_logits`` (which may alias ``logits``: in place).
    ``mean_vocab``: the V that divides ``mean_logit`` (0: the logits' own; on a slice, the whole
    vocabulary's)."""
    kernel = kernels.logprob_backward_slice if vocab_slice else kernels.logprob_backward
    kernel(desc(logits, "logits"), desc(labels, "labels"), desc(lse, "lse"), desc(entropy, "entropy"),
           desc(grad_logp, "grad_logp"), desc(grad_entropy, "grad_entropy"), desc(grad_logits, "grad_logits"),
           temperature, logit_scale, softcap, ignore_index, stream_of(logits), desc(grad_lse, "grad_lse"),
           desc(grad_mean, "grad_mean"), desc(mean_weights, "mean_weights"), mean_vocab=mean_vocab)


def row_outputs(rows: int, outputs: int, dtype: torch.dtype, device, new=torch.empty):
    """``(logp, lse, entropy, log_sum_sq, mean_logit, top1)`` buffers of ``rows`` (empty where the
    ``outputs`` bit is absent); ``new`` allocates (``torch.empty``, or a fake kernel's)."""
    opt = lambda flag, dt=dtype: new(rows if outputs & flag else 0, dtype=dt, device=device)
    return (new(rows, dtype=dtype, device=device), new(rows, dtype=dtype, device=device), opt(ENTROPY),
            opt(LOG_SUM_SQ), opt(MEAN_LOGIT), opt(TOP1, torch.bool))


def _shifted(logits: Tensor, labels: Tensor, shift: bool) -> tuple[Tensor, Tensor]:
    if shift:
        return logits[..., :-1, :], labels[..., 1:]
    return logits, labels


@kernel_op("token_logprobs")
def token_logprobs_op(
    logits: Tensor, labels: Tensor, ignore_index: int, temperature: float, logit_scale: float,
    softcap: float, shift: bool, outputs: int, inplace_backward: bool,
    mean_weights: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    lg, lb = _shifted(logits, labels, shift)
    res = row_outputs(lb.numel(), outputs, acc_dtype(logits), logits.device)
    forward_rows(lg, lb, *res, temperature, logit_scale, softcap, ignore_index, mean_weights)
    return res


@token_logprobs_op.register_fake
def _(logits, labels, ignore_index, temperature, logit_scale, softcap, shift, outputs,
      inplace_backward, mean_weights=None):
    lg, lb = _shifted(logits, labels, shift)
    fake = lambda n, dtype, device: logits.new_empty(n, dtype=dtype)
    return row_outputs(lb.numel(), outputs, acc_dtype(logits), logits.device, fake)


def _backward_into(grad_logits: Tensor, grad_logp, grad_entropy, logits, labels, lse, entropy, ignore_index,
                   temperature, logit_scale, softcap, shift, grad_lse=None, grad_mean=None, mean_weights=None):
    lg, lb = _shifted(logits, labels, shift)
    gl, _ = _shifted(grad_logits, labels, shift)
    backward_rows(lg, lb, lse, entropy, grad_logp, grad_entropy, gl, temperature, logit_scale, softcap,
                  ignore_index, grad_lse, grad_mean, mean_weights)
    if shift and grad_logits.shape[-2] > 0:
        grad_logits[..., -1, :].zero_()  # the last position predicts nothing


@kernel_op("token_logprobs_backward")
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


@kernel_op("token_logprobs_backward_", mutates_args=("logits",))
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
     inplace_backward, mean_weights) = inputs
    logp, lse, ent, lss, mean, top1 = output
    ctx.mark_non_differentiable(lss, top1)
    has_ent, ctx.has_mean = bool(outputs & ENTROPY), bool(outputs & MEAN_LOGIT)
    ctx.save_for_backward(logits, labels, lse, ent if has_ent else None,
                          mean_weights if ctx.has_mean else None)
    ctx.params = (ignore_index, temperature, logit_scale, softcap, shift)
    ctx.inplace = inplace_backward


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
    return (grad,) + (None,) * 9


token_logprobs_op.register_autograd(_backward, setup_context=_setup_context)
