"""The local learning rules as functions: each updates a weight in place (see :mod:`pyalign.plasticity`)."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from pyalign import _checks
from pyalign._tensors import acc_dtype
from pyalign.plasticity._update import (Common, activity, activity_pair, apply_update, check_weight,
                                       gemm_into_trace, nonneg, outer, outer_update,
                                       workspace_buffer)

__all__ = ["hebb", "anti_hebb", "oja", "sanger", "bcm", "soft_hebb", "stdp", "three_factor"]


def hebb(weight: Tensor, x: Tensor, y: Tensor, *, lr: float, weight_decay: float = 0.0,
         w_min: Optional[float] = None, w_max: Optional[float] = None, norm: Optional[float] = None,
         norm_mode: str = "max", validate: Optional[bool] = None, workspace: Optional[Tensor] = None) -> Tensor:
    """Plain Hebbian update ``Δw = lr <y x^T>`` (in place). See the module docstring for the options."""
    check_weight(weight)
    cm = Common(lr, weight_decay, w_min, w_max, norm, norm_mode)
    x2, y2 = activity_pair(weight, x, y, validate)
    return outer_update(weight, cm, y2, x2, workspace, a=1.0 / x2.shape[0])


def anti_hebb(weight: Tensor, x: Tensor, y: Tensor, *, lr: float, weight_decay: float = 0.0,
              w_min: Optional[float] = None, w_max: Optional[float] = None, norm: Optional[float] = None,
              norm_mode: str = "max", validate: Optional[bool] = None, workspace: Optional[Tensor] = None) -> Tensor:
    """Anti-Hebbian update ``Δw = -lr <y x^T>`` (Földiák 1990): lateral weights that decorrelate units."""
    check_weight(weight)
    cm = Common(lr, weight_decay, w_min, w_max, norm, norm_mode)
    x2, y2 = activity_pair(weight, x, y, validate)
    return outer_update(weight, cm, y2, x2, workspace, a=-1.0 / x2.shape[0])


def _default_y(weight: Tensor, x, y):
    if y is not None:
        return y
    _checks.float_tensor(x, "x")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x: expected shape [..., {weight.shape[1]}] (last dim = weight's in_features), "
                         f"got {tuple(x.shape)}")
    with torch.no_grad():
        return torch.matmul(x.to(weight.dtype), weight.t())


def oja(weight: Tensor, x: Tensor, y: Optional[Tensor] = None, *, lr: float, weight_decay: float = 0.0,
        w_min: Optional[float] = None, w_max: Optional[float] = None, norm: Optional[float] = None,
        norm_mode: str = "max", validate: Optional[bool] = None, workspace: Optional[Tensor] = None) -> Tensor:
    """Oja's rule ``Δw_i = lr <y_i (x - y_i w_i)>`` (Oja 1982), ``y = W x`` when not given.

    Each row converges to a unit-norm first principal component of ``x`` (for a small ``lr``).
    """
    check_weight(weight)
    cm = Common(lr, weight_decay, w_min, w_max, norm, norm_mode)
    x2, y2 = activity_pair(weight, x, _default_y(weight, x, y), validate)
    return outer_update(weight, cm, y2, x2, workspace, a=1.0 / x2.shape[0], row_coef=(y2 * y2).mean(0))


def sanger(weight: Tensor, x: Tensor, y: Optional[Tensor] = None, *, lr: float, weight_decay: float = 0.0,
           w_min: Optional[float] = None, w_max: Optional[float] = None, norm: Optional[float] = None,
           norm_mode: str = "max", validate: Optional[bool] = None, workspace: Optional[Tensor] = None) -> Tensor:
    """Sanger's generalized Hebbian algorithm ``Δw = lr (<y x^T> - tril(<y y^T>) W)``, ``y = W x`` by default.

    Row ``i`` converges to the ``i``-th principal component (Sanger 1989). The correction term is
    folded into the same GEMM (``addmm``); for bf16/fp16 weights this makes one fp32 copy of W.
    """
    check_weight(weight)
    cm = Common(lr, weight_decay, w_min, w_max, norm, norm_mode)
    x2, y2 = activity_pair(weight, x, _default_y(weight, x, y), validate)
    lower = torch.tril(torch.matmul(y2.t(), y2))
    g = outer(y2, x2, workspace_buffer(workspace, weight))
    g.addmm_(lower, weight.detach().to(x2.dtype), alpha=-1.0)
    return apply_update(weight, cm, g, a=1.0 / x2.shape[0])


def bcm(weight: Tensor, x: Tensor, y: Tensor, theta: Tensor, *, lr: float, tau: float = 100.0,
        weight_decay: float = 0.0, w_min: Optional[float] = None, w_max: Optional[float] = None,
        norm: Optional[float] = None, norm_mode: str = "max", validate: Optional[bool] = None, workspace: Optional[Tensor] = None) -> Tensor:
    """BCM rule ``Δw = lr <y (y - θ) x^T>`` with the sliding threshold ``θ <- θ + (<y^2> - θ) / tau``.

    ``theta`` (``[out]``, fp32; fp64 for fp64 weights) is updated in place after the weight.
    Units whose response exceeds θ potentiate and the others depress, which makes them selective
    (Bienenstock, Cooper and Munro 1982; Intrator and Cooper 1992 for the <y^2> threshold).
    """
    check_weight(weight)
    cm = Common(lr, weight_decay, w_min, w_max, norm, norm_mode)
    tau = _checks.positive(tau, "tau")
    if tau < 1:
        raise ValueError(f"tau: expected a number >= 1 (the threshold's time constant in updates), got {tau!r}")
    x2, y2 = activity_pair(weight, x, y, validate)
    _state(theta, "theta", (weight.shape[0],), weight)
    phi = y2 * (y2 - theta)
    outer_update(weight, cm, phi, x2, workspace, a=1.0 / x2.shape[0])
    with torch.no_grad():
        theta.add_(((y2 * y2).mean(0) - theta) / tau)
    return weight


def soft_hebb(weight: Tensor, x: Tensor, u: Optional[Tensor] = None, *, lr: float, temperature: float = 1.0,
              weight_decay: float = 0.0, w_min: Optional[float] = None, w_max: Optional[float] = None,
              norm: Optional[float] = None, norm_mode: str = "max", validate: Optional[bool] = None, workspace: Optional[Tensor] = None) -> Tensor:
    """SoftHebb (Moraitis et al. 2022): ``y = softmax(u / temperature)`` over units, ``u = W x`` by default,
    ``Δw_k = lr <y_k (x - u_k w_k)>``: soft winner-take-all competitive learning."""
    check_weight(weight)
    cm = Common(lr, weight_decay, w_min, w_max, norm, norm_mode)
    temperature = _checks.positive(temperature, "temperature")
    x2, u2 = activity_pair(weight, x, _default_y(weight, x, u), validate)
    y2 = torch.softmax(u2 / temperature, dim=-1)
    return outer_update(weight, cm, y2, x2, workspace, a=1.0 / x2.shape[0], row_coef=(y2 * u2).mean(0))


def _state(t, name: str, shape, weight: Tensor) -> Tensor:
    _checks.tensor(t, name)
    if t.dtype != acc_dtype(weight):
        raise TypeError(f"{name}: expected dtype {acc_dtype(weight)} (state is kept in fp32, fp64 for fp64 weights), "
                        f"got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    _checks.same_device(("weight", weight), (name, t))
    return _checks.writable(t, name)


def stdp(weight: Tensor, pre: Tensor, post: Tensor, pre_trace: Optional[Tensor] = None,
         post_trace: Optional[Tensor] = None, *, lr: float, a_plus: float = 1.0, a_minus: float = 1.0,
         tau_plus: float = 20.0, tau_minus: float = 20.0, dt: float = 1.0, a3_plus: float = 0.0,
         a3_minus: float = 0.0, tau_x: float = 101.0, tau_y: float = 125.0, weight_decay: float = 0.0,
         w_min: Optional[float] = None, w_max: Optional[float] = None, norm: Optional[float] = None,
         norm_mode: str = "max", validate: Optional[bool] = None,
         workspace: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Pair-based STDP with exponential traces (Song, Miller and Abbott 2000; Morrison et al. 2008),
    optionally triplet STDP (Pfister and Gerstner 2006).

    ``pre [T, B, in]`` and ``post [T, B, out]`` are spike trains (or ``[B, n]`` for one step).
    At each step ``t`` the traces are first decayed, ``x̄ <- exp(-dt/tau_plus) x̄`` and
    ``ȳ <- exp(-dt/tau_minus) ȳ``; a post spike potentiates by ``a_plus x̄`` and a pre spike
    depresses by ``a_minus ȳ``; then the step's spikes are added to the traces. So pre-before-post
    potentiates, post-before-pre depresses, and coincident spikes do neither. The weight changes by
    ``lr`` times the sum over steps of the batch mean, applied once (one GEMM, one fused pass).

    Triplet terms (when ``a3_plus`` or ``a3_minus`` > 0): slow traces ``x̄₂`` (``tau_x``) and ``ȳ₂``
    (``tau_y``) scale the pair terms, ``a_plus -> a_plus + a3_plus ȳ₂`` at a post spike and
    ``a_minus -> a_minus + a3_minus x̄₂`` at a pre spike (both read before the step's spikes are added).

    ``pre_trace`` and ``post_trace`` carry the state between calls (zeros when None) and are updated
    in place: ``[B, n]`` for the pair rule, ``[2, B, n]`` (fast, slow) with triplet terms.
    Returns ``(pre_trace, post_trace)``.
    """
    check_weight(weight)
    cm = Common(lr, weight_decay, w_min, w_max, norm, norm_mode)
    a_plus, a_minus = nonneg(a_plus, "a_plus"), nonneg(a_minus, "a_minus")
    a3_plus, a3_minus = nonneg(a3_plus, "a3_plus"), nonneg(a3_minus, "a3_minus")
    tau_plus, tau_minus = _checks.positive(tau_plus, "tau_plus"), _checks.positive(tau_minus, "tau_minus")
    tau_x, tau_y = _checks.positive(tau_x, "tau_x"), _checks.positive(tau_y, "tau_y")
    dt = _checks.positive(dt, "dt")
    for t, name in ((pre, "pre"), (post, "post")):
        _checks.float_tensor(t, name)
        if t.dim() not in (2, 3):
            raise ValueError(f"{name}: expected spikes [T, B, n] or [B, n], got shape {tuple(t.shape)}")
    if pre.dim() != post.dim() or pre.shape[:-1] != post.shape[:-1]:
        raise ValueError(f"post: expected the leading shape of pre ({tuple(pre.shape[:-1])}), got {tuple(post.shape[:-1])}")
    pre3 = pre if pre.dim() == 3 else pre.unsqueeze(0)
    post3 = post if post.dim() == 3 else post.unsqueeze(0)
    T, B = pre3.shape[:2]
    out_f, in_f = weight.shape
    pre_s = activity(pre3, "pre", in_f, "in_features", weight, validate).view(T, B, in_f)
    post_s = activity(post3, "post", out_f, "out_features", weight, validate).view(T, B, out_f)
    acc = acc_dtype(weight)
    triplet = a3_plus > 0 or a3_minus > 0
    lead = (2, B) if triplet else (B,)
    if pre_trace is None:
        pre_trace = torch.zeros(*lead, in_f, dtype=acc, device=weight.device)
    if post_trace is None:
        post_trace = torch.zeros(*lead, out_f, dtype=acc, device=weight.device)
    _state(pre_trace, "pre_trace", (*lead, in_f), weight)
    _state(post_trace, "post_trace", (*lead, out_f), weight)
    dp, dm = math.exp(-dt / tau_plus), math.exp(-dt / tau_minus)
    if triplet:  # per-slot decay of the (fast, slow) traces
        dp = torch.tensor([dp, math.exp(-dt / tau_x)], dtype=acc, device=weight.device).view(2, 1, 1)
        dm = torch.tensor([dm, math.exp(-dt / tau_y)], dtype=acc, device=weight.device).view(2, 1, 1)
    # Rows of U^T V, all steps at once: potentiation  s_post·(a+ [+ a3+ ȳ₂]) (x) x̄  and
    # depression  ȳ (x) -s_pre·(a- [+ a3- x̄₂]).
    us, vs = [], []
    xb, yb = pre_trace.clone(), post_trace.clone()
    for t in range(T):
        xb.mul_(dp)
        yb.mul_(dm)
        x1, y1 = (xb[0], yb[0]) if triplet else (xb, yb)
        pot = post_s[t] * (a_plus + a3_plus * yb[1]) if triplet else post_s[t] * a_plus
        dep = pre_s[t] * (a_minus + a3_minus * xb[1]) if triplet else pre_s[t] * a_minus
        us += [pot, y1.clone()]
        vs += [x1.clone(), -dep]
        xb.add_(pre_s[t])
        yb.add_(post_s[t])
    u = torch.cat(us, 0)
    v = torch.cat(vs, 0)
    outer_update(weight, cm, u, v, workspace, a=1.0 / B)
    with torch.no_grad():
        pre_trace.copy_(xb)
        post_trace.copy_(yb)
    return pre_trace, post_trace


