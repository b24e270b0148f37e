"""Input checks of the preference losses and the call into their op."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pyalign import _checks
from pyalign._ext import FLOAT_DTYPES, HAS_CUDA
from pyalign._metrics import Metrics
from pyalign.ops.losses import KERNEL_REDUCTIONS, METRICS, REDUCTIONS, needed_grad_rows, params_list, preference_loss_op

_NUMERIC = FLOAT_DTYPES + (torch.int32, torch.int64, torch.uint8, torch.bool)


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
    """A reduction of the unpaired losses (KTO, BCO): one of the kernel's, no ``"dro"``."""
    return _checks.choice(value, "reduction", KERNEL_REDUCTIONS)


def pair_reduction(value, dro_temperature) -> tuple[str, float]:
    """``(reduction, dro_temperature)`` of a pairwise loss: one of the kernel's reductions or
    ``"dro"``; a temperature other than the default 1.0 is refused unless the reduction is ``"dro"``."""
    red = _checks.choice(value, "reduction", REDUCTIONS)
    tau = _checks.positive(dro_temperature, "dro_temperature")
    if red != "dro" and tau != 1.0:
        raise ValueError(f"dro_temperature: only used with reduction='dro'; got {dro_temperature!r} with "
                         f"reduction={red!r}")
    return red, tau


def number(x, name: str) -> float:
    return _checks.finite(x, name)


def run(family: str, a, b=None, c=None, d=None, la=None, lb=None, w=None, label=None, kla=None,
        klb=None, state=None, *, types=(0,), type_weights=(1.0,), fdiv="reverse_kl", reduction="mean",
        beta=0.1, label_smoothing=0.0, f_alpha=0.5, tau=0.05, gamma=0.5, alpha=0.0, cpo_alpha=0.0,
        desirable_weight=1.0, undesirable_weight=1.0, center=0.0, dro_temperature=1.0):
    """Calls the loss op; returns ``(loss, Metrics, state_out)``. For ``reduction="dro"`` the op
    reduces the per-pair losses (already multiplied by ``w``) itself; the metrics are the kernel's."""
    params = params_list(beta=beta, label_smoothing=label_smoothing, f_alpha=f_alpha, tau=tau, gamma=gamma,
                         alpha=alpha, cpo_alpha=cpo_alpha, desirable_weight=desirable_weight,
                         undesirable_weight=undesirable_weight, center=center)
    loss, _, metrics, state_out = preference_loss_op(a, b, c, d, la, lb, w, label, kla, klb, state, family,
                                                     list(types), [float(t) for t in type_weights], params, fdiv,
                                                     reduction, float(dro_temperature),
                                                     needed_grad_rows(a, b, c, d, w))
    return loss, Metrics(metrics, METRICS[family]), state_out
