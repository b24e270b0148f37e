"""The local rules as objects holding their options and state, and hooks that feed them a module's activity."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from pyalign import _checks
from pyalign._tensors import acc_dtype
from pyalign.plasticity._update import Common, nonneg
from pyalign.plasticity.rules import anti_hebb, bcm, hebb, oja, sanger, soft_hebb, stdp, three_factor

__all__ = ["Rule", "attach", "Hebb", "AntiHebb", "Oja", "Sanger", "SoftHebb", "BCM", "STDP", "ThreeFactor"]


class Rule:
    """A local learning rule with its options and state; ``step`` updates a weight in place.

    After :func:`attach`, forward passes of the module record its input and output and
    :meth:`apply` runs ``step`` on the module's weight with everything recorded since the last
    call (samples from several forward passes are concatenated).

    ``keep_workspace``: keep the fp32 ``[out, in]`` matmul result buffer between steps (faster;
    costs that much memory per rule, e.g. twice a bf16 weight). False allocates it per step. The
    rules whose product is ``u^T v`` (all but Sanger's) keep none where their update needs none:
    for an fp32/fp64 weight the product goes into the weight (or the trace), and on the CPU a large
    weight of another dtype is updated by row blocks, each block's product in a small reused
    buffer, which is faster than a weight-sized workspace (it stays in cache).
    """

    _product_uv = True  # the rule's product is u^T v (see above: then it needs no workspace there)

    def __init__(self, lr: float, *, weight_decay: float = 0.0, w_min: Optional[float] = None,
                 w_max: Optional[float] = None, norm: Optional[float] = None, norm_mode: str = "max",
                 validate: Optional[bool] = None, keep_workspace: bool = True):
        Common(lr, weight_decay, w_min, w_max, norm, norm_mode)  # validates eagerly
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
        direct = weight.device.type == "cpu" or weight.dtype == acc_dtype(weight)
        if not self.keep_workspace or (self._product_uv and direct):
            return dict(self.options)
        ws = self._ws
        if ws is None or ws.shape != weight.shape or ws.device != weight.device or ws.dtype != acc_dtype(weight):
            ws = self._ws = torch.empty(weight.shape, dtype=acc_dtype(weight), device=weight.device)
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

    _product_uv = False  # its correction term needs the whole product (one addmm)

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
            self.theta = torch.full((weight.shape[0],), self.theta0, dtype=acc_dtype(weight), device=weight.device)
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
        self.decay = nonneg(decay, "decay")
        self.trace: Optional[Tensor] = None

    def reset(self):
        super().reset()
        self.trace = None

    def step(self, weight, x, y=None, modulator=None):
        if y is None or modulator is None:
            raise ValueError("three_factor needs y and a modulator")
        if self.trace is None or tuple(self.trace.shape) != tuple(weight.shape) or self.trace.device != weight.device:
            self.trace = torch.zeros(weight.shape, dtype=acc_dtype(weight), device=weight.device)
        return three_factor(weight, x, y, self.trace, modulator, decay=self.decay, **self._kw(weight))
