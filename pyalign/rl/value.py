"""PPO's clipped value loss for a critic."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pyalign import _checks
from pyalign.rl.policy import LOSS_AGG_MODES

__all__ = ["value_loss"]


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Optional[Tensor] = None, *,
               cliprange_value: Optional[float] = None, loss_agg_mode: str = "token-mean"):
    """``0.5 * agg(max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2))`` over the kept tokens
    (PPO, Schulman et al. 2017; verl's ``compute_value_loss``); without ``cliprange_value`` the plain
    squared error. ``values``, ``old_values``, ``returns``, ``mask``: ``[B, T]``; ``loss_agg_mode``
    one of ``pyalign.rl.LOSS_AGG_MODES``. Returns ``(loss, clip_fraction)``, differentiable w.r.t.
    ``values``."""
    _checks.float_tensor(values, "values")
    if values.dim() != 2:
        raise ValueError(f"values: expected shape [B, T], got {list(values.shape)}")
    for t, name in ((old_values, "old_values"), (returns, "returns")):
        _checks.float_tensor(t, name)
        if t.shape != values.shape:
            raise ValueError(f"{name}: expected the shape of values {list(values.shape)}, got {list(t.shape)}")
    _checks.choice(loss_agg_mode, "loss_agg_mode", LOSS_AGG_MODES)
    acc = torch.float64 if values.dtype == torch.float64 else torch.float32
    m = torch.ones_like(values, dtype=acc) if mask is None else mask.to(acc)
    if m.shape != values.shape:
        raise ValueError(f"mask: expected the shape of values {list(values.shape)}, got {list(m.shape)}")
    v, vo, ret = values.to(acc), old_values.detach().to(acc), returns.detach().to(acc)
    if cliprange_value is None:
        clipped = v
    else:
        c = _checks.finite(cliprange_value, "cliprange_value")
        clipped = torch.max(torch.min(v, vo + c), vo - c)
    l1, l2 = (v - ret) ** 2, (clipped - ret) ** 2
    lm = torch.max(l1, l2) * m
    seq_tokens = m.sum(-1)
    nonempty = (seq_tokens > 0).to(acc)
    if loss_agg_mode == "token-mean":
        agg = lm.sum() / m.sum()
    elif loss_agg_mode == "token-sum":
        agg = lm.sum()
    elif loss_agg_mode == "seq-mean-token-mean":
        agg = (lm.sum(-1) / (seq_tokens + 1e-8) * nonempty).sum() / nonempty.sum()
    else:
        agg = (lm.sum(-1) * nonempty).sum() / nonempty.sum()
        if loss_agg_mode == "seq-mean-token-sum-norm":
            agg = agg / values.shape[-1]
    clip_fraction = ((l2 > l1).to(acc) * m).sum() / m.sum().clamp(min=1)
    return 0.5 * agg, clip_fraction.detach()
