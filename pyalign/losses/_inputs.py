"""Input checks of the preference losses, the call into their op, and the KL-DRO reduction of the
pairwise losses (computed here, in Python, on the kernel's per-pair output)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pyalign import _checks
from pyalign._ext import FLOAT_DTYPES, HAS_CUDA
from pyalign._metrics import Metrics
from pyalign.ops.losses import METRICS, REDUCTIONS, params_list, preference_loss_op

_NUMERIC = FLOAT_DTYPES + (torch.int32, torch.int64, torch.uint8, torch.bool)
# The pairwise losses accept the kernel's reductions and "dro", which is reduced here from "none".
PAIR_REDUCTIONS = REDUCTIONS + ("dro",)


def vec(x, name: str, n: Optional[int], device, *, numeric: bool = False) -> Tensor:
    """A 1-d tensor of n elements on `device`: float (or, with numeric, any int/bool/float)."""
    _checks.tensor(x, name)
    ok = _NUMERIC if numeric else FLOAT_DTYPES
    if x.dtype not in ok:
        raise TypeError(f"{name}: expected a {'real' if numeric else 'floating'} tensor "
                        f"({', '.join(str(d) for d in ok)}), got {x.dtype}")
    if x.device.type == "cuda" and not HAS_CUDA:
        raise RuntimeError(f"{name}: got a CUDA tensor, but this pyalign build has no CUDA kernels "
                           "(built without nvcc or with PYALIGN_CUDA=OFF); reinstall with a CUDA toolkit present")
    if x.dim() != 1:
        raise ValueError(f"{name}: expected a 1-d tensor [batch], got shape {tuple(x.shape)}")
    if n is not None and x.shape[0] != n:
        raise ValueError(f"{name}: expected {n} elements like the policy log-probs, got {x.shape[0]}")
    if device is not None and x.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} like the policy log-probs, got {x.device}")
    return x


def opt(x, name, n, device, **kw) -> Optional[Tensor]:
    return None if x is None else vec(x, name, n, device, **kw)


def policy(x, name: str) -> Tensor:
    vec(x, name, None, None)
    if x.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one element, got an empty tensor")
    return x


def reduction(value) -> str:
    return _checks.choice(value, "reduction", REDUCTIONS)


def pair_reduction(value, dro_temperature) -> tuple[str, float]:
    """``(reduction, dro_temperature)`` of a pairwise loss: one of the kernel's reductions or
    ``"dro"``; a temperature other than the default 1.0 is refused unless the reduction is ``"dro"``."""
    red = _checks.choice(value, "reduction", PAIR_REDUCTIONS)
    tau = _checks.positive(dro_temperature, "dro_temperature")
    if red != "dro" and tau != 1.0:
        raise ValueError(f"dro_temperature: only used with reduction='dro'; got {dro_temperature!r} with "
                         f"reduction={red!r}")
    return red, tau


def _kl_dro_forward(losses: Tensor, temperature: float):
    """``(value, z, s)``: the KL-DRO value, the shifted exponents ``z = (min(l) - l) / tau`` (all
    <= 0) and ``s = mean(expm1(z))`` (in [-1, 0])."""
    m = losses.min()
    z = (m - losses).div_(temperature)
    s = torch.expm1(z).mean()
    return torch.add(m, torch.log1p(s), alpha=-temperature), z, s


class _KLDRO(torch.autograd.Function):
    """The KL-DRO reduction as one autograd node: the forward of :func:`kl_dro`, and the backward
    ``g * softmax(-l / tau) = g * exp(z) / (N (1 + s))`` from the saved exponents (one pass over
    the pairs instead of the backward of each elementwise step). Not twice differentiable, like
    the loss kernels' op whose output it reduces."""

    @staticmethod
    def forward(ctx, losses: Tensor, temperature: float) -> Tensor:
        value, z, s = _kl_dro_forward(losses, temperature)
        ctx.save_for_backward(z, torch.reciprocal((s + 1) * z.shape[0]))
        return value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        z, scale = ctx.saved_tensors
        return torch.exp(z).mul_(g * scale), None


def kl_dro(losses: Tensor, temperature: float) -> Tensor:
    """The KL-DRO reduction of Dr. DPO (Wu et al. 2024, arXiv:2407.07880) of per-pair losses
    ``l`` [N]: ``-tau log((1/N) sum_i exp(-l_i / tau))``.

    Evaluated as ``m - tau log1p(mean(expm1(-(l - m) / tau)))`` with ``m = min(l)`` (held constant:
    the value does not depend on the shift, so neither does the gradient): every exponent is <= 0,
    so nothing overflows for small ``tau``, and ``log1p``/``expm1`` keep the digits that ``log(mean(
    exp(.)))`` would lose for large ``tau``, where the result tends to the mean. The gradient w.r.t.
    ``l_i`` is ``softmax(-l / tau)_i``, computed in one step from the saved exponents; no host sync.
    """
    if torch.is_grad_enabled() and losses.requires_grad:
        return _KLDRO.apply(losses, temperature)
    return _kl_dro_forward(losses, temperature)[0]


def number(x, name: str) -> float:
    return _checks.finite(x, name)


def run(family: str, a, b=None, c=None, d=None, la=None, lb=None, w=None, label=None, kla=None,
        klb=None, state=None, *, types=(0,), type_weights=(1.0,), fdiv="reverse_kl", reduction="mean",
        beta=0.1, label_smoothing=0.0, f_alpha=0.5, tau=0.05, gamma=0.5, alpha=0.0, cpo_alpha=0.0,
        desirable_weight=1.0, undesirable_weight=1.0, center=0.0, dro_temperature=1.0):
    """Calls the loss kernel; returns ``(loss, Metrics, state_out)``. ``reduction="dro"`` runs the
    kernel with ``"none"`` (the per-pair losses, already multiplied by ``w``) and reduces them by
    :func:`kl_dro`; the metrics are the kernel's."""
    params = params_list(beta=beta, label_smoothing=label_smoothing, f_alpha=f_alpha, tau=tau, gamma=gamma,
                         alpha=alpha, cpo_alpha=cpo_alpha, desirable_weight=desirable_weight,
                         undesirable_weight=undesirable_weight, center=center)
    loss, _, metrics, state_out = preference_loss_op(a, b, c, d, la, lb, w, label, kla, klb, state, family,
                                                     list(types), [float(t) for t in type_weights], params, fdiv,
                                                     "none" if reduction == "dro" else reduction)
    if reduction == "dro":
        loss = kl_dro(loss, dro_temperature)
    return loss, Metrics(metrics, METRICS[family]), state_out
