"""Brain-inspired plasticity: local learning rules, differentiable plasticity, consolidation.

Local rules update a weight ``W [out, in]`` in place from presynaptic activity ``x [..., in]`` and
postsynaptic activity ``y [..., out]``; leading dimensions are flattened into ``N`` samples and
the Hebbian terms are sample means. Every rule takes

    lr            learning rate (>= 0)
    weight_decay  Δw -= lr * weight_decay * w
    w_min, w_max  elementwise bounds, applied last (they always hold)
    norm          per-row norm target; ``norm_mode="max"`` rescales rows whose L2 norm exceeds it,
                  ``"exact"`` rescales every non-zero row to it (applied before the bounds)
    workspace     optional fp32 (fp64 for fp64 weights) ``[out, in]`` buffer reused for the matmul
                  result (rule objects keep one); saves a weight-sized allocation per update

The matrix products go through ``torch.matmul`` (fp32 math for fp32/bf16/fp16 weights, fp64 for
fp64); everything elementwise around them (decay, Oja's ``-y^2 w``, traces, bounds, norm) is one
fused kernel that reads and writes the weight once. Activity is validated to be finite (a
non-finite value raises ValueError) when ``validate`` is True; the default is True on CPU and
False on CUDA, where the check would synchronize with the host.

Rules (Δw per update, ``<.>`` the mean over samples):
    hebb        Δw = lr <y x^T>
    oja         Δw = lr (<y x^T> - diag<y^2> W)                         (Oja 1982)
    sanger      Δw = lr (<y x^T> - tril(<y y^T>) W)                     (Sanger 1989, GHA)
    bcm         Δw = lr <y (y - θ) x^T>,  θ <- θ + (<y^2> - θ) / tau    (Bienenstock, Cooper, Munro 1982)
    anti_hebb   Δw = -lr <y x^T>                                        (Földiák 1990, decorrelation)
    soft_hebb   y = softmax(u / T), u = W x:  Δw = lr (<y x^T> - diag<y u> W)   (Moraitis et al. 2022)
    stdp        pair-based STDP with pre/post traces                    (Song, Miller, Abbott 2000)
                and optional triplet terms                              (Pfister & Gerstner 2006)
    three_factor e <- λ e + <y x^T>,  Δw = lr m e                       (Frémaux & Gerstner 2016)

Each rule also exists as an object holding its state (:class:`Oja`, :class:`BCM`, ...), with
``.step(weight, x, y)``; :func:`attach` hooks a rule to an ``nn.Linear`` so that forward passes
record ``x`` and ``y`` and ``rule.apply()`` updates the module's weight.

:class:`PlasticLinear` is a linear layer with a Hebbian fast weight trained by backprop
(differentiable plasticity, Miconi et al. 2018; backpropamine, Miconi et al. 2020).
:class:`EWC`, :class:`SynapticIntelligence` and :class:`MAS` are consolidation penalties for
continual training, each computing the penalty and adding its gradient in one pass per parameter.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyalign import _checks
from pyalign.ops import plasticity as _ops
from pyalign.ops.plasticity import NORM_MODES

__all__ = [
    "hebb", "oja", "sanger", "bcm", "anti_hebb", "soft_hebb", "stdp", "three_factor",
    "Rule", "Hebb", "Oja", "Sanger", "BCM", "AntiHebb", "SoftHebb", "STDP", "ThreeFactor", "attach",
    "PlasticLinear", "EWC", "SynapticIntelligence", "MAS",
]


# ----------------------------------------------------------------------------------------------
# Argument handling


def _acc(weight: Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _check_weight(weight) -> Tensor:
    _checks.float_tensor(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-d tensor [out, in], got shape {tuple(weight.shape)}")
    if weight.dtype == torch.float64 and weight.device.type == "cuda":
        raise TypeError("weight: float64 is supported on CPU only")
    return _checks.writable(weight, "weight")


def _nonneg(v, name: str) -> float:
    v = _checks.finite(v, name)
    if v < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}")
    return v


def _activity(t, name: str, size: int, size_name: str, weight: Tensor, validate: Optional[bool]) -> Tensor:
    _checks.float_tensor(t, name)
    _checks.same_device(("weight", weight), (name, t))
    if t.dim() < 1 or t.shape[-1] != size:
        raise ValueError(f"{name}: expected shape [..., {size}] (last dim = weight's {size_name}), "
                         f"got {tuple(t.shape)}")
    t2 = t.detach().reshape(math.prod(t.shape[:-1]), size).to(_acc(weight))  # size may be 0
    if t2.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one sample, got shape {tuple(t.shape)}")
    if validate is None:
        validate = t.device.type == "cpu"
    if validate and t2.numel():
        lo, hi = torch.aminmax(t2)  # one pass; NaN and +-inf propagate to the extremes
        if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
            raise ValueError(f"{name}: contains NaN or infinite values")
    return t2


def _pair(weight, x, y, validate) -> tuple[Tensor, Tensor]:
    out_f, in_f = weight.shape
    x2 = _activity(x, "x", in_f, "in_features", weight, validate)
    y2 = _activity(y, "y", out_f, "out_features", weight, validate)
    if x2.shape[0] != y2.shape[0]:
        raise ValueError(f"y: expected the leading shape of x ({tuple(x.shape[:-1])}), got {tuple(y.shape[:-1])}")
    return x2, y2


class _Common:
    """Validated learning rate, decay, bounds and norm of one update."""

    def __init__(self, lr, weight_decay, w_min, w_max, norm, norm_mode):
        self.lr = _nonneg(lr, "lr")
        self.weight_decay = _nonneg(weight_decay, "weight_decay")
        self.w_min = -math.inf if w_min is None else _checks.finite(w_min, "w_min")
        self.w_max = math.inf if w_max is None else _checks.finite(w_max, "w_max")
        if self.w_min > self.w_max:
            raise ValueError(f"w_min: expected w_min <= w_max, got {w_min!r} > {w_max!r}")
        _checks.choice(norm_mode, "norm_mode", ("max", "exact"))
        self.norm = 0.0 if norm is None else _checks.positive(norm, "norm")
        self.norm_mode = 0 if norm is None else NORM_MODES[norm_mode]


def _apply(weight: Tensor, cm: _Common, g: Tensor, *, g2=None, trace=None, row_coef=None,
           a=1.0, b=0.0, c=0.0, lam=0.0, s=1.0) -> Tensor:
    """Runs the fused kernel (coefficients as in plasticity.h: PlasticCoeffs); handles weights whose
    rows are not contiguous through a copy."""
    keep = 1.0 - cm.lr * cm.weight_decay
    args = (g, g2, trace, row_coef, float(a), float(b), float(c), float(lam), float(s), cm.lr, keep,
            cm.w_min, cm.w_max, cm.norm, cm.norm_mode)
    update = _ops.plastic_update_ if torch.compiler.is_compiling() else _ops.plastic_update
    with torch.no_grad():
        if weight.stride(1) == 1 or weight.shape[1] <= 1:
            update(weight, *args)
        else:
            w = weight.contiguous()
            update(w, *args)
            weight.copy_(w)
    return weight


def _outer(y: Tensor, x: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """y^T x (one GEMM); the 1/N of the sample mean is a coefficient of the fused kernel."""
    return torch.matmul(y.t(), x, out=out)


def _workspace(ws, weight: Tensor) -> Optional[Tensor]:
    """Checks a caller-provided buffer for the matmul result (reusing one avoids allocating, and
    on CPU page-faulting in, a weight-sized tensor on every update)."""
    if ws is None:
        return None
    _checks.tensor(ws, "workspace")
    if ws.dtype != _acc(weight) or tuple(ws.shape) != tuple(weight.shape) or not ws.is_contiguous():
        raise ValueError(f"workspace: expected a contiguous {_acc(weight)} tensor of shape {tuple(weight.shape)}, "
                         f"got {ws.dtype} {tuple(ws.shape)}")
    _checks.same_device(("weight", weight), ("workspace", ws))
    return ws


# ----------------------------------------------------------------------------------------------
# Functional rules (in place; each returns the weight)


def hebb(weight: Tensor, x: Tensor, y: Tensor, *, lr: float, weight_decay: float = 0.0,
         w_min: Optional[float] = None, w_max: Optional[float] = None, norm: Optional[float] = None,
         norm_mode: str = "max", validate: Optional[bool] = None, workspace: Optional[Tensor] = None) -> Tensor:
    """Plain Hebbian update ``Δw = lr <y x^T>`` (in place). See the module docstring for the options."""
    _check_weight(weight)
    cm = _Common(lr, weight_decay, w_min, w_max, norm, norm_mode)
    x2, y2 = _pair(weight, x, y, validate)
    return _apply(weight, cm, _outer(y2, x2, _workspace(workspace, weight)), a=1.0 / x2.shape[0])


def anti_hebb(weight: Tensor, x: Tensor, y: Tensor, *, lr: float, weight_decay: float = 0.0,
              w_min: Optional[float] = None, w_max: Optional[float] = None, norm: Optional[float] = None,
              norm_mode: str = "max", validate: Optional[bool] = None, workspace: Optional[Tensor] = None) -> Tensor:
    """Anti-Hebbian update ``Δw = -lr <y x^T>`` (Földiák 1990): lateral weights that decorrelate units."""
    _check_weight(weight)
    cm = _Common(lr, weight_decay, w_min, w_max, norm, norm_mode)
    x2, y2 = _pair(weight, x, y, validate)
    return _apply(weight, cm, _outer(y2, x2, _workspace(workspace, weight)), a=-1.0 / x2.shape[0])


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
    _check_weight(weight)
    cm = _Common(lr, weight_decay, w_min, w_max, norm, norm_mode)
    x2, y2 = _pair(weight, x, _default_y(weight, x, y), validate)
    return _apply(weight, cm, _outer(y2, x2, _workspace(workspace, weight)), a=1.0 / x2.shape[0], row_coef=(y2 * y2).mean(0))


def sanger(weight: Tensor, x: Tensor, y: Optional[Tensor] = None, *, lr: float, weight_decay: float = 0.0,
           w_min: Optional[float] = None, w_max: Optional[float] = None, norm: Optional[float] = None,
           norm_mode: str = "max", validate: Optional[bool] = None, workspace: Optional[Tensor] = None) -> Tensor:
    """Sanger's generalized Hebbian algorithm ``Δw = lr (<y x^T> - tril(<y y^T>) W)``, ``y = W x`` by default.

    Row ``i`` converges to the ``i``-th principal component (Sanger 1989). The correction term is
    folded into the same GEMM (``addmm``); for bf16/fp16 weights this makes one fp32 copy of W.
    """
    _check_weight(weight)
    cm = _Common(lr, weight_decay, w_min, w_max, norm, norm_mode)
    x2, y2 = _pair(weight, x, _default_y(weight, x, y), validate)
    lower = torch.tril(torch.matmul(y2.t(), y2))
    g = _outer(y2, x2, _workspace(workspace, weight))
    g.addmm_(lower, weight.detach().to(x2.dtype), alpha=-1.0)
    return _apply(weight, cm, g, a=1.0 / x2.shape[0])


def bcm(weight: Tensor, x: Tensor, y: Tensor, theta: Tensor, *, lr: float, tau: float = 100.0,
        weight_decay: float = 0.0, w_min: Optional[float] = None, w_max: Optional[float] = None,
        norm: Optional[float] = None, norm_mode: str = "max", validate: Optional[bool] = None, workspace: Optional[Tensor] = None) -> Tensor:
    """BCM rule ``Δw = lr <y (y - θ) x^T>`` with the sliding threshold ``θ <- θ + (<y^2> - θ) / tau``.

    ``theta`` (``[out]``, fp32; fp64 for fp64 weights) is updated in place after the weight.
    Units whose response exceeds θ potentiate and the others depress, which makes them selective
    (Bienenstock, Cooper and Munro 1982; Intrator and Cooper 1992 for the <y^2> threshold).
    """
    _check_weight(weight)
    cm = _Common(lr, weight_decay, w_min, w_max, norm, norm_mode)
    tau = _checks.positive(tau, "tau")
    if tau < 1:
        raise ValueError(f"tau: expected a number >= 1 (the threshold's time constant in updates), got {tau!r}")
    x2, y2 = _pair(weight, x, y, validate)
    _state(theta, "theta", (weight.shape[0],), weight)
    phi = y2 * (y2 - theta)
    _apply(weight, cm, _outer(phi, x2, _workspace(workspace, weight)), a=1.0 / x2.shape[0])
    with torch.no_grad():
        theta.add_(((y2 * y2).mean(0) - theta) / tau)
    return weight


def soft_hebb(weight: Tensor, x: Tensor, u: Optional[Tensor] = None, *, lr: float, temperature: float = 1.0,
              weight_decay: float = 0.0, w_min: Optional[float] = None, w_max: Optional[float] = None,
              norm: Optional[float] = None, norm_mode: str = "max", validate: Optional[bool] = None, workspace: Optional[Tensor] = None) -> Tensor:
    """SoftHebb (Moraitis et al. 2022): ``y = softmax(u / temperature)`` over units, ``u = W x`` by default,
    ``Δw_k = lr <y_k (x - u_k w_k)>``: soft winner-take-all competitive learning."""
    _check_weight(weight)
    cm = _Common(lr, weight_decay, w_min, w_max, norm, norm_mode)
    temperature = _checks.positive(temperature, "temperature")
    x2, u2 = _pair(weight, x, _default_y(weight, x, u), validate)
    y2 = torch.softmax(u2 / temperature, dim=-1)
    return _apply(weight, cm, _outer(y2, x2, _workspace(workspace, weight)), a=1.0 / x2.shape[0], row_coef=(y2 * u2).mean(0))


def _state(t, name: str, shape, weight: Tensor) -> Tensor:
    _checks.tensor(t, name)
    if t.dtype != _acc(weight):
        raise TypeError(f"{name}: expected dtype {_acc(weight)} (state is kept in fp32, fp64 for fp64 weights), "
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
    _check_weight(weight)
    cm = _Common(lr, weight_decay, w_min, w_max, norm, norm_mode)
    a_plus, a_minus = _nonneg(a_plus, "a_plus"), _nonneg(a_minus, "a_minus")
    a3_plus, a3_minus = _nonneg(a3_plus, "a3_plus"), _nonneg(a3_minus, "a3_minus")
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
    pre_s = _activity(pre3, "pre", in_f, "in_features", weight, validate).view(T, B, in_f)
    post_s = _activity(post3, "post", out_f, "out_features", weight, validate).view(T, B, out_f)
    acc = _acc(weight)
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
    _apply(weight, cm, _outer(u, v, _workspace(workspace, weight)), a=1.0 / B)
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
    _check_weight(weight)
    cm = _Common(lr, weight_decay, w_min, w_max, norm, norm_mode)
    decay = _nonneg(decay, "decay")
    if decay > 1:
        raise ValueError(f"decay: expected a number in [0, 1], got {decay!r}")
    x2, y2 = _pair(weight, x, y, validate)
    _state(trace, "trace", tuple(weight.shape), weight)
    g = _outer(y2, x2, _workspace(workspace, weight))
    inv_n = 1.0 / x2.shape[0]
    if isinstance(modulator, Tensor) and modulator.numel() != 1:
        _checks.float_tensor(modulator, "modulator")
        if modulator.dim() != 1 or modulator.shape[0] != x2.shape[0]:
            raise ValueError(f"modulator: expected a number or a tensor of shape [{x2.shape[0]}] (one value "
                             f"per sample), got shape {tuple(modulator.shape)}")
        m = modulator.detach().to(x2.dtype)
        if not bool(torch.isfinite(m).all()):
            raise ValueError("modulator: contains NaN or infinite values")
        g2 = _outer(y2 * m[:, None], x2)
        return _apply(weight, cm, g, g2=g2, trace=trace, a=0.0, b=decay * float(m.mean()), c=inv_n, lam=decay,
                      s=inv_n)
    if isinstance(modulator, Tensor):
        modulator = float(modulator.detach().reshape(()))
    m = _checks.finite(modulator, "modulator")
    return _apply(weight, cm, g, trace=trace, a=m * inv_n, b=m * decay, lam=decay, s=inv_n)


# ----------------------------------------------------------------------------------------------
# Rule objects and hooks


class Rule:
    """A local learning rule with its options and state; ``step`` updates a weight in place.

    After :func:`attach`, forward passes of the module record its input and output and
    :meth:`apply` runs ``step`` on the module's weight with everything recorded since the last
    call (samples from several forward passes are concatenated).

    ``keep_workspace``: keep the fp32 ``[out, in]`` matmul result buffer between steps (faster;
    costs that much memory per rule, e.g. twice a bf16 weight). False allocates it per step.
    """

    def __init__(self, lr: float, *, weight_decay: float = 0.0, w_min: Optional[float] = None,
                 w_max: Optional[float] = None, norm: Optional[float] = None, norm_mode: str = "max",
                 validate: Optional[bool] = None, keep_workspace: bool = True):
        _Common(lr, weight_decay, w_min, w_max, norm, norm_mode)  # validates eagerly
        self.options = dict(lr=lr, weight_decay=weight_decay, w_min=w_min, w_max=w_max, norm=norm,
                            norm_mode=norm_mode, validate=validate)
        self._module: Optional[nn.Module] = None
        self._handle = None
        self._xs: list[Tensor] = []
        self._ys: list[Tensor] = []
        self._ws: Optional[Tensor] = None
        self.keep_workspace = bool(keep_workspace)

    def _kw(self, weight: Tensor) -> dict:
        """The options plus a matmul workspace kept between steps (allocated on first use)."""
        if not self.keep_workspace:
            return dict(self.options)
        ws = self._ws
        if ws is None or ws.shape != weight.shape or ws.device != weight.device or ws.dtype != _acc(weight):
            ws = self._ws = torch.empty(weight.shape, dtype=_acc(weight), device=weight.device)
        return dict(self.options, workspace=ws)

    def step(self, weight: Tensor, x: Tensor, y: Optional[Tensor] = None, **kwargs) -> Tensor:
        raise NotImplementedError

    def reset(self) -> None:
        """Clears the rule's state (thresholds, traces) and any recorded activity."""
        self._xs.clear()
        self._ys.clear()

    def _record(self, module, inputs, output) -> None:
        self._xs.append(inputs[0].detach())
        self._ys.append(output.detach())

    def apply(self, **kwargs) -> Tensor:
        """Updates the attached module's weight from the activity recorded since the last call."""
        if self._module is None:
            raise RuntimeError(f"{type(self).__name__}.apply(): the rule is not attached to a module "
                               "(use pyalign.plasticity.attach(module, rule))")
        if not self._xs:
            raise RuntimeError(f"{type(self).__name__}.apply(): no forward pass was recorded since the last update")
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in self._xs])
        y = torch.cat([t.reshape(-1, t.shape[-1]) for t in self._ys])
        self._xs.clear()
        self._ys.clear()
        return self.step(self._module.weight, x, y, **kwargs)


