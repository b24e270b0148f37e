"""Reward ensembles: aggregation over members (mean, worst case, UWO, LCB, quantiles), the
variance decomposition of heteroscedastic members, and the uncertainty of Bradley-Terry preferences
(with loss weights from it)."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from pyalign import _checks
from pyalign._numpy import accepts_numpy
from pyalign.ops.uncertainty import reward_stats_op

__all__ = ["RewardAggregate", "posterior_weights", "aggregate_rewards", "VarianceDecomposition",
           "heteroscedastic_decomposition", "penalized_reward", "PreferenceUncertainty", "preference_uncertainty",
           "uncertainty_weights", "METHODS"]


METHODS = ("mean", "min", "uwo", "lcb", "median", "quantile")


class RewardAggregate(NamedTuple):
    """Aggregated reward and the ensemble statistics per item (shape ``rewards.shape[1:]``).

    ``variance`` is the spread of the members' rewards (epistemic). With ``variances`` given
    (heteroscedastic members), ``aleatoric`` is the (weighted) mean of the members' predicted
    variances and ``total_variance = aleatoric + variance``; otherwise both are None.
    """

    reward: Tensor
    mean: Tensor
    variance: Tensor
    std: Tensor
    min: Tensor
    max: Tensor
    aleatoric: Optional[Tensor] = None
    total_variance: Optional[Tensor] = None


@accepts_numpy
def posterior_weights(log_evidence: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Bayesian-model-average member weights ``softmax(log_evidence / temperature)``.

    ``log_evidence`` ``[M]``: each member's validation log-likelihood (or log marginal
    likelihood). With a uniform prior over members the posterior is proportional to the
    evidence; ``temperature > 1`` flattens it (a common guard against over-confident weights).
    """
    _checks.float_tensor(log_evidence, "log_evidence")
    if log_evidence.dim() != 1 or log_evidence.numel() < 1:
        raise ValueError(f"log_evidence: expected shape [M] with M >= 1, got {tuple(log_evidence.shape)}")
    temperature = _checks.positive(temperature, "temperature")
    acc = torch.float64 if log_evidence.dtype == torch.float64 else torch.float32
    return torch.softmax(log_evidence.to(acc) / temperature, dim=0)


def _normalized_weights(member_weights, m: int, ref: Tensor):
    """(weights [M] acc dtype normalized to 1, or None for uniform; sum of squared weights)."""
    if member_weights is None:
        return None, 1.0 / m
    _checks.float_tensor(member_weights, "member_weights")
    _checks.same_device(("rewards", ref), ("member_weights", member_weights))
    if tuple(member_weights.shape) != (m,):
        raise ValueError(f"member_weights: expected shape [{m}] (one weight per member), got {tuple(member_weights.shape)}")
    acc = torch.float64 if ref.dtype == torch.float64 else torch.float32
    w = member_weights.detach().to(acc)
    total = w.sum()
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not float(total) > 0:
        raise ValueError("member_weights: expected finite, non-negative weights with a positive sum")
    w = (w / total).contiguous()
    return w, float((w * w).sum())


def _as_members(x, name: str) -> tuple[Tensor, tuple]:
    _checks.float_tensor(x, name)
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"{name}: expected shape [M, ...] with M >= 1 members, got {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1), tuple(x.shape[1:])


