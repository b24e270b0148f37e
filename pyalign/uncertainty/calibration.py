"""Calibration of predicted probabilities: expected/maximum calibration error, Brier score, NLL and
the reliability diagram."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from pyalign import _checks
from pyalign._numpy import accepts_numpy

__all__ = ["Calibration", "calibration", "plot_reliability"]


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
