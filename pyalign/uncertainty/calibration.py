"""Calibration of predicted probabilities: expected/maximum calibration error, Brier score, NLL, the
reliability diagram, and temperature scaling of logits by NLL."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from pyalign import _checks
from pyalign._numpy import accepts_numpy

__all__ = ["Calibration", "calibration", "plot_reliability", "TemperatureFit", "fit_temperature"]


class Calibration(NamedTuple):
    """Calibration metrics and reliability-diagram data (bins with count 0 have NaN confidence/accuracy)."""

    ece: Tensor
    mce: Tensor
    brier: Tensor
    nll: Tensor
    bin_confidence: Tensor
    bin_accuracy: Tensor
    bin_count: Tensor
    bin_edges: Tensor


@accepts_numpy
def calibration(probs: Tensor, targets: Tensor, *, n_bins: int = 15, strategy: str = "uniform") -> Calibration:
    """Expected/maximum calibration error, Brier score and NLL (Guo et al. 2017).

    ``probs``: ``[N]`` probability of the positive class with ``targets`` in {0, 1}, or ``[N, C]``
    class probabilities with integer ``targets`` ``[N]``. The confidence is the probability of the
    predicted class; ``strategy`` "uniform" bins it into equal-width bins on [0, 1], "quantile"
    into bins of (about) equal count. ECE = sum_b n_b / N |acc_b - conf_b|, MCE = max over non-empty
    bins. Brier: mean squared error of the probability vector; NLL: -mean log p(target) (p clamped
    at 1e-12).
    """
    _checks.float_tensor(probs, "probs")
    _checks.tensor(targets, "targets")
    _checks.same_device(("probs", probs), ("targets", targets))
    _checks.choice(strategy, "strategy", ("uniform", "quantile"))
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins: expected an int >= 1, got {n_bins!r}")
    if probs.dim() not in (1, 2) or probs.shape[0] < 1:
        raise ValueError(f"probs: expected shape [N] or [N, C] with N >= 1, got {tuple(probs.shape)}")
    if tuple(targets.shape) != (probs.shape[0],):
        raise ValueError(f"targets: expected shape [{probs.shape[0]}], got {tuple(targets.shape)}")
    _checks.probabilities(probs, "probs")
    acc = torch.float64 if probs.dtype == torch.float64 else torch.float32
    p = probs.detach().to(acc)
    if p.dim() == 1:
        t = targets.to(acc)
        if not bool(((t == 0) | (t == 1)).all()):
            raise ValueError("targets: expected 0/1 labels for [N] probabilities")
        pred = (p >= 0.5).to(acc)
        conf = torch.where(pred == 1, p, 1 - p)
        correct = (pred == t).to(acc)
        brier = ((p - t) ** 2).mean()
        p_true = torch.where(t == 1, p, 1 - p)
    else:
        if targets.dtype not in (torch.int32, torch.int64) or bool(((targets < 0) | (targets >= p.shape[1])).any()):
            raise ValueError(f"targets: expected integer class indices in [0, {p.shape[1]})")
        conf, pred = p.max(dim=1)
        correct = (pred == targets).to(acc)
        onehot = F.one_hot(targets.long(), p.shape[1]).to(acc)
        brier = ((p - onehot) ** 2).sum(1).mean()
        p_true = p.gather(1, targets.long().unsqueeze(1)).squeeze(1)
    nll = -torch.log(p_true.clamp(min=1e-12)).mean()
    if strategy == "uniform":
        edges = torch.linspace(0, 1, n_bins + 1, dtype=acc, device=p.device)
    else:
        edges = torch.quantile(conf, torch.linspace(0, 1, n_bins + 1, dtype=acc, device=p.device))
        edges[0], edges[-1] = 0.0, 1.0
    # Bin b holds edges[b] < conf <= edges[b+1]; confidence 0 falls in the first bin.
    idx = (torch.searchsorted(edges, conf, right=False) - 1).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=acc, device=p.device).index_add_(0, idx, torch.ones_like(conf))
    conf_sum = torch.zeros_like(count).index_add_(0, idx, conf)
    acc_sum = torch.zeros_like(count).index_add_(0, idx, correct)
    nonempty = count > 0
    nan = torch.full_like(count, float("nan"))
    bin_conf = torch.where(nonempty, conf_sum / count.clamp(min=1), nan)
    bin_acc = torch.where(nonempty, acc_sum / count.clamp(min=1), nan)
    gap = torch.where(nonempty, (bin_acc - bin_conf).abs(), torch.zeros_like(count))
    ece = (count / p.shape[0] * gap).sum()
    mce = gap.max()
    return Calibration(ece, mce, brier, nll, bin_conf, bin_acc, count.to(torch.int64), edges)


def plot_reliability(cal: Calibration, ax=None, *, title: Optional[str] = None):
    """Draws a reliability diagram of :func:`calibration`'s result with matplotlib; returns the axes."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plot_reliability needs matplotlib: pip install matplotlib (or pyalign[plot])") from e
    if not isinstance(cal, Calibration):
        raise TypeError(f"cal: expected the Calibration returned by calibration(), got {type(cal).__name__}")
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    edges = cal.bin_edges.cpu().double()
    left, width = edges[:-1], edges[1:] - edges[:-1]
    accs = torch.nan_to_num(cal.bin_accuracy.cpu().double(), nan=0.0)
    ax.bar(left.numpy(), accs.numpy(), width=width.numpy(), align="edge", edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(title or f"ECE = {float(cal.ece):.3f}")
    ax.legend(loc="upper left")
    return ax


class TemperatureFit(NamedTuple):
    """Result of :func:`fit_temperature`: the fitted temperature (a Python float; calibrated logits
    are ``logits / temperature``), the mean NLL at temperature 1 and at the fitted one, and the
    :func:`calibration` reports of the probabilities before and after (None for soft binary
    targets, which :func:`calibration` does not take)."""

    temperature: float
    nll_before: Tensor
    nll_after: Tensor
    before: Optional[Calibration]
    after: Optional[Calibration]


def _nll_and_derivatives(z: Tensor, t: Tensor, beta: float, binary: bool) -> tuple[float, float, float]:
    """Mean NLL of the logits scaled by beta = 1 / temperature and its first two derivatives in beta
    (float64). The NLL is convex in beta: g'' is a mean of variances."""
    x = beta * z
    if binary:
        s = torch.sigmoid(x)
        g = (F.softplus(x) - t * x).mean()            # t softplus(-x) + (1 - t) softplus(x)
        g1 = ((s - t) * z).mean()
        g2 = (s * (1 - s) * z * z).mean()
    else:
        logp = torch.log_softmax(x, dim=1)
        p = logp.exp()
        ez = (p * z).sum(1)
        zy = z.gather(1, t.unsqueeze(1)).squeeze(1)
        g = (-logp.gather(1, t.unsqueeze(1)).squeeze(1)).mean()
        g1 = (ez - zy).mean()
        g2 = ((p * z * z).sum(1) - ez * ez).clamp(min=0).mean()
    return float(g), float(g1), float(g2)


def _fit_beta(z: Tensor, t: Tensor, binary: bool, lo: float, hi: float, tol: float, max_iter: int) -> float:
    """argmin over beta in [lo, hi] of the convex NLL: safeguarded Newton's method on a bracket
    [a, b] with g'(a) < 0 < g'(b); a step that leaves the bracket is replaced by bisection in
    log beta (the bracket spans decades)."""
    _, d_lo, _ = _nll_and_derivatives(z, t, lo, binary)
    if d_lo >= 0:
        return lo
    _, d_hi, _ = _nll_and_derivatives(z, t, hi, binary)
    if d_hi <= 0:
        return hi
    a, b = lo, hi
    beta = min(max(1.0, a), b)
    for _ in range(max_iter):
        _, d1, d2 = _nll_and_derivatives(z, t, beta, binary)
        if d1 == 0:
            return beta
        if d1 < 0:
            a = beta
        else:
            b = beta
        new = beta - d1 / d2 if d2 > 0 else math.nan
        if not (a < new < b):
            new = math.sqrt(a * b)
        if abs(new - beta) <= tol * beta or (b - a) <= tol * a:
            return new
        beta = new
    return beta


@accepts_numpy
def fit_temperature(logits: Tensor, targets: Tensor, *, bounds: tuple = (1e-2, 1e2), tol: float = 1e-10,
                    max_iter: int = 100, n_bins: int = 15, strategy: str = "uniform") -> TemperatureFit:
    """Temperature scaling (Guo et al. 2017, arXiv:1706.04599): the temperature T > 0 that minimizes
    the mean negative log-likelihood of ``logits / T`` on held-out data.

    ``logits``: ``[N]`` Bradley-Terry logits of a reward model (``r_chosen - r_rejected``, or any
    binary logit) with ``targets`` ``[N]`` 0/1 labels or probabilities in [0, 1] (soft labels, e.g.
    the share of annotators preferring the first response): NLL ``mean t softplus(-z/T) + (1 - t)
    softplus(z/T)``; or ``[N, C]`` class logits with integer ``targets`` in ``[0, C)``: NLL ``mean
    logsumexp(z/T) - z_y/T``.

    The NLL is convex in the inverse temperature beta = 1/T (its second derivative is a mean of
    variances of the logits), so the fit is a safeguarded Newton's method on beta, bracketed in
    ``[1/bounds[1], 1/bounds[0]]`` (T within ``bounds``) with bisection in log beta whenever a
    Newton step leaves the bracket, stopped at relative step ``tol``; exact first and second
    derivatives, in float64 (a float64 copy of the logits). Where the optimum lies outside
    ``bounds`` the nearer bound is returned (perfectly separable data pushes T to 0; constant
    logits give T = 1). The ``before``/``after`` reports are :func:`calibration` of the
    probabilities at T = 1 and at the fitted T (``n_bins``, ``strategy`` as there), for
    :func:`plot_reliability`.
    """
    _checks.float_tensor(logits, "logits")
    _checks.tensor(targets, "targets")
    _checks.same_device(("logits", logits), ("targets", targets))
    if logits.dim() not in (1, 2) or logits.shape[0] < 1 or (logits.dim() == 2 and logits.shape[1] < 1):
        raise ValueError(f"logits: expected shape [N] (binary) or [N, C] (classes) with N >= 1, got "
                         f"{tuple(logits.shape)}")
    if tuple(targets.shape) != (logits.shape[0],):
        raise ValueError(f"targets: expected shape [{logits.shape[0]}], got {tuple(targets.shape)}")
    if not (isinstance(bounds, (tuple, list)) and len(bounds) == 2):
        raise ValueError(f"bounds: expected a pair (lowest, highest) of temperatures, got {bounds!r}")
    t_lo, t_hi = (_checks.positive(b, "bounds") for b in bounds)
    if not t_lo < t_hi:
        raise ValueError(f"bounds: expected lowest < highest, got {bounds!r}")
    tol = _checks.positive(tol, "tol")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter: expected an int >= 1, got {max_iter!r}")
    _checks.choice(strategy, "strategy", ("uniform", "quantile"))
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins: expected an int >= 1, got {n_bins!r}")
    z = logits.detach().to(torch.float64)
    if not bool(torch.isfinite(z).all()):
        raise ValueError("logits: expected finite values (got inf or NaN)")
    binary = z.dim() == 1
    hard = True
    if binary:
        if targets.dtype == torch.bool:
            targets = targets.to(torch.int64)
        if targets.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32,
                                 torch.int64, torch.uint8):
            raise TypeError(f"targets: expected 0/1 labels or probabilities (a real tensor), got {targets.dtype}")
        t = targets.detach().to(torch.float64)
        if not bool(((t >= 0) & (t <= 1)).all()):
            raise ValueError("targets: expected 0/1 labels or probabilities in [0, 1] for [N] logits "
                             "(got values outside, or NaN)")
        hard = bool(((t == 0) | (t == 1)).all())
    else:
        if targets.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"targets: expected integer class indices (int32/int64) for [N, C] logits, got "
                            f"{targets.dtype}")
        if bool(((targets < 0) | (targets >= z.shape[1])).any()):
            raise ValueError(f"targets: expected integer class indices in [0, {z.shape[1]})")
        t = targets.detach().to(torch.int64)
    if bool((z == 0).all()):
        beta = 1.0  # the NLL does not depend on T
    else:
        beta = _fit_beta(z, t, binary, 1.0 / t_hi, 1.0 / t_lo, tol, max_iter)
    temperature = min(max(1.0 / beta, t_lo), t_hi)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    nll_before = torch.tensor(_nll_and_derivatives(z, t, 1.0, binary)[0], dtype=acc, device=logits.device)
    nll_after = torch.tensor(_nll_and_derivatives(z, t, 1.0 / temperature, binary)[0], dtype=acc, device=logits.device)
    before = after = None
    if hard:
        prob = torch.sigmoid if binary else (lambda x: torch.softmax(x, dim=1))
        tgt = t.to(torch.int64)
        before = calibration(prob(z).to(acc), tgt, n_bins=n_bins, strategy=strategy)
        after = calibration(prob(z / temperature).to(acc), tgt, n_bins=n_bins, strategy=strategy)
    return TemperatureFit(float(temperature), nll_before, nll_after, before, after)
