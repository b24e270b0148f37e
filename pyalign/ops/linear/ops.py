"""The ops of the fused linear head (method: :mod:`pyalign.ops.linear`):

* ``pyalign::linear_token_logprobs`` (+ ``_backward``): per-token statistics, the recompute backward;
* ``pyalign::linear_token_logprobs_basis`` (+ ``_backward``): the same for a frozen head, with the
  hidden gradient's basis formed in the forward (2 GEMMs per chunk);
* ``pyalign::linear_cross_entropy_fwd_grad`` (+ ``_backward``): a reduced cross-entropy that forms
  its gradient in the forward (3 GEMMs per chunk).

Each drops the ignored rows before any GEMM and scatters per-row results back.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pyalign._outputs import ENTROPY, LOG_SUM_SQ, MEAN_LOGIT, TOP1
from pyalign._tensors import acc_dtype, dense_grad
from pyalign.ops._op import kernel_op
from pyalign.ops.cross_entropy import assemble_cross_entropy, ce_coefficients
from pyalign.ops.linear.chunks import NEED_BIAS, NEED_HIDDEN, NEED_WEIGHT, scatter_rows, select_rows, valid_rows
from pyalign.ops.linear.loops import chunked_backward, chunked_forward_grad, chunked_stats
from pyalign.ops.logprob import row_outputs

# The six per-row outputs of chunked_stats and the bit that asks for each (-1: always computed).
_STATS = (("logp", -1), ("lse", -1), ("entropy", ENTROPY), ("log_sum_sq", LOG_SUM_SQ), ("mean_logit", MEAN_LOGIT),
          ("top1", TOP1))


def _gathered_stats(r: dict, idx: Optional[Tensor], n: int, outputs: int) -> tuple:
    """The six per-row outputs of :func:`chunked_stats` over all ``n`` rows (absent ones stay [0])."""
    return tuple(scatter_rows(r[k], idx, n) if (bit < 0 or outputs & bit) else r[k] for k, bit in _STATS)


def _fake_stats(hidden: Tensor, n: int, outputs: int) -> tuple:
    return row_outputs(n, outputs, acc_dtype(hidden), hidden.device, lambda k, dtype, device: hidden.new_empty(k, dtype=dtype))


def _needs(ctx) -> int:
    return ((NEED_HIDDEN if ctx.needs_input_grad[0] else 0) | (NEED_WEIGHT if ctx.needs_input_grad[1] else 0)
            | (NEED_BIAS if ctx.needs_input_grad[2] else 0))


@kernel_op("linear_token_logprobs")
def linear_token_logprobs_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, ignore_index: int,
    temperature: float, logit_scale: float, softcap: float, outputs: int, chunk_size: int,
    mean_weights: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    n = labels.shape[0]
    idx = valid_rows(labels, ignore_index)
    r = chunked_stats(select_rows(hidden, idx), weight, bias, select_rows(labels, idx), temperature, logit_scale,
                      softcap, outputs, chunk_size, ignore_index=ignore_index, mean_weights=mean_weights)
    return _gathered_stats(r, idx, n, outputs)


@linear_token_logprobs_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, temperature, logit_scale, softcap, outputs,
      chunk_size, mean_weights=None):
    return _fake_stats(hidden, labels.shape[0], outputs)


def _fake_grads(hidden, weight, bias, needs):
    return (torch.empty_like(hidden) if needs & NEED_HIDDEN else hidden.new_empty(0),
            torch.empty_like(weight) if needs & NEED_WEIGHT else hidden.new_empty(0),
            torch.empty_like(bias) if (needs & NEED_BIAS and bias is not None) else hidden.new_empty(0))


@kernel_op("linear_token_logprobs_backward")
def linear_token_logprobs_backward_op(
    grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor], hidden: Tensor, weight: Tensor,
    bias: Optional[Tensor], labels: Tensor, lse: Tensor, entropy: Optional[Tensor],
    ignore_index: int, temperature: float, logit_scale: float, softcap: float, chunk_size: int,
    needs: int, grad_lse: Optional[Tensor] = None, grad_mean: Optional[Tensor] = None,
    mean_weights: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    n = labels.shape[0]
    idx = valid_rows(labels, ignore_index)
    sel = lambda t: select_rows(t, idx)
    dh, dw, db = chunked_backward(sel(grad_logp), sel(grad_entropy), sel(hidden), weight, bias,
                                  sel(labels), sel(lse), sel(entropy), temperature, logit_scale,
                                  softcap, chunk_size, needs, ignore_index=ignore_index,
                                  grad_lse=sel(grad_lse), grad_mean=sel(grad_mean),
                                  mean_weights=mean_weights)
    empty = lambda: hidden.new_empty(0)  # distinct tensors: outputs may not alias each other
    return (empty() if dh is None else scatter_rows(dh, idx, n), empty() if dw is None else dw,
            empty() if db is None else db)


@linear_token_logprobs_backward_op.register_fake
def _(grad_logp, grad_entropy, hidden, weight, bias, labels, lse, entropy, ignore_index,
      temperature, logit_scale, softcap, chunk_size, needs, grad_lse=None, grad_mean=None,
      mean_weights=None):
    return _fake_grads(hidden, weight, bias, needs)


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, labels, ignore_index, temperature, logit_scale, softcap, outputs,
     chunk_size, mean_weights) = inputs
    logp, lse, ent, lss, mean, top1 = output
    ctx.mark_non_differentiable(lss, top1)
    ctx.has_ent, ctx.has_mean = bool(outputs & ENTROPY), bool(outputs & MEAN_LOGIT)
    ctx.save_for_backward(hidden, weight, bias, labels, lse, ent if ctx.has_ent else None,
                          mean_weights if ctx.has_mean else None)
    ctx.params = (ignore_index, temperature, logit_scale, softcap, chunk_size)


def _backward(ctx, g_logp, g_lse, g_ent, g_lss, g_mean, g_top1):
    hidden, weight, bias, labels, lse, ent, mw = ctx.saved_tensors
    needs = _needs(ctx)
    dt = lse.dtype
    dh, dw, db = linear_token_logprobs_backward_op(
        dense_grad(g_logp, dt), dense_grad(g_ent, dt, ent is not None), hidden, weight, bias, labels, lse,
        ent, *ctx.params, needs, dense_grad(g_lse, dt), dense_grad(g_mean, dt, ctx.has_mean), mw)
    return (dh if needs & NEED_HIDDEN else None, dw if needs & NEED_WEIGHT else None,
            db if needs & NEED_BIAS else None) + (None,) * 8


linear_token_logprobs_op.register_autograd(_backward, setup_context=_setup_context)


# ---- frozen head: the hidden gradient's basis formed in the forward -------------------------------
#
# With only ``hidden`` requiring grad (a frozen LM head or tied embedding, as in LoRA), the
# log-prob part of the hidden gradient is ``dh_t = g_t * B_t`` with ``B_t = (d logp_t / d z_t) @ W``
# (temperature, logit scale and softcap included), a per-token vector that does not depend on the
# upstream gradient ``g``. The forward has each chunk's logits at hand, so it forms ``B`` there
# (the backward kernel with ``g = 1`` in place, one GEMM): 2 GEMMs per chunk in all, eager's
# count, instead of 3 (forward, recompute, dhidden); the backward only scales ``B``. A gradient
# reaching ``lse``, the entropy or ``mean_logit`` adds its part through the recompute loop, so any
# combination stays exact (the public functions take this path only when no such output is
# requested, apart from ``lse``). ``dW`` needs the recompute whatever the forward keeps
# (``dW = sum_t g_t dz_t (x) h_t`` cannot be rescaled per token after the sum), so a head that
# requires grad takes the ordinary op.



@kernel_op("linear_token_logprobs_basis")
def linear_token_logprobs_basis_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, ignore_index: int,
    temperature: float, logit_scale: float, softcap: float, outputs: int, chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`linear_token_logprobs_op`'s six outputs and the basis ``B [n, H]`` (accumulation
    dtype; zero rows at ignored tokens) of the hidden gradient of the log-probs."""
    n, H = labels.shape[0], hidden.shape[1]
    idx = valid_rows(labels, ignore_index)
    hv = select_rows(hidden, idx)
    basis = torch.empty(hv.shape[0], H, dtype=acc_dtype(hidden), device=hidden.device)
    r = chunked_stats(hv, weight, bias, select_rows(labels, idx), temperature, logit_scale, softcap, outputs,
                      chunk_size, ignore_index=ignore_index, basis=basis)
    return _gathered_stats(r, idx, n, outputs) + (scatter_rows(basis, idx, n),)