class _Handle:
    def __init__(self, rule: Rule, hook):
        self.rule, self.hook = rule, hook

    def remove(self) -> None:
        self.hook.remove()
        self.rule._module = None
        self.rule._handle = None
        self.rule._xs.clear()
        self.rule._ys.clear()


def attach(module: nn.Module, rule: Rule) -> _Handle:
    """Registers a forward hook on ``module`` (an ``nn.Linear`` or any module with a 2-d ``.weight``
    whose forward maps ``[..., in]`` to ``[..., out]``) that records input and output for ``rule``.

    Returns a handle whose ``remove()`` detaches the rule. A rule is attached to one module at a time.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(rule, Rule):
        raise TypeError(f"rule: expected a pyalign.plasticity.Rule, got {type(rule).__name__}")
    w = getattr(module, "weight", None)
    if not isinstance(w, Tensor) or w.dim() != 2:
        raise ValueError("module: expected a module with a 2-d .weight [out, in] such as nn.Linear")
    if rule._module is not None:
        raise ValueError("rule: already attached to a module; remove() the previous handle or use a new rule")
    rule._module = module
    rule._handle = _Handle(rule, module.register_forward_hook(rule._record))
    return rule._handle


class Hebb(Rule):
    """Object form of :func:`hebb`."""

    def step(self, weight, x, y=None):
        return hebb(weight, x, y, **self._kw(weight))


class AntiHebb(Rule):
    """Object form of :func:`anti_hebb`."""

    def step(self, weight, x, y=None):
        return anti_hebb(weight, x, y, **self._kw(weight))


class Oja(Rule):
    """Object form of :func:`oja`."""

    def step(self, weight, x, y=None):
        return oja(weight, x, y, **self._kw(weight))


class Sanger(Rule):
    """Object form of :func:`sanger`."""

    def step(self, weight, x, y=None):
        return sanger(weight, x, y, **self._kw(weight))


class SoftHebb(Rule):
    """Object form of :func:`soft_hebb` (``y`` passed to ``step`` is the pre-activation ``u``)."""

    def __init__(self, lr, *, temperature: float = 1.0, **kw):
        super().__init__(lr, **kw)
        self.temperature = _checks.positive(temperature, "temperature")

    def step(self, weight, x, y=None):
        return soft_hebb(weight, x, y, temperature=self.temperature, **self._kw(weight))


class BCM(Rule):
    """Object form of :func:`bcm`; holds the threshold ``theta`` (created on the first step, or
    ``theta0`` initial value)."""

    def __init__(self, lr, *, tau: float = 100.0, theta0: float = 0.0, **kw):
        super().__init__(lr, **kw)
        self.tau = _checks.positive(tau, "tau")
        self.theta0 = _checks.finite(theta0, "theta0")
        self.theta: Optional[Tensor] = None

    def reset(self):
        super().reset()
        self.theta = None

    def step(self, weight, x, y=None):
        if y is None:
            raise ValueError("y: BCM needs the postsynaptic activity")
        if self.theta is None or self.theta.shape[0] != weight.shape[0] or self.theta.device != weight.device:
            self.theta = torch.full((weight.shape[0],), self.theta0, dtype=_acc(weight), device=weight.device)
        return bcm(weight, x, y, self.theta, tau=self.tau, **self._kw(weight))


class STDP(Rule):
    """Object form of :func:`stdp`; holds the pre/post traces between steps (``step(weight, pre, post)``)."""

    def __init__(self, lr, *, a_plus=1.0, a_minus=1.0, tau_plus=20.0, tau_minus=20.0, dt=1.0, a3_plus=0.0,
                 a3_minus=0.0, tau_x=101.0, tau_y=125.0, **kw):
        super().__init__(lr, **kw)
        self.params = dict(a_plus=a_plus, a_minus=a_minus, tau_plus=tau_plus, tau_minus=tau_minus, dt=dt,
                           a3_plus=a3_plus, a3_minus=a3_minus, tau_x=tau_x, tau_y=tau_y)
        self.pre_trace: Optional[Tensor] = None
        self.post_trace: Optional[Tensor] = None

    def reset(self):
        super().reset()
        self.pre_trace = self.post_trace = None

    def step(self, weight, pre, post=None):
        if post is None:
            raise ValueError("post: STDP needs the postsynaptic spikes")
        B = pre.shape[-2] if pre.dim() >= 2 else None
        if self.pre_trace is not None and self.pre_trace.shape[-2] != B:
            self.pre_trace = self.post_trace = None  # batch size changed: start fresh traces
        self.pre_trace, self.post_trace = stdp(weight, pre, post, self.pre_trace, self.post_trace,
                                               **self.params, **self._kw(weight))
        return weight


class ThreeFactor(Rule):
    """Object form of :func:`three_factor`; holds the eligibility trace. ``step(weight, x, y, modulator)``
    and, when attached, ``apply(modulator=...)``."""

    def __init__(self, lr, *, decay: float = 0.9, **kw):
        super().__init__(lr, **kw)
        self.decay = _nonneg(decay, "decay")
        self.trace: Optional[Tensor] = None

    def reset(self):
        super().reset()
        self.trace = None

    def step(self, weight, x, y=None, modulator=None):
        if y is None or modulator is None:
            raise ValueError("three_factor needs y and a modulator")
        if self.trace is None or tuple(self.trace.shape) != tuple(weight.shape) or self.trace.device != weight.device:
            self.trace = torch.zeros(weight.shape, dtype=_acc(weight), device=weight.device)
        return three_factor(weight, x, y, self.trace, modulator, decay=self.decay, **self._kw(weight))


# ----------------------------------------------------------------------------------------------
# Differentiable plasticity


class PlasticLinear(nn.Module):
    """Linear layer with a Hebbian fast weight: ``y = x (W + alpha ⊙ H)^T + b``.

    After each forward the trace ``H [out, in]`` (shared by the batch) is updated with the batch
    mean ``<y x^T>``:

    * ``mode="decay"`` (differentiable plasticity, Miconi et al. 2018):
      ``H <- (1 - eta) H + eta <y x^T>``;
    * ``mode="neuromodulated"`` (backpropamine, Miconi et al. 2020):
      ``H <- clip(H + <m y x^T>, -clip, clip)`` with the modulator ``m`` passed to ``forward``
      (a number or a tensor, scalar or one value per sample; it may come from the network itself
      and receive gradients).

    ``W``, ``alpha`` and ``eta`` are parameters trained by backprop through the trace: the trace
    keeps its autograd history across forward calls until :meth:`detach_trace` (truncated
    backprop through time) or :meth:`reset_trace`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, mode: str = "decay",
                 eta: float = 0.01, alpha: float = 0.01, clip: float = 1.0, learn_eta: bool = True,
                 device=None, dtype=None):
        super().__init__()
        for v, name in ((in_features, "in_features"), (out_features, "out_features")):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        self.mode = _checks.choice(mode, "mode", ("decay", "neuromodulated"))
        self.clip = _checks.positive(clip, "clip")
        fk = dict(device=device, dtype=dtype)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **fk))
        self.bias = nn.Parameter(torch.empty(out_features, **fk)) if bias else None
        self.alpha = nn.Parameter(torch.full((out_features, in_features), _checks.finite(alpha, "alpha"), **fk))
        eta_t = torch.tensor(_nonneg(eta, "eta"), **fk)
        self.eta = nn.Parameter(eta_t) if learn_eta else None
        if not learn_eta:
            self.register_buffer("eta_fixed", eta_t)
        self.hebb: Optional[Tensor] = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def reset_trace(self) -> None:
        """Sets the Hebbian trace to zero (start of an episode)."""
        self.hebb = None

    def detach_trace(self) -> None:
        """Keeps the trace's value but cuts its autograd history (truncated backprop)."""
        if self.hebb is not None:
            self.hebb = self.hebb.detach()

    def forward(self, x: Tensor, modulator: Union[float, Tensor, None] = None) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected shape [..., {self.in_features}], got {tuple(x.shape)}")
        h = self.hebb
        w_eff = self.weight if h is None else torch.addcmul(self.weight, self.alpha, h)
        y = F.linear(x, w_eff, self.bias)
        x2, y2 = x.reshape(-1, self.in_features), y.reshape(-1, self.out_features)
        n = x2.shape[0]
        if self.mode == "decay":
            if modulator is not None:
                raise ValueError("modulator: only used with mode='neuromodulated'")
            eta = self.eta if self.eta is not None else self.eta_fixed
            hebb_term = torch.matmul(y2.t(), x2) / n
            self.hebb = eta * hebb_term if h is None else torch.lerp(h, hebb_term, eta)
        else:
            if modulator is None:
                raise ValueError("modulator: required with mode='neuromodulated'")
            m = torch.as_tensor(modulator, dtype=y2.dtype, device=y2.device)
            if m.numel() == 1:
                hebb_term = m.reshape(()) * torch.matmul(y2.t(), x2) / n
            elif m.dim() == 1 and m.shape[0] == n:
                hebb_term = torch.matmul((y2 * m[:, None]).t(), x2) / n
            else:
                raise ValueError(f"modulator: expected a scalar or shape [{n}], got {tuple(m.shape)}")
            h_new = hebb_term if h is None else h + hebb_term
            self.hebb = torch.clamp(h_new, -self.clip, self.clip)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode!r}"


