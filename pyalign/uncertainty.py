"""Bayesian ensemble uncertainty for alignment: reward ensembles, token distributions,
calibration, conformal bounds and a last-layer Laplace reward head.

Conventions: an ensemble puts its members on the first dimension (``[M, N]`` rewards,
``[M, ..., V]`` logits). Results are fp32 (fp64 for fp64 inputs). Entropies are in nats.

References: Lakshminarayanan et al. 2017 (deep ensembles); Depeweg et al. 2018 (entropy
decomposition into aleatoric + epistemic mutual information); Kendall & Gal 2017
(heteroscedastic members); Coste et al. 2023 (UWO: mean - lambda * variance, worst case);
Guo et al. 2017 (ECE, reliability diagrams); Vovk et al. 2005 / Angelopoulos & Bates 2021
(split conformal prediction); Sadinle et al. 2019 (LAC sets); MacKay 1992 (Laplace, evidence,
probit approximation); Immer et al. 2021 / Daxberger et al. 2021 (last-layer Laplace, prior
precision by marginal likelihood).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from pyalign import _checks
from pyalign._numpy import accepts_numpy
from pyalign.ops.uncertainty import reward_stats_op, token_uncertainty_op

METHODS = ("mean", "min", "uwo", "lcb", "median", "quantile")


# ----------------------------------------------------------------------------------------------
# Reward ensembles
# ----------------------------------------------------------------------------------------------

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
        rewards: ``[M, ...]`` fp32/bf16/fp16 (fp64 on CPU); M members.
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


# ----------------------------------------------------------------------------------------------
# Token distributions
# ----------------------------------------------------------------------------------------------

class TokenUncertainty(NamedTuple):
    """Per token (shape ``logits.shape[1:-1]``); label fields are None without labels.

    ``total_entropy`` H(mean_m p_m), ``expected_entropy`` mean_m H(p_m) (aleatoric),
    ``mutual_information`` their difference (epistemic, >= 0), ``logprobs`` log mean_m p_m(label),
    ``prob_variance`` var_m p_m(label) (ddof 0), ``member_logprobs`` ``[M, ...]`` log p_m(label).
    Positions whose label is ``ignore_index`` are 0 in every field.
    """

    total_entropy: Tensor
    expected_entropy: Tensor
    mutual_information: Tensor
    logprobs: Optional[Tensor] = None
    prob_variance: Optional[Tensor] = None
    member_logprobs: Optional[Tensor] = None


def _check_token_args(logits, labels, temperature, ignore_index, validate):
    _checks.float_tensor(logits, "logits")
    if logits.dim() < 2 or logits.shape[0] < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits: expected shape [M, ..., V] with M >= 1 members and V >= 1, got {tuple(logits.shape)}")
    if labels is not None:
        _checks.index_tensor(labels, "labels")
        _checks.same_device(("logits", logits), ("labels", labels))
        if tuple(labels.shape) != tuple(logits.shape[1:-1]):
            raise ValueError(f"labels: expected shape {tuple(logits.shape[1:-1])} (logits without the member and "
                             f"vocabulary dimensions), got {tuple(labels.shape)}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {ignore_index!r}")
    temperature = _checks.positive(temperature, "temperature")
    if logits.stride(-1) != 1 and logits.shape[-1] > 1:
        logits = logits.contiguous()
    if validate is None:
        validate = logits.device.type == "cpu"
    if validate and labels is not None and logits.device.type != "cpu":
        from pyalign.logprob import check_labels
        check_labels(labels, logits.shape[-1], ignore_index)
    return logits, temperature


def token_uncertainty(logits: Tensor, labels: Optional[Tensor] = None, *, temperature: float = 1.0,
                      ignore_index: int = -100, validate: Optional[bool] = None) -> TokenUncertainty:
    """Per-token ensemble uncertainty from the logits of M members, fused over the vocabulary.

    Args:
        logits: ``[M, ..., V]`` fp32/bf16/fp16 (fp64 on CPU); leading dims may have any strides.
        labels: optional int32/int64 ``logits.shape[1:-1]``; ``ignore_index`` positions give 0.
        temperature: ``p_m = softmax(logits_m / temperature)``.
        validate: check labels are in ``[0, V)`` (CPU: always, inside the kernel; CUDA: opt-in, it
            syncs; an invalid label then gives NaN and is never read).

    Memory is O(M x tokens): no ``[M, tokens, V]`` probability tensor is formed. Each member's
    row is read twice (softmax statistics, then the mean distribution).

    Gradients: ``logprobs`` and ``member_logprobs`` are differentiable w.r.t. ``logits`` (fused
    backward kernel); the entropies and the mutual information are not (they are returned
    detached from the graph).
    """
    logits, temperature = _check_token_args(logits, labels, temperature, ignore_index, validate)
    total, expected, mi, ens, lvar, mlp, _ = token_uncertainty_op(logits, labels, temperature, ignore_index)
    shape = tuple(logits.shape[1:-1])
    if labels is None:
        return TokenUncertainty(total.view(shape), expected.view(shape), mi.view(shape))
    return TokenUncertainty(total.view(shape), expected.view(shape), mi.view(shape), ens.view(shape),
                            lvar.view(shape), mlp.view((logits.shape[0],) + shape))


class SequenceUncertainty(NamedTuple):
    """Per sequence: sums (or means) over valid tokens; ``logprobs`` None without labels."""

    total_entropy: Tensor
    expected_entropy: Tensor
    mutual_information: Tensor
    logprobs: Optional[Tensor]
    counts: Tensor


def sequence_uncertainty(logits: Tensor, labels: Optional[Tensor] = None, *, mask: Optional[Tensor] = None,
                         temperature: float = 1.0, ignore_index: int = -100, reduction: str = "sum",
                         validate: Optional[bool] = None) -> SequenceUncertainty:
    """Aggregates :func:`token_uncertainty` over the last (sequence) dimension ``T``.

    ``logits`` ``[M, ..., T, V]``; valid tokens are those with ``labels != ignore_index`` and
    ``mask`` (bool ``[..., T]``) true. ``reduction``: ``"sum"`` or ``"mean"`` (per valid token; a
    sequence without valid tokens gives 0). ``logprobs`` is the sum/mean of the per-token ensemble
    log-prob (differentiable); counts are int64.
    """
    _checks.choice(reduction, "reduction", ("sum", "mean"))
    _checks.tensor(logits, "logits")
    if logits.dim() < 3:
        raise ValueError(f"logits: expected shape [M, ..., T, V] with a sequence dimension, got {tuple(logits.shape)}")
    tok = token_uncertainty(logits, labels, temperature=temperature, ignore_index=ignore_index, validate=validate)
    seq_shape = tuple(logits.shape[1:-1])
    valid = torch.ones(seq_shape, dtype=torch.bool, device=logits.device)
    if labels is not None:
        valid = labels != ignore_index
    if mask is not None:
        _checks.tensor(mask, "mask")
        if tuple(mask.shape) != seq_shape:
            raise ValueError(f"mask: expected shape {seq_shape}, got {tuple(mask.shape)}")
        _checks.same_device(("logits", logits), ("mask", mask))
        valid = valid & mask.bool()
    counts = valid.sum(-1)
    vf = valid.to(tok.total_entropy.dtype)
    denom = counts.clamp(min=1).to(vf.dtype) if reduction == "mean" else None
    red = lambda t: None if t is None else ((t * vf).sum(-1) if denom is None else (t * vf).sum(-1) / denom)
    return SequenceUncertainty(red(tok.total_entropy), red(tok.expected_entropy), red(tok.mutual_information),
                               red(tok.logprobs), counts)


# ----------------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------------

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


def _check_probs(probs: Tensor, name: str) -> None:
    if probs.numel() and not bool(((probs >= 0) & (probs <= 1)).all()):
        raise ValueError(f"{name}: expected probabilities in [0, 1] (got values outside, or NaN)")


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
    _check_probs(probs, "probs")
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


# ----------------------------------------------------------------------------------------------
# Split conformal prediction
# ----------------------------------------------------------------------------------------------

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
    _check_probs(cal_probs, "cal_probs")
    _check_probs(test_probs, "test_probs")
    p_true = cal_probs.detach().float().gather(1, cal_labels.long().unsqueeze(1)).squeeze(1)
    qhat = conformal_quantile(1 - p_true, alpha)
    thr = 1 - qhat
    mask = test_probs.detach().float() >= thr
    return ConformalSets(mask, mask.sum(1), thr)


# ----------------------------------------------------------------------------------------------
# Last-layer Laplace reward head
# ----------------------------------------------------------------------------------------------

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


__all__ = [
    "RewardAggregate", "posterior_weights", "aggregate_rewards", "VarianceDecomposition",
    "heteroscedastic_decomposition", "penalized_reward", "PreferenceUncertainty", "preference_uncertainty",
    "uncertainty_weights", "TokenUncertainty", "token_uncertainty", "SequenceUncertainty",
    "sequence_uncertainty", "Calibration", "calibration", "plot_reliability", "conformal_quantile",
    "ConformalInterval", "conformal_reward_interval", "ConformalSets", "conformal_token_sets",
    "LaplaceRewardHead", "last_layer_laplace",
]