@linear_token_logprobs_basis_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, temperature, logit_scale, softcap, outputs, chunk_size):
    n = labels.shape[0]
    return _fake_stats(hidden, n, outputs) + (hidden.new_empty(n, hidden.shape[1], dtype=acc_dtype(hidden)),)


@kernel_op("linear_token_logprobs_basis_backward")
def linear_token_logprobs_basis_backward_op(
    grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor], grad_lse: Optional[Tensor],
    grad_mean: Optional[Tensor], basis: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
    labels: Tensor, lse: Tensor, entropy: Optional[Tensor], ignore_index: int, temperature: float,
    logit_scale: float, softcap: float, chunk_size: int,
) -> Tensor:
    """The hidden gradient: ``basis * grad_logp`` per row, plus (only where they are nonzero: a check
    made here, not in the traced autograd formula) the recomputed parts of the other upstream
    gradients."""
    dh = None
    if grad_logp is not None:
        dh = basis * grad_logp.to(basis.dtype).unsqueeze(1)
    if any(g is not None and bool((g != 0).any()) for g in (grad_entropy, grad_lse, grad_mean)):
        part, _, _ = linear_token_logprobs_backward_op(
            None, grad_entropy, hidden, weight, bias, labels, lse, entropy, ignore_index, temperature, logit_scale,
            softcap, chunk_size, NEED_HIDDEN, grad_lse, grad_mean, None)
        dh = part.to(basis.dtype) if dh is None else dh + part
    if dh is None:
        return torch.zeros_like(hidden)
    return dh.to(hidden.dtype)


