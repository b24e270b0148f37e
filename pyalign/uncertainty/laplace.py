"""A last-layer Laplace approximation of a Bradley-Terry reward head: the posterior of the head's
weights, predictive variances and the prior precision by marginal likelihood."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from pyalign import _checks

__all__ = ["LaplaceRewardHead", "last_layer_laplace"]


class LaplaceRewardHead:
    """Gaussian posterior N(weight, precision^-1) over a linear reward head ``r(x) = weight . phi(x)``.

    Built by :func:`last_layer_laplace`. ``precision`` is ``[D, D]`` ("full") or ``[D]`` ("diag").
    """

    def __init__(self, weight: Tensor, precision: Tensor, hessian: str, prior_precision: float,
                 log_marginal_likelihood: float):
        self.weight = weight
        self.precision = precision
        self.hessian = hessian
        self.prior_precision = prior_precision
        self.log_marginal_likelihood = log_marginal_likelihood
        self._cov = torch.linalg.inv(precision) if hessian == "full" else 1.0 / precision

    def _check(self, features: Tensor, name: str) -> Tensor:
        _checks.float_tensor(features, name)
        if features.shape[-1:] != self.weight.shape:
            raise ValueError(f"{name}: expected shape [..., {self.weight.shape[0]}], got {tuple(features.shape)}")
        return features.to(self.weight.dtype).to(self.weight.device)

    def _var(self, phi: Tensor) -> Tensor:
        if self.hessian == "full":
            return ((phi @ self._cov) * phi).sum(-1)
        return (phi * phi * self._cov).sum(-1)

    def predict(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Predictive mean and variance of the reward ``[...]`` for features ``[..., D]``."""
        phi = self._check(features, "features")
        return phi @ self.weight, self._var(phi)

    def preference_prob(self, chosen: Tensor, rejected: Tensor) -> Tensor:
        """Probit-approximated Bradley-Terry probability sigmoid(mu / sqrt(1 + pi s^2 / 8)) (MacKay 1992)."""
        d = self._check(chosen, "chosen") - self._check(rejected, "rejected")
        mu, s2 = d @ self.weight, self._var(d)
        return torch.sigmoid(mu / torch.sqrt(1 + math.pi * s2 / 8))


def _bt_objective(d: Tensor, w: Tensor, lam: float) -> float:
    return float(-F.logsigmoid(d @ w).sum() + 0.5 * lam * (w * w).sum())


def _bt_fit(d: Tensor, lam: float, w0: Tensor, max_iter: int, tol: float) -> Tensor:
    """MAP of the Bradley-Terry logistic likelihood on differences d with prior N(0, 1/lam):
    Newton's method with step halving (the objective is strictly convex)."""
    w = w0.clone()
    eye = torch.eye(d.shape[1], dtype=d.dtype, device=d.device)
    f = _bt_objective(d, w, lam)
    for _ in range(max_iter):
        p = torch.sigmoid(d @ w)
        grad = d.T @ (1 - p) - lam * w
        h = (d.T * (p * (1 - p))) @ d + lam * eye
        step = torch.linalg.solve(h, grad)
        for _ in range(30):
            f_new = _bt_objective(d, w + step, lam)
            if f_new <= f:
                break
            step = step / 2
        else:
            break
        w, f = w + step, f_new
        if float(step.abs().max()) < tol * (1 + float(w.abs().max())):
            break
    return w


def _bt_evidence(d: Tensor, w: Tensor, lam: float, hessian: str) -> tuple[float, Tensor]:
    """Laplace log marginal likelihood and the posterior precision (full [D, D] or diag [D])."""
    x = d @ w
    p = torch.sigmoid(x)
    loglik = F.logsigmoid(x).sum()
    dim = d.shape[1]
    if hessian == "full":
        prec = (d.T * (p * (1 - p))) @ d + lam * torch.eye(dim, dtype=d.dtype, device=d.device)
        logdet = torch.linalg.slogdet(prec).logabsdet
    else:
        prec = (d * d * (p * (1 - p)).unsqueeze(1)).sum(0) + lam
        logdet = torch.log(prec).sum()
    # log p(D|w) + log N(w; 0, 1/lam) + D/2 log 2pi - 1/2 log det(prec)
    lml = loglik - 0.5 * lam * (w * w).sum() + 0.5 * dim * math.log(lam) - 0.5 * logdet
    return float(lml), prec


def last_layer_laplace(chosen_features: Tensor, rejected_features: Tensor, *, weight: Optional[Tensor] = None,
                       hessian: str = "full", prior_precision: Optional[float] = None,
                       max_iter: int = 50, tol: float = 1e-6) -> LaplaceRewardHead:
    """Laplace approximation of a linear reward head trained with the Bradley-Terry likelihood.

    ``chosen_features``/``rejected_features`` ``[N, D]``: last-layer features of the preferred and
    rejected responses (the head's bias cancels in the difference). The log posterior is
    ``sum_i log sigmoid(w . (phi_c - phi_r)) - prior_precision / 2 |w|^2``; its precision at the
    mode is ``sum_i p_i (1 - p_i) d_i d_i^T + prior_precision I`` (GGN = Hessian here), kept full
    or diagonal.

    ``weight``: the trained head (``[D]``), used as the mode as-is (post-hoc Laplace); when None
    the mode is fitted by Newton's method (fp64). ``prior_precision``: when None, chosen from a
    log-spaced grid 1e-4 .. 1e4 (33 points) by the Laplace log marginal likelihood (refitting the
    mode per value when ``weight`` is None).
    """
    _checks.float_tensor(chosen_features, "chosen_features")
    _checks.float_tensor(rejected_features, "rejected_features")
    _checks.choice(hessian, "hessian", ("full", "diag"))
    _checks.same_device(("chosen_features", chosen_features), ("rejected_features", rejected_features), ("weight", weight))
    if chosen_features.dim() != 2 or chosen_features.shape[0] < 1 or chosen_features.shape[1] < 1:
        raise ValueError(f"chosen_features: expected shape [N, D] with N, D >= 1, got {tuple(chosen_features.shape)}")
    if tuple(rejected_features.shape) != tuple(chosen_features.shape):
        raise ValueError(f"rejected_features: expected shape {tuple(chosen_features.shape)}, got {tuple(rejected_features.shape)}")
    dim = chosen_features.shape[1]
    d = (chosen_features.detach().double() - rejected_features.detach().double())
    if not bool(torch.isfinite(d).all()):
        raise ValueError("chosen_features/rejected_features: expected finite values")
    if weight is not None:
        _checks.float_tensor(weight, "weight")
        if tuple(weight.shape) != (dim,):
            raise ValueError(f"weight: expected shape [{dim}], got {tuple(weight.shape)}")
        w_fixed = weight.detach().double()
    if prior_precision is not None:
        prior_precision = _checks.positive(prior_precision, "prior_precision")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter: expected an int >= 1, got {max_iter!r}")
    grid = [prior_precision] if prior_precision is not None else [10.0 ** (k / 4) for k in range(-16, 17)]
    best = None
    w_prev = torch.zeros(dim, dtype=torch.float64, device=d.device)
    for lam in reversed(grid):  # strong to weak prior: each fit warm-starts the next
        w = w_fixed if weight is not None else _bt_fit(d, lam, w_prev, max_iter, tol)
        w_prev = w
        lml, prec = _bt_evidence(d, w, lam, hessian)
        if best is None or lml > best[0]:
            best = (lml, lam, w, prec)
    lml, lam, w, prec = best
    return LaplaceRewardHead(w, prec, hessian, lam, lml)