# ----------------------------------------------------------------------------------------------
# Consolidation


def _param_list(params) -> list[Tensor]:
    if isinstance(params, nn.Module):
        params = params.parameters()
    if isinstance(params, Tensor):
        params = [params]
    out = []
    for p in params:
        if isinstance(p, tuple) and len(p) == 2:  # named_parameters()
            p = p[1]
        _checks.float_tensor(p, "params")
        if p.requires_grad:
            out.append(p)
    if not out:
        raise ValueError("params: expected at least one parameter that requires grad")
    return out


class _Quadratic:
    """Shared machinery: per parameter an anchor ``θ*`` (param dtype) and an importance ``Ω`` (fp32),
    and ``penalty = strength / 2 * sum Ω (θ - θ*)^2 + const``."""

    def __init__(self, params, strength: float):
        self.params = _param_list(params)
        self.strength = _nonneg(strength, "strength")
        self.anchors: Optional[list[Tensor]] = None
        self.importance: Optional[list[Tensor]] = None
        self.const = 0.0  # penalty offset of merged anchors (EWC with several tasks)

    def _zeros(self, p: Tensor) -> Tensor:
        return torch.zeros(p.shape, dtype=_acc(p), device=p.device)

    @torch.no_grad()
    def penalty(self, add_grad: bool = True) -> Tensor:
        """The penalty (a detached scalar, fp32; fp64 for fp64 parameters); with ``add_grad`` its
        gradient is added to each parameter's ``.grad`` (created when None) in the same pass."""
        acc = _acc(self.params[0])
        if self.anchors is None:
            return torch.zeros((), dtype=acc, device=self.params[0].device)
        total = None
        coef = 0.5 * self.strength
        penalty = _ops.quad_penalty_ if torch.compiler.is_compiling() else _ops.quad_penalty
        for p, anc, imp in zip(self.params, self.anchors, self.importance):
            grad = None
            if add_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grad = p.grad
            pf = p.detach().reshape(-1) if p.is_contiguous() else p.detach().contiguous().view(-1)
            direct = grad is not None and grad.is_contiguous()
            gbuf = grad.view(-1) if direct else (torch.zeros_like(pf) if grad is not None else None)
            part = penalty(pf, anc.view(-1), imp.view(-1), gbuf, coef).sum(dtype=torch.float64)
            if grad is not None and not direct:
                grad.add_(gbuf.view(p.shape))
            total = part if total is None else total + part
        return (total + coef * self.const).to(acc)

    def _set_anchor(self):
        self.anchors = [p.detach().clone(memory_format=torch.contiguous_format) for p in self.params]