def three_factor(weight: Tensor, x: Tensor, y: Tensor, trace: Tensor, modulator: Union[float, Tensor], *,
                 lr: float, decay: float = 0.9, weight_decay: float = 0.0, w_min: Optional[float] = None,
                 w_max: Optional[float] = None, norm: Optional[float] = None, norm_mode: str = "max",
                 validate: Optional[bool] = None, workspace: Optional[Tensor] = None) -> Tensor:
    """Neuromodulated (three-factor) Hebbian update with an eligibility trace (Frémaux & Gerstner 2016).

    ``trace [out, in]`` (fp32; fp64 for fp64 weights) is updated in place:
    ``e <- decay e + <y x^T>``, and the weight moves along it gated by the modulator ``m``
    (a reward, an advantage, a preference margin): ``Δw = lr m e``.

    ``modulator`` is a number, a 1-element tensor, or one value per sample (``[N]``, the flattened
    leading shape of ``x``): then the current step's Hebbian term is weighted per sample and the
    carried trace by the mean modulator, ``Δw = lr (decay mean(m) e_old + <m y x^T>)``, which
    equals the scalar rule when all ``m`` are equal. ``m = 0`` leaves the weight unchanged (with
    ``weight_decay = 0``) while the trace still integrates. A tensor modulator is read on the host
    (one synchronization on CUDA).
    """
    check_weight(weight)
    cm = Common(lr, weight_decay, w_min, w_max, norm, norm_mode)
    decay = nonneg(decay, "decay")
    if decay > 1:
        raise ValueError(f"decay: expected a number in [0, 1], got {decay!r}")
    x2, y2 = activity_pair(weight, x, y, validate)
    _state(trace, "trace", tuple(weight.shape), weight)
    inv_n = 1.0 / x2.shape[0]
    if isinstance(modulator, Tensor) and modulator.numel() != 1:
        _checks.float_tensor(modulator, "modulator")
        if modulator.dim() != 1 or modulator.shape[0] != x2.shape[0]:
            raise ValueError(f"modulator: expected a number or a tensor of shape [{x2.shape[0]}] (one value "
                             f"per sample), got shape {tuple(modulator.shape)}")
        m = modulator.detach().to(x2.dtype)
        if not bool(torch.isfinite(m).all()):
            raise ValueError("modulator: contains NaN or infinite values")
        return outer_update(weight, cm, y2, x2, workspace, g2_factors=(y2 * m[:, None], x2), trace=trace, a=0.0,
                            b=decay * float(m.mean()), c=inv_n, lam=decay, s=inv_n)
    if isinstance(modulator, Tensor):
        modulator = float(modulator.detach().reshape(()))
    m = _checks.finite(modulator, "modulator")
    workspace_buffer(workspace, weight)  # checked; the product goes into the trace
    return gemm_into_trace(weight, cm, trace, y2, x2, lam=decay, s=inv_n, a=m)  # e <- decay e + <y x^T>; w += lr m e
