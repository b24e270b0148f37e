"""Aggregating conflicting objectives: several reward models or annotator groups scored on the same
items, reduced to one reward per item by a social-welfare function (utilitarian sum, egalitarian
minimum, its smooth version, Nash's product)."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from pyalign import _checks
from pyalign._numpy import accepts_numpy
from pyalign._tensors import acc_dtype

__all__ = ["OBJECTIVE_METHODS", "aggregate_objectives"]


OBJECTIVE_METHODS = ("sum", "min", "softmin", "nash")


def _objective_weights(weights, k: int, ref: Tensor) -> tuple[Optional[Tensor], bool]:
    """``(w, all_positive)``: weights [K] in the accumulation dtype (detached, not normalized), or
    None for all ones; ``all_positive`` is True when every weight is known to be > 0 (always with
    None; never when traced, where the weights are taken as given)."""
    if weights is None:
        return None, True
    _checks.float_tensor(weights, "weights")
    _checks.same_device(("rewards", ref), ("weights", weights))
    if tuple(weights.shape) != (k,):
        raise ValueError(f"weights: expected shape [{k}] (one weight per objective), got {tuple(weights.shape)}")
    w = weights.detach().to(acc_dtype(ref))
    if torch.compiler.is_compiling():
        return w, False
    # one host copy of the K weights; for finite non-negative weights a positive sum is one positive weight
    values = w.tolist()
    if not all(math.isfinite(v) and v >= 0 for v in values) or not any(v > 0 for v in values):
        raise ValueError("weights: expected finite, non-negative weights with a positive sum")
    return w, all(v > 0 for v in values)


def _gap(r: Tensor, d) -> Tensor:
    """``r - d`` with the disagreement point d: a number (no subtraction for 0), a 0-d tensor, a
    tensor [K] (one per objective) or of r's shape [K, ...]; in r's dtype."""
    if isinstance(d, Tensor):
        _checks.float_tensor(d, "disagreement")
        _checks.same_device(("rewards", r), ("disagreement", d))
        k = r.shape[0]
        if d.dim() == 0 or tuple(d.shape) == tuple(r.shape):
            return r - d.to(r.dtype)
        if tuple(d.shape) == (k,):
            return r - d.to(r.dtype).reshape((k,) + (1,) * (r.dim() - 1))
        raise ValueError(f"disagreement: expected a number, a tensor [{k}] (one per objective) or of the rewards' "
                         f"shape {tuple(r.shape)}, got {tuple(d.shape)}")
    d = _checks.finite(d, "disagreement")
    return r if d == 0 else r - d


def _nash_check(gap: Tensor, active: Optional[Tensor]) -> None:
    """Raises the ValueError of a weighted reward at or below its disagreement point (gap <= 0 or NaN)."""
    k = gap.shape[0]
    bad = ~(gap > 0) if active is None else active & ~(gap > 0)
    if bool(bad.any()):
        first = bad.reshape(k, -1).nonzero()[0].tolist()
        raise ValueError(f"rewards: method='nash' needs every reward above the disagreement point, got "
                         f"{int(bad.sum())} at or below it (first: objective {first[0]}, item {first[1]}, "
                         f"gap {float(gap.reshape(k, -1)[first[0], first[1]]):.4g}); lower `disagreement`")


@accepts_numpy
def aggregate_objectives(
    rewards: Tensor,
    *,
    method: str = "sum",
    weights: Optional[Tensor] = None,
    temperature: float = 1.0,
    disagreement: Union[Tensor, float] = 0.0,
) -> Tensor:
    """Aggregates the rewards of K objectives ``[K, ...]`` (reward models, annotator groups,
    values) into one reward per item (shape ``rewards.shape[1:]``).

    Methods (:data:`OBJECTIVE_METHODS`), with weights ``w_k >= 0`` (default 1):

    - ``sum``: the weighted (utilitarian) sum ``sum_k w_k r_k``; weights are not normalized.
    - ``min``: the egalitarian ``min_k r_k`` over the objectives with ``w_k > 0`` (MaxMin-RLHF,
      Chakraborty et al. 2024, arXiv:2402.08925); the weights only select, they do not scale.
    - ``softmin``: ``-temperature * log sum_k w~_k exp(-r_k / temperature)`` with the weights
      normalized to ``w~ = w / sum w``, computed as a log-sum-exp (stable at any temperature). It
      lies between the ``min`` (its limit as ``temperature -> 0``) and the weighted mean ``sum_k
      w~_k r_k`` (its limit as ``temperature -> inf``), and is smooth: its gradient is the softmax
      ``w~_k exp(-r_k / T) / sum_j w~_j exp(-r_j / T)`` over the objectives.
    - ``nash``: Nash social welfare ``sum_k w_k log(r_k - d_k)`` (the log of the weighted Nash
      product, Nash 1950; Kaneko & Nakamura 1979), with ``disagreement`` point ``d`` (a number, a
      tensor ``[K]`` per objective or of the rewards' shape; default 0: rewards are utilities above
      a status quo of 0). Every reward of a weighted objective must exceed its ``d_k``
      (ValueError otherwise, checked in eager mode; traced graphs get NaN/-inf there).

    With K = 1 and weight 1, ``sum``, ``min`` and ``softmin`` return the single objective.
    Differentiable w.r.t. ``rewards`` (``min`` routes the gradient to the minimum, split among ties
    like ``torch.amin``) and ``disagreement``; ``weights`` are not differentiated. Results are
    fp32 (fp64 for fp64 rewards).
    """
    _checks.float_tensor(rewards, "rewards")
    if rewards.dim() < 1 or rewards.shape[0] < 1:
        raise ValueError(f"rewards: expected shape [K, ...] with K >= 1 objectives, got {tuple(rewards.shape)}")
    _checks.choice(method, "method", OBJECTIVE_METHODS)
    temperature = _checks.positive(temperature, "temperature")
    k = rewards.shape[0]
    r = rewards.to(acc_dtype(rewards))
    w, all_positive = _objective_weights(weights, k, rewards)
    col = lambda v: v.reshape((k,) + (1,) * (r.dim() - 1))  # noqa: E731  [K] -> [K, 1, ...]
    if method == "sum":
        return r.sum(0) if w is None else (col(w) * r).sum(0)
    if method == "min":
        if w is None:
            return r.amin(0)
        return torch.where(col(w) > 0, r, torch.full_like(r, math.inf)).amin(0)
    if method == "softmin":
        log_w = torch.full((k,), -math.log(k), dtype=r.dtype, device=r.device) if w is None else \
            torch.log(w / w.sum())
        fi, inv = torch.finfo(r.dtype), 1.0 / temperature
        if fi.tiny <= inv <= fi.max:  # log w~_k - r_k / T as one pass (and one in the backward)
            z = torch.add(col(log_w), r, alpha=-inv)
        else:  # 1 / T outside the dtype's normal range: divide
            z = col(log_w) - r / temperature
        return -temperature * torch.logsumexp(z, dim=0)
    gap = _gap(r, disagreement)
    active = None if all_positive else (col(w) > 0).expand(gap.shape)
    logs = torch.log(gap if active is None else torch.where(active, gap, torch.ones_like(gap)))
    if w is None:
        out = logs.sum(0)
    elif active is None:  # every weight > 0: one matrix-vector product over the objectives
        out = (w @ logs.reshape(k, -1)).reshape(r.shape[1:])
    else:
        out = (col(w) * logs).sum(0)
    # A weighted gap <= 0 (or NaN) has log -inf (or NaN), which a positive weight carries into its
    # item's result, and a sum with a -inf or NaN term is -inf or NaN: one reduction (one host sync)
    # of the results clears the common case; the detailed check runs only when that sum is -inf or
    # NaN (which valid rewards can give too; then it finds nothing and the result stands).
    if not torch.compiler.is_compiling() and not float(out.detach().sum()) > -math.inf:
        _nash_check(gap, active)
    return out
