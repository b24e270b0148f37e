"""Plain-PyTorch plasticity rules and consolidation penalties: the test oracle and the eager baseline.

Every rule takes the weight and activity as given (no validation), computes in the dtype of its
inputs (pass fp64 for an oracle), and returns new tensors instead of updating in place. The
formulas are written the way they appear in the papers cited in :mod:`pyalign.plasticity`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def constrain(w: Tensor, w_min: Optional[float] = None, w_max: Optional[float] = None,
              norm: Optional[float] = None, norm_mode: str = "max") -> Tensor:
    """Per-row norm constraint, then elementwise bounds."""
    if norm is not None:
        n = w.norm(dim=1, keepdim=True)
        if norm_mode == "max":
            w = w * torch.where(n > norm, norm / n, torch.ones_like(n))
        else:
            w = w * torch.where(n > 0, norm / n, torch.ones_like(n))
    if w_min is not None or w_max is not None:
        w = w.clamp(min=w_min, max=w_max)
    return w


def _finish(w, dw, lr, weight_decay, w_min, w_max, norm, norm_mode):
    return constrain(w + lr * dw - lr * weight_decay * w, w_min, w_max, norm, norm_mode)


def _flat(x: Tensor) -> Tensor:
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # the last dim may be 0


def hebb(w, x, y, *, lr, weight_decay=0.0, w_min=None, w_max=None, norm=None, norm_mode="max"):
    x, y = _flat(x), _flat(y)
    return _finish(w, y.t() @ x / x.shape[0], lr, weight_decay, w_min, w_max, norm, norm_mode)


def anti_hebb(w, x, y, *, lr, weight_decay=0.0, w_min=None, w_max=None, norm=None, norm_mode="max"):
    x, y = _flat(x), _flat(y)
    return _finish(w, -(y.t() @ x) / x.shape[0], lr, weight_decay, w_min, w_max, norm, norm_mode)


def oja(w, x, y=None, *, lr, weight_decay=0.0, w_min=None, w_max=None, norm=None, norm_mode="max"):
    x = _flat(x)
    y = x @ w.t() if y is None else _flat(y)
    n = x.shape[0]
    # Δw_i = <y_i (x - y_i w_i)>
    dw = (y.t() @ x) / n - (y * y).mean(0)[:, None] * w
    return _finish(w, dw, lr, weight_decay, w_min, w_max, norm, norm_mode)


def sanger(w, x, y=None, *, lr, weight_decay=0.0, w_min=None, w_max=None, norm=None, norm_mode="max"):
    x = _flat(x)
    y = x @ w.t() if y is None else _flat(y)
    n = x.shape[0]
    dw = (y.t() @ x) / n - torch.tril(y.t() @ y / n) @ w
    return _finish(w, dw, lr, weight_decay, w_min, w_max, norm, norm_mode)


def bcm(w, x, y, theta, *, lr, tau=100.0, weight_decay=0.0, w_min=None, w_max=None, norm=None, norm_mode="max"):
    x, y = _flat(x), _flat(y)
    dw = (y * (y - theta)).t() @ x / x.shape[0]
    w_new = _finish(w, dw, lr, weight_decay, w_min, w_max, norm, norm_mode)
    return w_new, theta + ((y * y).mean(0) - theta) / tau


def soft_hebb(w, x, u=None, *, lr, temperature=1.0, weight_decay=0.0, w_min=None, w_max=None, norm=None,
              norm_mode="max"):
    x = _flat(x)
    u = x @ w.t() if u is None else _flat(u)
    y = torch.softmax(u / temperature, dim=-1)
    # Δw_k = <y_k (x - u_k w_k)>
    dw = (y.t() @ x) / x.shape[0] - (y * u).mean(0)[:, None] * w
    return _finish(w, dw, lr, weight_decay, w_min, w_max, norm, norm_mode)


def stdp(w, pre, post, pre_trace=None, post_trace=None, *, lr, a_plus=1.0, a_minus=1.0, tau_plus=20.0,
         tau_minus=20.0, dt=1.0, a3_plus=0.0, a3_minus=0.0, tau_x=101.0, tau_y=125.0, weight_decay=0.0,
         w_min=None, w_max=None, norm=None, norm_mode="max"):
    """Step-by-step pair (and triplet) STDP; returns (w, pre_trace, post_trace). Traces are
    [B, n], or [2, B, n] (fast, slow) with triplet terms."""
    if pre.dim() == 2:
        pre, post = pre[None], post[None]
    T, B = pre.shape[:2]
    triplet = a3_plus > 0 or a3_minus > 0
    zeros = lambda n: torch.zeros((2, B, n) if triplet else (B, n), dtype=w.dtype)
    xb = zeros(pre.shape[-1]) if pre_trace is None else pre_trace.clone()
    yb = zeros(post.shape[-1]) if post_trace is None else post_trace.clone()
    x1, y1 = (xb[0], yb[0]) if triplet else (xb, yb)
    x2, y2 = (xb[1], yb[1]) if triplet else (None, None)
    dw = torch.zeros_like(w)
    for t in range(T):
        x1 = x1 * math.exp(-dt / tau_plus)
        y1 = y1 * math.exp(-dt / tau_minus)
        if triplet:
            x2 = x2 * math.exp(-dt / tau_x)
            y2 = y2 * math.exp(-dt / tau_y)
        for b in range(B):
            amp_p = a_plus + (a3_plus * y2[b] if triplet else 0.0)   # per post neuron
            amp_m = a_minus + (a3_minus * x2[b] if triplet else 0.0)  # per pre neuron
            dw += torch.outer(post[t, b] * amp_p, x1[b])   # post spike after pre: potentiate
            dw -= torch.outer(y1[b], pre[t, b] * amp_m)    # pre spike after post: depress
        x1, y1 = x1 + pre[t], y1 + post[t]
        if triplet:
            x2, y2 = x2 + pre[t], y2 + post[t]
    w_new = _finish(w, dw / B, lr, weight_decay, w_min, w_max, norm, norm_mode)
    if triplet:
        return w_new, torch.stack([x1, x2]), torch.stack([y1, y2])
    return w_new, x1, y1


def three_factor(w, x, y, trace, modulator, *, lr, decay=0.9, weight_decay=0.0, w_min=None, w_max=None,
                 norm=None, norm_mode="max"):
    """Returns (w, trace)."""
    x, y = _flat(x), _flat(y)
    n = x.shape[0]
    hebb_term = y.t() @ x / n
    new_trace = decay * trace + hebb_term
    if isinstance(modulator, Tensor) and modulator.numel() > 1:
        m = modulator.to(w.dtype)
        dw = decay * m.mean() * trace + (y * m[:, None]).t() @ x / n
    else:
        dw = float(modulator) * new_trace
    return _finish(w, dw, lr, weight_decay, w_min, w_max, norm, norm_mode), new_trace


def quadratic_penalty(params, anchors, importances, strength: float, const: float = 0.0) -> Tensor:
    """``strength / 2 * sum Ω (θ - θ*)^2 + strength / 2 * const``, differentiable in ``params``."""
    total = 0.0
    for p, a, imp in zip(params, anchors, importances):
        total = total + (imp * (p - a) ** 2).sum()
    return 0.5 * strength * (total + const)


def plastic_linear_step(x, weight, bias, alpha, eta, hebb, *, mode="decay", modulator=None, clip=1.0):
    """One forward of PlasticLinear: returns (y, new_hebb)."""
    w_eff = weight if hebb is None else weight + alpha * hebb
    y = x @ w_eff.t() + (0 if bias is None else bias)
    x2, y2 = _flat(x), _flat(y)
    n = x2.shape[0]
    if mode == "decay":
        term = y2.t() @ x2 / n
        h = eta * term if hebb is None else (1 - eta) * hebb + eta * term
    else:
        m = torch.as_tensor(modulator, dtype=y2.dtype)
        term = (y2 * (m[:, None] if m.dim() == 1 else m)).t() @ x2 / n
        h = torch.clamp(term if hebb is None else hebb + term, -clip, clip)
    return y, h