class EWC(_Quadratic):
    """Elastic weight consolidation (Kirkpatrick et al. 2017) with a diagonal empirical Fisher.

    Use: after ``loss.backward()`` on batches of a finished task call :meth:`accumulate` (adds the
    squared gradients), then :meth:`consolidate` (Fisher = mean of those, anchor = current
    parameters). While training later tasks call ``penalty()`` after ``loss.backward()``: it
    returns ``strength / 2 * sum F (θ - θ*)^2`` and adds ``strength F (θ - θ*)`` to the gradients.

    ``online=True`` (Schwarz et al. 2018): ``F <- decay F + F_task`` with the latest anchor.
    Otherwise the per-task quadratics are summed exactly: ``sum_t F_t (θ - θ_t)^2`` is kept as one
    quadratic with ``F = sum F_t``, anchor ``sum F_t θ_t / F`` and a constant, so the penalty stays
    one pass per parameter however many tasks there were.
    """

    def __init__(self, params, strength: float = 1.0, *, online: bool = False, decay: float = 1.0):
        super().__init__(params, strength)
        self.online = bool(online)
        self.decay = _nonneg(decay, "decay")
        if self.decay > 1:  # online EWC fades old tasks' importance; > 1 would amplify it
            raise ValueError(f"decay: expected a number in [0, 1], got {decay!r}")
        self._acc = [self._zeros(p) for p in self.params]
        self._n = 0

    @torch.no_grad()
    def accumulate(self) -> None:
        """Adds the current gradients squared to the running Fisher estimate."""
        for p, a in zip(self.params, self._acc):
            if p.grad is not None:
                a.addcmul_(p.grad, p.grad)
        self._n += 1

    @torch.no_grad()
    def consolidate(self) -> None:
        """Ends a task: folds the accumulated Fisher into the penalty and anchors at the current parameters."""
        if self._n == 0:
            raise RuntimeError("EWC.consolidate(): call accumulate() after backward() on the task's data first")
        fisher = [a / self._n for a in self._acc]
        if self.anchors is None or self.online:
            if self.importance is not None and self.online:
                fisher = [self.decay * old + f for old, f in zip(self.importance, fisher)]
            self.importance = fisher
            self._set_anchor()
        else:
            const = 0.0
            new_anchors = []
            for p, anc, old, f in zip(self.params, self.anchors, self.importance, fisher):
                a_old, t = anc.to(old.dtype), p.detach().to(old.dtype)
                tot = old + f
                merged = torch.where(tot > 0, (old * a_old + f * t) / tot.clamp_min(1e-30), t)
                # sum_t F_t (θ - θ_t)^2 = F (θ - θ*)^2 + [sum_t F_t θ_t^2 - F θ*^2]
                const += float((old * a_old * a_old + f * t * t - tot * merged * merged).sum(dtype=torch.float64))
                new_anchors.append(merged.to(p.dtype).reshape(p.shape).contiguous())
                old.copy_(tot)
            self.anchors = new_anchors
            self.const += max(const, 0.0)
        for a in self._acc:
            a.zero_()
        self._n = 0