@accepts_numpy
def aggregate_rewards(
    rewards: Tensor,
    *,
    method: str = "mean",
    lam: float = 1.0,
    q: float = 0.1,
    ddof: int = 0,
    member_weights: Optional[Tensor] = None,
    variances: Optional[Tensor] = None,
) -> RewardAggregate:
    """Aggregates an ensemble of rewards ``[M, ...]`` over its member dimension.

    Methods: ``mean`` (Bayesian model average with ``member_weights``), ``min`` (worst case),
    ``uwo`` = mean - lam * variance (uncertainty-weighted optimization), ``lcb`` = mean - lam *
    std, ``median`` and ``quantile`` (the ``q`` quantile, linear interpolation as
    ``torch.quantile``; unweighted).

    Args:
        rewards: ``[M, ...]`` fp32/bf16/fp16 (or fp64); M members.
        ddof: 0 (population variance) or 1 (unbiased; with ``member_weights`` the
            reliability-weights correction ``sum w (r - mean)^2 / (1 - sum w^2)``). ``ddof=1``,
            ``uwo`` and ``lcb`` need M >= 2; with ``ddof=0`` and M == 1 the variance is 0.
        member_weights: ``[M]`` non-negative weights (normalized here), e.g. from
            :func:`posterior_weights`; not differentiated.
        variances: ``[M, ...]`` heteroscedastic members' predicted variances (aleatoric).

    Differentiable w.r.t. ``rewards`` and ``variances`` (min/max/quantile route the gradient to
    the selected members). Reductions over M run in pyalign's kernels; the rest is elementwise.
    """
    r2, out_shape = _as_members(rewards, "rewards")
    m = r2.shape[0]
    _checks.choice(method, "method", METHODS)
    lam = _checks.finite(lam, "lam")
    if isinstance(ddof, bool) or ddof not in (0, 1):
        raise ValueError(f"ddof: expected 0 or 1, got {ddof!r}")
    if method == "quantile":
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 <= q <= 1:
            raise ValueError(f"q: expected a number in [0, 1], got {q!r}")
    if m < 2 and (ddof == 1 or method in ("uwo", "lcb")):
        raise ValueError(f"rewards: M = {m} member; ddof=1, 'uwo' and 'lcb' need a variance over M >= 2 members")
    w, sum_w2 = _normalized_weights(member_weights, m, rewards)
    if method in ("median", "quantile") and w is not None:
        raise ValueError(f"member_weights: not supported with method={method!r} (the quantile is unweighted)")
    v2 = None
    if variances is not None:
        v2, vshape = _as_members(variances, "variances")
        _checks.same_device(("rewards", rewards), ("variances", variances))
        if tuple(variances.shape) != tuple(rewards.shape):
            raise ValueError(f"variances: expected the shape of rewards {tuple(rewards.shape)}, got {tuple(variances.shape)}")
        v2 = v2.to(r2.dtype)
    var_denom = 1.0 - ddof * sum_w2
    if var_denom <= 0:
        raise ValueError("member_weights: ddof=1 needs at least two members with non-zero weight")
    qq = 0.5 if method == "median" else float(q) if method == "quantile" else -1.0
    mean, var, mn, mx, quant, ale = reward_stats_op(r2, v2, w, var_denom, qq)
    std = torch.where(var > 0, var.clamp(min=torch.finfo(var.dtype).tiny).sqrt(), var * 0)  # NaN stays NaN
    reward = {
        "mean": lambda: mean, "min": lambda: mn, "uwo": lambda: mean - lam * var,
        "lcb": lambda: mean - lam * std, "median": lambda: quant, "quantile": lambda: quant,
    }[method]()
    shaped = lambda t: t.view(out_shape)
    aleatoric = total = None
    if variances is not None:
        aleatoric, total = shaped(ale), shaped(ale + var)
    return RewardAggregate(shaped(reward), shaped(mean), shaped(var), shaped(std), shaped(mn), shaped(mx),
                           aleatoric, total)


class VarianceDecomposition(NamedTuple):
    """``total = aleatoric + epistemic`` per item."""

    mean: Tensor
    total: Tensor
    aleatoric: Tensor
    epistemic: Tensor


@accepts_numpy
def heteroscedastic_decomposition(means: Tensor, variances: Tensor, *, member_weights: Optional[Tensor] = None,
                                  ddof: int = 0) -> VarianceDecomposition:
    """Law of total variance for members that each predict a mean and a variance (Kendall & Gal 2017):
    total = mean of variances (aleatoric) + variance of means (epistemic)."""
    _checks.float_tensor(means, "means")
    _checks.float_tensor(variances, "variances")
    if means.dim() < 1 or means.shape[0] < 1:
        raise ValueError(f"means: expected shape [M, ...] with M >= 1 members, got {tuple(means.shape)}")
    if tuple(variances.shape) != tuple(means.shape):
        raise ValueError(f"variances: expected the shape of means {tuple(means.shape)}, got {tuple(variances.shape)}")
    agg = aggregate_rewards(means, member_weights=member_weights, variances=variances, ddof=ddof)
    return VarianceDecomposition(agg.mean, agg.total_variance, agg.aleatoric, agg.variance)


@accepts_numpy
def penalized_reward(rewards: Tensor, *, method: str = "uwo", lam: float = 1.0,
                     member_weights: Optional[Tensor] = None) -> Tensor:
    """Uncertainty-penalized reward for RL: ``uwo`` (mean - lam * var) or ``lcb`` (mean - lam * std)."""
    _checks.choice(method, "method", ("uwo", "lcb"))
    return aggregate_rewards(rewards, method=method, lam=lam, member_weights=member_weights).reward


class PreferenceUncertainty(NamedTuple):
    """Per pair: ``total = aleatoric + epistemic`` (binary entropies in nats)."""

    prob: Tensor          # mean_m sigmoid(beta (r_chosen - r_rejected))
    prob_variance: Tensor  # var_m of the same
    total: Tensor         # H(mean p)
    aleatoric: Tensor     # mean_m H(p_m)
    epistemic: Tensor     # mutual information, >= 0


def _binary_entropy_from_logit(x: Tensor) -> Tensor:
    # H(sigmoid(x)) = p softplus(-x) + (1 - p) softplus(x): stable and exact for large |x|. Beyond
    # |x| = 100 the entropy underflows to 0 anyway; clamping keeps an infinite logit from giving 0 * inf.
    x = x.clamp(-100.0, 100.0)
    p = torch.sigmoid(x)
    return p * F.softplus(-x) + (1 - p) * F.softplus(x)


def _binary_entropy(p: Tensor) -> Tensor:
    p = p.clamp(0, 1)
    return -(torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p))


