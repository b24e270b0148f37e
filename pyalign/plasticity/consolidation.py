"""Synaptic consolidation for continual training: EWC, Synaptic Intelligence, MAS."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from pyalign import _checks
from pyalign._tensors import acc_dtype
from pyalign.ops import plasticity as _ops
from pyalign.plasticity._update import nonneg

__all__ = ["EWC", "SynapticIntelligence", "MAS"]


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
        self.strength = nonneg(strength, "strength")
        self.anchors: Optional[list[Tensor]] = None
        self.importance: Optional[list[Tensor]] = None
        self.const = 0.0  # penalty offset of merged anchors (EWC with several tasks)

    def _zeros(self, p: Tensor) -> Tensor:
        return torch.zeros(p.shape, dtype=acc_dtype(p), device=p.device)

    @torch.no_grad()
    def penalty(self, add_grad: bool = True) -> Tensor:
        """The penalty (a detached scalar, fp32; fp64 for fp64 parameters); with ``add_grad`` its
        gradient is added to each parameter's ``.grad`` (created when None) in the same pass."""
        acc = acc_dtype(self.params[0])
        if self.anchors is None:
            return torch.zeros((), dtype=acc, device=self.params[0].device)
        total = None
        coef = 0.5 * self.strength
        for p, anc, imp in zip(self.params, self.anchors, self.importance):
            grad = None
            if add_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grad = p.grad
            pf = p.detach().reshape(-1) if p.is_contiguous() else p.detach().contiguous().view(-1)
            direct = grad is not None and grad.is_contiguous()
            gbuf = grad.view(-1) if direct else (torch.zeros_like(pf) if grad is not None else None)
            part = _ops.quad_penalty_(pf, anc.view(-1), imp.view(-1), gbuf, coef).sum(dtype=torch.float64)
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
        self.decay = nonneg(decay, "decay")
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
        self._prev = [p.detach().to(acc_dtype(p)).clone() for p in self.params]
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