@linear_token_logprobs_basis_backward_op.register_fake
def _(grad_logp, grad_entropy, grad_lse, grad_mean, basis, hidden, weight, bias, labels, lse, entropy,
      ignore_index, temperature, logit_scale, softcap, chunk_size):
    return torch.empty_like(hidden)


def _basis_setup_context(ctx, inputs, output):
    (hidden, weight, bias, labels, ignore_index, temperature, logit_scale, softcap, outputs, chunk_size) = inputs
    logp, lse, ent, lss, mean, top1, basis = output
    ctx.mark_non_differentiable(lss, top1, basis)
    ctx.set_materialize_grads(False)
    ctx.has_ent, ctx.has_mean = bool(outputs & ENTROPY), bool(outputs & MEAN_LOGIT)
    ctx.save_for_backward(hidden, weight, bias, labels, lse, ent if ctx.has_ent else None, basis)
    ctx.params = (ignore_index, temperature, logit_scale, softcap, chunk_size)


def _basis_backward(ctx, g_logp, g_lse, g_ent, g_lss, g_mean, g_top1, g_basis):
    for i, name in ((1, "weight"), (2, "bias")):
        if ctx.needs_input_grad[i]:
            raise RuntimeError(f"pyalign::linear_token_logprobs_basis: {name} requires grad; this op "
                               "forms the hidden gradient only (use pyalign::linear_token_logprobs)")
    hidden, weight, bias, labels, lse, ent, basis = ctx.saved_tensors
    dt = lse.dtype
    grads = (dense_grad(g_logp, dt), dense_grad(g_ent, dt, ctx.has_ent), dense_grad(g_lse, dt),
             dense_grad(g_mean, dt, ctx.has_mean))
    if not ctx.needs_input_grad[0] or all(g is None for g in grads):
        return (None,) * 10
    dh = linear_token_logprobs_basis_backward_op(*grads, basis, hidden, weight, bias, labels, lse, ent, *ctx.params)
    return (dh,) + (None,) * 9


linear_token_logprobs_basis_op.register_autograd(_basis_backward, setup_context=_basis_setup_context)