class SynapticIntelligence(_Quadratic):
    """Synaptic intelligence (Zenke, Poole and Ganguli 2017): path-integral importance.

    Call :meth:`accumulate` after each ``optimizer.step()`` (while ``.grad`` still holds the
    gradient used by the step): ``ω -= g · Δθ``. At the end of a task :meth:`consolidate` adds
    ``max(ω, 0) / (Δθ_task^2 + xi)`` to the importance, anchors at the current parameters and resets
    ``ω``. ``penalty()`` is ``strength / 2 * sum Ω (θ - θ*)^2`` (the paper's ``c`` is ``strength / 2``).
    ``.grad`` at ``accumulate`` includes the penalty's own gradient when it was added before the step.
    """

    def __init__(self, params, strength: float = 1.0, *, xi: float = 1e-3):
        super().__init__(params, strength)
        self.xi = _checks.positive(xi, "xi")
        self._omega = [self._zeros(p) for p in self.params]
        self._prev = [p.detach().to(_acc(p)).clone() for p in self.params]
        self._start = [t.clone() for t in self._prev]

    @torch.no_grad()
    def accumulate(self) -> None:
        for p, om, prev in zip(self.params, self._omega, self._prev):
            cur = p.detach().to(om.dtype)
            if p.grad is not None:
                om.addcmul_(p.grad.to(om.dtype), cur - prev, value=-1.0)
            prev.copy_(cur)

    @torch.no_grad()
    def consolidate(self) -> None:
        imp = []
        for i, (p, om, start) in enumerate(zip(self.params, self._omega, self._start)):
            cur = p.detach().to(om.dtype)
            add = om.clamp_min(0) / ((cur - start) ** 2 + self.xi)
            imp.append(add if self.importance is None else self.importance[i] + add)
            om.zero_()
            start.copy_(cur)
            self._prev[i].copy_(cur)
        self.importance = imp
        self._set_anchor()


