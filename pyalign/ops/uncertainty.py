"""Custom ops of the uncertainty family: ``pyalign::token_uncertainty`` (+ backward) and
``pyalign::reward_stats``.

Outputs are flat; absent outputs are empty ``[0]`` tensors so each schema stays fixed.
``token_uncertainty`` is differentiable through the ensemble log-prob and the per-member
log-probs (backward kernel ``pyalign::token_uncertainty_backward``); the entropies and the
mutual information are not. ``reward_stats`` is differentiable w.r.t. the rewards and the
member variances; its backward is a few plain torch ops over ``[M, N]``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pyalign._ext import desc, kernels, stream_of
from pyalign._tensors import acc_dtype, dense_grad, empty_rows_like
from pyalign.ops._op import kernel_op


def _token_rows(logits: Tensor) -> tuple[int, int]:
    m = logits.shape[0]
    rows = 1
    for s in logits.shape[1:-1]:
        rows *= s
    return m, rows


@kernel_op("token_uncertainty")
def token_uncertainty_op(
    logits: Tensor, labels: Optional[Tensor], temperature: float, ignore_index: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    m, rows = _token_rows(logits)
    acc, dev = acc_dtype(logits), logits.device
    new = lambda *shape: torch.empty(shape, dtype=acc, device=dev)
    lab = labels is not None
    total, expected, mi = new(rows), new(rows), new(rows)
    ens, lvar, mlp = (new(rows), new(rows), new(m, rows)) if lab else (new(0), new(0), new(0, rows))
    lse = new(m, rows)
    kernels.token_uncertainty_forward(
        desc(logits, "logits"), desc(labels, "labels"), desc(total, "total"), desc(expected, "expected"),
        desc(mi, "mutual_info"), desc(ens, "ens_logp") if lab else None,
        desc(lvar, "label_var") if lab else None, desc(mlp, "member_logp") if lab else None,
        desc(lse, "lse"), temperature, ignore_index, stream_of(logits))
    return total, expected, mi, ens, lvar, mlp, lse


@token_uncertainty_op.register_fake
def _(logits, labels, temperature, ignore_index):
    m, rows = _token_rows(logits)
    acc = acc_dtype(logits)
    new = lambda *shape: logits.new_empty(shape, dtype=acc)
    lab = labels is not None
    return (new(rows), new(rows), new(rows), new(rows if lab else 0), new(rows if lab else 0),
            new(m if lab else 0, rows), new(m, rows))


@kernel_op("token_uncertainty_backward")
def token_uncertainty_backward_op(
    grad_ens_logp: Optional[Tensor], grad_member_logp: Optional[Tensor], logits: Tensor,
    labels: Tensor, lse: Tensor, ens_logp: Tensor, temperature: float, ignore_index: int,
) -> Tensor:
    grad = empty_rows_like(logits)
    kernels.token_uncertainty_backward(
        desc(logits, "logits"), desc(labels, "labels"), desc(lse, "lse"), desc(ens_logp, "ens_logp"),
        desc(grad_ens_logp, "grad_ens_logp"), desc(grad_member_logp, "grad_member_logp"),
        desc(grad, "grad_logits"), temperature, ignore_index, stream_of(logits))
    return grad


@token_uncertainty_backward_op.register_fake
def _(grad_ens_logp, grad_member_logp, logits, labels, lse, ens_logp, temperature, ignore_index):
    return empty_rows_like(logits)


def _token_setup(ctx, inputs, output):
    logits, labels, temperature, ignore_index = inputs
    total, expected, mi, ens, lvar, mlp, lse = output
    ctx.mark_non_differentiable(total, expected, mi, lvar, lse)
    ctx.save_for_backward(logits, labels, lse, ens)
    ctx.params = (temperature, ignore_index)


def _token_backward(ctx, g_total, g_expected, g_mi, g_ens, g_lvar, g_mlp, g_lse):
    logits, labels, lse, ens = ctx.saved_tensors
    if labels is None or (g_ens is None and g_mlp is None):
        return None, None, None, None
    grad = token_uncertainty_backward_op(dense_grad(g_ens, lse.dtype), dense_grad(g_mlp, lse.dtype), logits, labels,
                                         lse, ens, *ctx.params)
    return grad, None, None, None


token_uncertainty_op.register_autograd(_token_backward, setup_context=_token_setup)


@kernel_op("reward_stats")
def reward_stats_op(
    rewards: Tensor, variances: Optional[Tensor], weights: Optional[Tensor], var_denom: float, q: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    n = rewards.shape[1]
    acc, dev = acc_dtype(rewards), rewards.device
    new = lambda k: torch.empty(k, dtype=acc, device=dev)
    mean, var, mn, mx = new(n), new(n), new(n), new(n)
    quant = new(n if q >= 0 else 0)
    ale = new(n if variances is not None else 0)
    kernels.reward_stats(
        desc(rewards, "rewards"), desc(variances, "variances"), desc(weights, "member_weights"),
        desc(mean, "mean"), desc(var, "var"), desc(mn, "min"), desc(mx, "max"),
        desc(quant, "quantile") if q >= 0 else None, desc(ale, "aleatoric") if variances is not None else None,
        var_denom, max(q, 0.0), stream_of(rewards))
    return mean, var, mn, mx, quant, ale


@reward_stats_op.register_fake
def _(rewards, variances, weights, var_denom, q):
    n = rewards.shape[1]
    acc = acc_dtype(rewards)
    new = lambda k: rewards.new_empty(k, dtype=acc)
    return new(n), new(n), new(n), new(n), new(n if q >= 0 else 0), new(n if variances is not None else 0)


def _reward_setup(ctx, inputs, output):
    rewards, variances, weights, var_denom, q = inputs
    mean, var, mn, mx, quant, ale = output
    ctx.save_for_backward(rewards, weights, mean, mn, mx)
    ctx.params = (var_denom, q)
    ctx.has_var = variances is not None
    ctx.var_dtype = None if variances is None else variances.dtype


def _member_weights(rewards: Tensor, weights: Optional[Tensor], dtype) -> Tensor:
    m = rewards.shape[0]
    if weights is None:
        return torch.full((m, 1), 1.0 / m, dtype=dtype, device=rewards.device)
    return weights.to(dtype).view(m, 1)


def _extreme_grad(r: Tensor, value: Tensor, g: Tensor) -> Tensor:
    # Like torch.amin/amax: the gradient is split evenly among tied extreme members.
    hit = (r == value.unsqueeze(0)).to(r.dtype)
    return hit * (g / hit.sum(0).clamp(min=1)).unsqueeze(0)


def _quantile_grad(r: Tensor, q: float, g: Tensor) -> Tensor:
    m = r.shape[0]
    pos = q * (m - 1)
    lo = min(int(pos), m - 1)
    hi = min(lo + 1, m - 1)
    frac = pos - lo
    # Same tie order as the kernel: by value, then by member index (stable sort).
    order = torch.sort(r, dim=0, stable=True).indices
    out = torch.zeros_like(r)
    out.scatter_add_(0, order[lo:lo + 1], ((1 - frac) * g).unsqueeze(0))
    out.scatter_add_(0, order[hi:hi + 1], (frac * g).unsqueeze(0))
    return out


def _reward_backward(ctx, g_mean, g_var, g_min, g_max, g_quant, g_ale):
    rewards, weights, mean, mn, mx = ctx.saved_tensors
    var_denom, q = ctx.params
    acc = mean.dtype
    r = rewards.to(acc)
    w = _member_weights(rewards, weights, acc)
    grad = torch.zeros_like(r)
    if g_mean is not None:
        grad = grad + w * g_mean.unsqueeze(0)
    if g_var is not None:
        grad = grad + (2.0 / var_denom) * w * (r - mean.unsqueeze(0)) * g_var.unsqueeze(0)
    if g_min is not None:
        grad = grad + _extreme_grad(r, mn, g_min)
    if g_max is not None:
        grad = grad + _extreme_grad(r, mx, g_max)
    if g_quant is not None and q >= 0 and g_quant.numel() > 0:
        grad = grad + _quantile_grad(r, q, g_quant)
    g_variances = None
    if ctx.has_var and g_ale is not None and g_ale.numel() > 0:
        g_variances = (w * g_ale.unsqueeze(0)).to(ctx.var_dtype)
    return grad.to(rewards.dtype), g_variances, None, None, None


reward_stats_op.register_autograd(_reward_backward, setup_context=_reward_setup)