# ---- reduced cross-entropy: the gradient computed in the forward ---------------------------------
#
# For reduction "mean"/"sum" the loss is L = sum_t (a_t logp_t + b_t lse_t + c_t mean_t) with
# coefficients known in the forward up to lse_t itself (the z-loss term), which the chunk's forward
# kernel produces just before the gradient is needed. So each token chunk costs one logits GEMM,
# the forward kernel, the backward kernel in place on the same buffer, and the two product GEMMs:
# 3 GEMMs in all (eager's count). The backward only scales the saved dh/dW/db by grad_output.

@kernel_op("linear_cross_entropy_fwd_grad")
def linear_cross_entropy_fwd_grad_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, ignore_index: int,
    temperature: float, logit_scale: float, softcap: float, chunk_size: int, label_smoothing: float,
    z_loss_scale: float, class_weights: Optional[Tensor], reduction_sum: bool, needs: int,
    z_output: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, z_loss, lse [n], dh, dW, db)`` of the reduced linear cross-entropy (the loss as
    :func:`pyalign.logprob.assemble_cross_entropy` forms it, z-loss included; ``z_loss`` its
    z-loss part) with the gradients of ``loss`` w.r.t. the inputs whose bit is in ``needs`` (empty
    ``[0]`` tensors for the others), computed in the forward. ``z_output``: the z-loss output is
    returned to the caller (its gradient is then honoured in the backward)."""
    n, V = labels.shape[0], weight.shape[0]
    acc = acc_dtype(hidden)
    eps, zs = float(label_smoothing), float(z_loss_scale)
    w = class_weights
    grad_logp, glc, lse_coef, grad_mean = ce_coefficients(labels, ignore_index, eps, zs, w, V,
                                                          reduction_sum, acc)
    idx = valid_rows(labels, ignore_index)
    sel = lambda t: select_rows(t, idx)
    g_logp = sel(grad_logp)

    def row_grads(rows, logp, lse, ent):  # the z-loss coefficient multiplies the chunk's own lse
        g_lse = glc.expand(lse.shape[0]) + lse_coef * lse if zs > 0 else glc.expand(lse.shape[0])
        return g_logp[rows], None, g_lse.contiguous()

    logp, lse, _, mean, dh, dw, db = chunked_forward_grad(
        sel(hidden), weight, bias, sel(labels), temperature, logit_scale, softcap, chunk_size, needs, row_grads,
        grad_mean=sel(grad_mean), mean_weights=w if eps > 0 else None, ignore_index=ignore_index)
    logp, lse = scatter_rows(logp, idx, n), scatter_rows(lse, idx, n)
    mean = scatter_rows(mean, idx, n) if eps > 0 else None
    loss, zl = assemble_cross_entropy(
        logp, lse, mean, labels, ignore_index=ignore_index, reduction="sum" if reduction_sum else "mean",
        label_smoothing=eps, z_loss_scale=zs, class_weights=w, vocab_size=V, return_z_loss=True)
    empty = lambda: hidden.new_empty(0)
    return (loss, zl, lse, empty() if dh is None else scatter_rows(dh, idx, n),
            empty() if dw is None else dw, empty() if db is None else db)


@linear_cross_entropy_fwd_grad_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, temperature, logit_scale, softcap, chunk_size,
      label_smoothing, z_loss_scale, class_weights, reduction_sum, needs, z_output):
    acc = acc_dtype(hidden)
    return (hidden.new_empty((), dtype=acc), hidden.new_empty((), dtype=acc),
            hidden.new_empty(labels.shape[0], dtype=acc), *_fake_grads(hidden, weight, bias, needs))


@kernel_op("linear_cross_entropy_fwd_grad_backward")
def linear_cross_entropy_fwd_grad_backward_op(
    grad_loss: Tensor, grad_z: Tensor, dh: Tensor, dw: Tensor, db: Tensor, hidden: Tensor, weight: Tensor,
    bias: Optional[Tensor], labels: Tensor, lse: Tensor, ignore_index: int, temperature: float,
    logit_scale: float, softcap: float, chunk_size: int, z_loss_scale: float, reduction_sum: bool,
    needs: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """The backward of :func:`linear_cross_entropy_fwd_grad_op` when its z-loss output is returned
    too: ``grad_loss`` times the saved gradients plus, only when ``grad_z`` is nonzero, the z-loss
    output's own gradient (``grad_lse = grad_z * 2 z lse / N``), recomputed chunk by chunk
    (:func:`chunked_backward`, 3 more GEMMs). Exact for any combination of the two."""
    outs = [t * grad_loss for t in (dh, dw, db)]  # [0] stays [0] (absent gradients)
    if z_loss_scale > 0 and bool(grad_z != 0):
        acc = lse.dtype
        valid = labels != ignore_index
        d_z = torch.ones((), dtype=acc, device=lse.device) if reduction_sum else valid.sum().to(acc)
        grad_lse = (lse * ((2.0 * z_loss_scale) / d_z) * grad_z.to(acc)).contiguous()
        parts = linear_token_logprobs_backward_op(None, None, hidden, weight, bias, labels, lse, None,
                                                  ignore_index, temperature, logit_scale, softcap,
                                                  chunk_size, needs, grad_lse)
        outs = [o + p if o.numel() else o for o, p in zip(outs, parts)]
    return tuple(outs)


@linear_cross_entropy_fwd_grad_backward_op.register_fake
def _(grad_loss, grad_z, dh, dw, db, hidden, weight, bias, labels, lse, ignore_index, temperature,
      logit_scale, softcap, chunk_size, z_loss_scale, reduction_sum, needs):
    return _fake_grads(hidden, weight, bias, needs)


_GRAD_NAMES = ((0, NEED_HIDDEN, "hidden"), (1, NEED_WEIGHT, "weight"), (2, NEED_BIAS, "bias"))


def _fwd_grad_setup_context(ctx, inputs, output):
    (hidden, weight, bias, labels, ignore_index, temperature, logit_scale, softcap, chunk_size,
     label_smoothing, z_loss_scale, class_weights, reduction_sum, needs, z_output) = inputs
    loss, zl, lse, dh, dw, db = output
    ctx.mark_non_differentiable(lse, dh, dw, db)
    # No zero-filled upstream gradients for the outputs nobody differentiates: the default would
    # allocate a [V, H] zero tensor for the dW output in every backward.
    ctx.set_materialize_grads(False)
    ctx.needs = needs
    ctx.z_active = bool(z_output) and z_loss_scale > 0
    if ctx.z_active:  # the z-loss output's gradient may need the inputs again
        ctx.save_for_backward(dh, dw, db, hidden, weight, bias, labels, lse)
    else:
        ctx.save_for_backward(dh, dw, db)
    ctx.params = (ignore_index, temperature, logit_scale, softcap, chunk_size, z_loss_scale, reduction_sum)


def _fwd_grad_backward(ctx, g_loss, g_z, g_lse, g_dh, g_dw, g_db):
    for i, bit, name in _GRAD_NAMES:
        if ctx.needs_input_grad[i] and not ctx.needs & bit:
            raise RuntimeError(f"pyalign::linear_cross_entropy_fwd_grad: {name} requires grad but the forward "
                               f"was called with needs={ctx.needs}, which does not include it")
    saved = ctx.saved_tensors
    dh, dw, db = saved[:3]
    if ctx.z_active and g_z is not None:
        hidden, weight, bias, labels, lse = saved[3:]
        if g_loss is None:
            g_loss = torch.zeros_like(g_z)
        ignore_index, temperature, logit_scale, softcap, chunk_size, zs, rsum = ctx.params
        gh, gw, gb = linear_cross_entropy_fwd_grad_backward_op(
            g_loss, g_z, dh, dw, db, hidden, weight, bias, labels, lse, ignore_index, temperature,
            logit_scale, softcap, chunk_size, zs, rsum, ctx.needs)
    elif g_loss is not None:
        gh, gw, gb = dh * g_loss, dw * g_loss, db * g_loss
    else:  # neither output reached the loss being differentiated
        return (None,) * 15
    keep = lambda g, i: g if ctx.needs_input_grad[i] else None
    return (keep(gh, 0), keep(gw, 1), keep(gb, 2)) + (None,) * 12


linear_cross_entropy_fwd_grad_op.register_autograd(_fwd_grad_backward, setup_context=_fwd_grad_setup_context)