@accepts_numpy
def preference_uncertainty(r_chosen: Tensor, r_rejected: Tensor, *, beta: float = 1.0,
                           member_weights: Optional[Tensor] = None) -> PreferenceUncertainty:
    """Bradley-Terry preference probability of an ensemble and its entropy decomposition.

    ``r_chosen``, ``r_rejected``: ``[M, ...]`` member rewards; ``p_m = sigmoid(beta (r_c - r_r))``.
    Differentiable w.r.t. both rewards.
    """
    _checks.float_tensor(r_chosen, "r_chosen")
    _checks.float_tensor(r_rejected, "r_rejected")
    _checks.same_device(("r_chosen", r_chosen), ("r_rejected", r_rejected))
    if tuple(r_chosen.shape) != tuple(r_rejected.shape):
        raise ValueError(f"r_rejected: expected the shape of r_chosen {tuple(r_chosen.shape)}, got {tuple(r_rejected.shape)}")
    beta = _checks.positive(beta, "beta")
    x2, out_shape = _as_members(r_chosen, "r_chosen")
    acc = torch.float64 if r_chosen.dtype == torch.float64 else torch.float32
    x = beta * (x2.to(acc) - r_rejected.reshape(x2.shape).to(acc))
    m = x.shape[0]
    w, sum_w2 = _normalized_weights(member_weights, m, r_chosen)
    p_mean, p_var, _, _, _, h_mean = reward_stats_op(torch.sigmoid(x), _binary_entropy_from_logit(x), w, 1.0, -1.0)
    total = _binary_entropy(p_mean)
    epistemic = (total - h_mean).clamp(min=0)  # >= 0 by Jensen; rounding can dip below
    shaped = lambda t: t.view(out_shape)
    return PreferenceUncertainty(shaped(p_mean), shaped(p_var), shaped(total), shaped(h_mean), shaped(epistemic))


@accepts_numpy
def uncertainty_weights(r_chosen: Tensor, r_rejected: Tensor, *, source: str = "mutual_information",
                        temperature: Optional[float] = None, min_weight: float = 0.0, beta: float = 1.0,
                        member_weights: Optional[Tensor] = None) -> Tensor:
    """Per-pair loss weights ``[N]`` (fp32, detached) that down-weight pairs the ensemble disagrees on.

    ``u`` is each pair's epistemic uncertainty: the mutual information of the ensemble's
    Bradley-Terry probability (``source="mutual_information"``) or the std of the members'
    margins (``source="margin_std"``). The weight is ``exp(-u / temperature)`` (temperature
    defaults to the batch mean of ``u``), floored at ``min_weight`` and rescaled to mean 1 so the
    loss scale is unchanged. Pass it as ``weights=`` to pyalign's preference losses.
    """
    _checks.choice(source, "source", ("mutual_information", "margin_std"))
    if isinstance(min_weight, bool) or not isinstance(min_weight, (int, float)) or not 0 <= min_weight <= 1:
        raise ValueError(f"min_weight: expected a number in [0, 1], got {min_weight!r}")
    if temperature is not None:
        temperature = _checks.positive(temperature, "temperature")
    with torch.no_grad():
        if source == "mutual_information":
            u = preference_uncertainty(r_chosen, r_rejected, beta=beta, member_weights=member_weights).epistemic
            if r_chosen.shape[0] < 2:
                raise ValueError(f"r_chosen: uncertainty weights need [M, ...] with M >= 2 members, got "
                                 f"{tuple(r_chosen.shape)}")
            scale = math.log(2.0)  # the largest binary entropy
        else:
            _checks.float_tensor(r_chosen, "r_chosen")
            _checks.float_tensor(r_rejected, "r_rejected")
            if tuple(r_chosen.shape) != tuple(r_rejected.shape):
                raise ValueError(f"r_rejected: expected the shape of r_chosen {tuple(r_chosen.shape)}, "
                                 f"got {tuple(r_rejected.shape)}")
            if r_chosen.dim() < 1 or r_chosen.shape[0] < 2:
                raise ValueError(f"r_chosen: source='margin_std' needs [M, ...] with M >= 2 members, got {tuple(r_chosen.shape)}")
            margins = r_chosen - r_rejected
            u = aggregate_rewards(margins, member_weights=member_weights).std
            scale = float(margins.abs().max()) if margins.numel() else 0.0
        u = u.reshape(-1).float()
        # Disagreement below the rounding of the inputs is no disagreement: identical members give
        # a u of 0 or a few ulps, and exp(-u / mean(u)) would turn those ulps into large weights.
        resolution = 64 * torch.finfo(r_chosen.dtype).eps * max(scale, 1e-30)
        u = torch.where(u > resolution, u, torch.zeros_like(u))
        tau = temperature if temperature is not None else float(u.mean()) if u.numel() else 1.0
        if not tau > 0:  # every pair is certain: equal weights
            return torch.ones_like(u)
        wts = torch.exp(-u / tau).clamp(min=min_weight)
        return wts / wts.mean()
