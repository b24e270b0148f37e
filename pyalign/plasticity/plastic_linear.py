"""Differentiable plasticity: a linear layer with a Hebbian fast weight trained by backprop."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyalign import _checks
from pyalign.plasticity._update import nonneg

__all__ = ["PlasticLinear"]


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
        eta_t = torch.tensor(nonneg(eta, "eta"), **fk)
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
