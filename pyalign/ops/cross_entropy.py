"""The cross-entropy of ``torch.nn.functional.cross_entropy`` (class weights, label smoothing,
reductions, ``ignore_index``) plus a z-loss, assembled from per-token results of the log-prob
kernels (``log p(label)``, ``lse``, the class-weighted ``mean_logit``), and its gradient
coefficients per token. Used over materialized logits (``pyalign.logprob.cross_entropy``) and by the
fused linear head (``pyalign.logprob.linear_cross_entropy``)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def assemble_cross_entropy(logp, lse, mean, labels, *, ignore_index, reduction, label_smoothing,
                           z_loss_scale, class_weights, vocab_size, return_z_loss):
    """The loss from per-token ``log p(label)``, ``lse`` and (with label smoothing) the class-weighted
    ``mean_logit`` ``sum_c w_c z_c / V``. For a kept token with label y and class weights w (1 without):

        ce = (1 - eps) * w_y * (lse - z_y) + eps / V * sum_c w_c (lse - z_c)
           = (1 - eps) * w_y * (-logp) + eps / V * (W * lse - V * mean),   W = sum_c w_c

    "mean" divides the summed ``ce`` by ``sum w_y`` over kept tokens (PyTorch's rule; NaN when no
    token is kept, like PyTorch), and adds ``z_loss_scale * mean(lse^2)`` over kept tokens.
    """
    valid = labels != ignore_index
    acc = logp.dtype
    if class_weights is None:
        wy = valid.to(acc)
    else:
        wy = class_weights.gather(0, labels.long().clamp(0, vocab_size - 1).reshape(-1)).view(labels.shape)
        wy = torch.where(valid, wy, torch.zeros_like(wy))
    ce = -logp if label_smoothing == 0 else -(1.0 - label_smoothing) * logp
    if class_weights is not None:
        ce = ce * wy
    if label_smoothing > 0:
        total_w = float(vocab_size) if class_weights is None else class_weights.sum()
        smooth = total_w * lse - vocab_size * mean  # 0 where ignored (lse = mean = 0 there)
        ce = ce + (label_smoothing / vocab_size) * smooth
    z = z_loss_scale * lse * lse if z_loss_scale > 0 else None
    if reduction == "none":
        loss, zl = ce, (torch.zeros_like(ce) if z is None else z)
    elif reduction == "sum":
        loss, zl = ce.sum(), (ce.new_zeros(()) if z is None else z.sum())
    else:
        loss = ce.sum() / wy.sum()
        zl = ce.new_zeros(()) if z is None else z.sum() / valid.sum().to(acc)
    loss = loss + zl if z is not None else loss
    return (loss, zl) if return_z_loss else loss


def ce_coefficients(labels: Tensor, ignore_index: int, label_smoothing: float, z_loss_scale: float,
                    class_weights: Optional[Tensor], vocab: int, reduction_sum: bool, acc: torch.dtype):
    """Upstream-gradient coefficients of the reduced loss of :func:`assemble_cross_entropy` per unit
    ``grad_output``, over all ``n`` rows: ``(grad_logp [n], grad_lse_const (0-dim), lse_coef (0-dim),
    grad_mean [n] or None)`` with ``d loss/d lse_t = grad_lse_const + lse_coef * lse_t`` (``lse_coef``
    = ``2 z / N`` of the z-loss, the ``lse_coef`` of the separate z-loss output too). "mean" divides the
    cross-entropy terms by ``sum w_y`` of the kept tokens and the z-loss by their count."""
    valid = labels != ignore_index
    dev = labels.device
    if class_weights is None:
        wy = valid.to(acc)
        total_w = torch.tensor(float(vocab), dtype=acc, device=dev)
    else:
        wy = class_weights.gather(0, labels.long().clamp(0, vocab - 1))
        wy = torch.where(valid, wy, torch.zeros_like(wy))
        total_w = class_weights.sum()
    if reduction_sum:
        d_ce = torch.ones((), dtype=acc, device=dev)
        d_z = torch.ones((), dtype=acc, device=dev)
    else:
        d_ce, d_z = wy.sum(), valid.sum().to(acc)
    eps = float(label_smoothing)
    grad_logp = wy * (-(1.0 - eps)) / d_ce
    grad_lse_const = (eps / vocab) * total_w / d_ce
    lse_coef = (2.0 * float(z_loss_scale)) / d_z
    grad_mean = None
    if eps > 0:
        grad_mean = torch.where(valid, -eps / d_ce, torch.zeros((), dtype=acc, device=dev))
    return grad_logp, grad_lse_const, lse_coef, grad_mean