class MAS(_Quadratic):
    """Memory aware synapses (Aljundi et al. 2018): importance from output sensitivity.

    :meth:`accumulate` takes a model output ``[..., d]`` computed on (unlabelled) data of the
    finished task and adds ``|∂ mean_n ||f(x_n)||^2 / ∂θ|`` (batch-level gradient); with no output
    it adds ``|.grad|`` as computed by the caller. :meth:`consolidate` averages, adds to the
    importance and anchors at the current parameters. ``penalty()`` is ``strength / 2 * sum Ω (θ - θ*)^2``.
    """

    def __init__(self, params, strength: float = 1.0):
        super().__init__(params, strength)
        self._acc = [self._zeros(p) for p in self.params]
        self._n = 0

    def accumulate(self, output: Optional[Tensor] = None) -> None:
        if output is not None:
            _checks.tensor(output, "output")
            if not output.requires_grad:
                raise ValueError("output: expected a model output that requires grad (computed from the parameters)")
            target = output.float().pow(2).reshape(-1, output.shape[-1] if output.dim() else 1).sum(-1).mean()
            grads = torch.autograd.grad(target, self.params, allow_unused=True)
        else:
            grads = [p.grad for p in self.params]
        with torch.no_grad():
            for a, g in zip(self._acc, grads):
                if g is not None:
                    a.add_(g.abs().to(a.dtype))
        self._n += 1

    @torch.no_grad()
    def consolidate(self) -> None:
        if self._n == 0:
            raise RuntimeError("MAS.consolidate(): call accumulate() on the task's data first")
        new = [a / self._n for a in self._acc]
        self.importance = new if self.importance is None else [o + n for o, n in zip(self.importance, new)]
        self._set_anchor()
        for a in self._acc:
            a.zero_()
        self._n = 0
