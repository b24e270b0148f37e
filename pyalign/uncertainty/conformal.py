"""Split conformal prediction: calibrated quantiles, reward intervals and token sets with marginal
coverage guarantees."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from pyalign import _checks
from pyalign._numpy import accepts_numpy

__all__ = ["conformal_quantile", "ConformalInterval", "conformal_reward_interval", "ConformalSets",
           "conformal_token_sets"]


def _alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise ValueError(f"alpha: expected a number in (0, 1), got {alpha!r}")
    return float(alpha)


@accepts_numpy
def conformal_quantile(scores: Tensor, alpha: float) -> Tensor:
    """Split-conformal threshold: the ceil((n + 1)(1 - alpha))-th smallest of n calibration scores.

    For a test score exchangeable with the calibration scores, P(score <= threshold) >= 1 - alpha
    (Vovk et al. 2005). Returns +inf when ceil((n + 1)(1 - alpha)) > n (too few scores for alpha).
    """
    _checks.float_tensor(scores, "scores")
    alpha = _alpha(alpha)
    if scores.dim() != 1 or scores.numel() < 1:
        raise ValueError(f"scores: expected shape [n] with n >= 1, got {tuple(scores.shape)}")
    if bool(torch.isnan(scores).any()):
        raise ValueError("scores: contains NaN")
    n = scores.numel()
    k = math.ceil((n + 1) * (1 - alpha) - 1e-9)
    s = scores.detach()
    if k > n:
        return torch.tensor(float("inf"), dtype=s.dtype, device=s.device)
    return torch.kthvalue(s, max(k, 1)).values


class ConformalInterval(NamedTuple):
    lower: Tensor
    upper: Tensor
    width: Tensor  # the calibrated half-width per item (threshold x scale)
    threshold: Tensor


@accepts_numpy
def conformal_reward_interval(cal_pred: Tensor, cal_target: Tensor, test_pred: Tensor, *, alpha: float = 0.1,
                              cal_scale: Optional[Tensor] = None, test_scale: Optional[Tensor] = None) -> ConformalInterval:
    """Reward +- calibrated width with marginal coverage >= 1 - alpha (split conformal).

    Scores are ``|target - pred| / scale`` on a held-out calibration set; without scales the width
    is constant; with scales (e.g. the ensemble std, :func:`aggregate_rewards`) it adapts per item
    (normalized conformal). Scales must be positive.
    """
    for n, t in (("cal_pred", cal_pred), ("cal_target", cal_target), ("test_pred", test_pred)):
        _checks.float_tensor(t, n)
    if cal_pred.dim() != 1 or cal_pred.numel() < 1:
        raise ValueError(f"cal_pred: expected shape [n] with n >= 1 calibration items, got {tuple(cal_pred.shape)}")
    if tuple(cal_target.shape) != tuple(cal_pred.shape):
        raise ValueError(f"cal_target: expected the shape of cal_pred [n] {tuple(cal_pred.shape)}, got {tuple(cal_target.shape)}")
    if (cal_scale is None) != (test_scale is None):
        raise ValueError("cal_scale/test_scale: give both or neither")
    _checks.same_device(("cal_pred", cal_pred), ("cal_target", cal_target), ("test_pred", test_pred),
                        ("cal_scale", cal_scale), ("test_scale", test_scale))
    res = (cal_target.detach().float() - cal_pred.detach().float()).abs()
    if cal_scale is not None:
        _checks.float_tensor(cal_scale, "cal_scale")
        _checks.float_tensor(test_scale, "test_scale")
        if tuple(cal_scale.shape) != tuple(cal_pred.shape):
            raise ValueError(f"cal_scale: expected shape {tuple(cal_pred.shape)}, got {tuple(cal_scale.shape)}")
        if tuple(test_scale.shape) != tuple(test_pred.shape):
            raise ValueError(f"test_scale: expected shape {tuple(test_pred.shape)}, got {tuple(test_scale.shape)}")
        if not bool((cal_scale > 0).all()) or not bool((test_scale > 0).all()):
            raise ValueError("cal_scale/test_scale: expected positive scales")
        res = res / cal_scale.detach().float()
    thr = conformal_quantile(res, alpha)
    width = thr * (test_scale.detach().float() if test_scale is not None else torch.ones_like(test_pred, dtype=torch.float32))
    tp = test_pred.detach().float()
    return ConformalInterval(tp - width, tp + width, width, thr)


class ConformalSets(NamedTuple):
    mask: Tensor       # [N, V] bool: token v is in the set of item n
    sizes: Tensor      # [N] int64
    threshold: Tensor  # the probability a token needs to enter a set: 1 - qhat


@accepts_numpy
def conformal_token_sets(cal_probs: Tensor, cal_labels: Tensor, test_probs: Tensor, *, alpha: float = 0.1) -> ConformalSets:
    """Least-ambiguous (LAC) conformal sets over the vocabulary (Sadinle et al. 2019).

    Calibration scores ``1 - p(label)`` from ``cal_probs`` ``[n, V]`` (e.g. the ensemble mean
    distribution); a test token enters the set when ``p >= 1 - qhat``. The set contains the
    true token with probability >= 1 - alpha (marginally, for exchangeable data).
    """
    _checks.float_tensor(cal_probs, "cal_probs")
    _checks.float_tensor(test_probs, "test_probs")
    _checks.index_tensor(cal_labels, "cal_labels")
    _checks.same_device(("cal_probs", cal_probs), ("cal_labels", cal_labels), ("test_probs", test_probs))
    if cal_probs.dim() != 2 or test_probs.dim() != 2 or cal_probs.shape[1] != test_probs.shape[1]:
        raise ValueError(f"cal_probs/test_probs: expected [n, V] and [N, V] with the same V, got "
                         f"{tuple(cal_probs.shape)} and {tuple(test_probs.shape)}")
    if tuple(cal_labels.shape) != (cal_probs.shape[0],):
        raise ValueError(f"cal_labels: expected shape [{cal_probs.shape[0]}], got {tuple(cal_labels.shape)}")
    if bool(((cal_labels < 0) | (cal_labels >= cal_probs.shape[1])).any()):
        raise ValueError(f"cal_labels: expected values in [0, {cal_probs.shape[1]})")
    _checks.probabilities(cal_probs, "cal_probs")
    _checks.probabilities(test_probs, "test_probs")
    p_true = cal_probs.detach().float().gather(1, cal_labels.long().unsqueeze(1)).squeeze(1)
    qhat = conformal_quantile(1 - p_true, alpha)
    thr = 1 - qhat
    mask = test_probs.detach().float() >= thr
    return ConformalSets(mask, mask.sum(1), thr)
