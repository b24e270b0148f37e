"""Advantages of critic-free RL from sampled groups of completions: GRPO's group normalization (as
TRL computes it), RLOO's leave-one-out baseline, REINFORCE++'s batch normalization; and the same
from a reward ensemble, penalized by its uncertainty (a composite over
:func:`pyalign.uncertainty.aggregate_rewards`)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from pyalign import _checks
from pyalign.uncertainty.ensembles import aggregate_rewards
from pyalign.uncertainty.objectives import aggregate_objectives

__all__ = ["group_advantages", "ensemble_advantages", "ESTIMATORS", "MULTI_OBJECTIVE_AGGREGATIONS"]

ESTIMATORS = ("grpo", "rloo", "reinforce_pp")
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum", "min_then_normalize",
                                "softmin_then_normalize", "nash_then_normalize")


def _nanstd(x: Tensor, dim=None) -> Tensor:
    """torch.std (unbiased) over the non-NaN entries, as TRL's ``nanstd``."""
    mean = torch.nanmean(x, dim=dim, keepdim=dim is not None)
    cnt = (~torch.isnan(x)).sum(dim=dim, keepdim=dim is not None) if dim is not None else (~torch.isnan(x)).sum()
    var = torch.nansum((x - mean) ** 2, dim=dim, keepdim=dim is not None) / (cnt - 1)
    return var.sqrt()


def _disagreement_floor(d) -> float:
    """A value above every disagreement point (fills unscorable completions before a nash product)."""
    return float(d.max()) if isinstance(d, Tensor) and d.numel() else float(d)


def group_advantages(
    rewards: Tensor,
    group_size: int,
    *,
    scale_rewards: str = "group",
    reward_weights: Optional[Sequence[float]] = None,
    multi_objective_aggregation: str = "sum_then_normalize",
    estimator: str = "grpo",
    objective_temperature: float = 1.0,
    objective_disagreement=0.0,
) -> Tensor:
    """Per-completion advantages ``[N]`` for ``N = G * group_size`` completions, the ``group_size``
    completions of each prompt consecutive.

    ``rewards``: ``[N]``, or ``[K, N]`` for K reward functions combined with ``reward_weights``
    (default all 1). NaN marks an unscorable reward: a completion whose every reward is NaN is left
    out of the baselines and gets advantage 0, as in TRL. ``estimator``:

    - ``grpo`` (Shao et al. 2024, arXiv:2402.03300), exactly TRL 1.16's: with
      ``multi_objective_aggregation="sum_then_normalize"`` the weighted sum of the rewards minus its
      group mean, divided by ``std + 1e-4`` (the unbiased std of the group for
      ``scale_rewards="group"``, of the batch for ``"batch"``; not divided for ``"none"``; Dr. GRPO,
      Liu et al. 2025, argues for "none"); with ``"normalize_then_sum"`` (GDPO) each reward is
      normalized in its group first, the weighted sum then normalized over the batch; with
      ``"min_then_normalize"``, ``"softmin_then_normalize"`` or ``"nash_then_normalize"`` the K rewards
      are combined by :func:`pyalign.uncertainty.aggregate_objectives` (egalitarian min of
      MaxMin-RLHF, its smooth ``softmin`` at ``objective_temperature``, Nash social welfare above
      ``objective_disagreement``; ``reward_weights`` as its weights) and then treated as the sum is;
    - ``rloo`` (Ahmadian et al. 2024, arXiv:2402.14740): the reward minus the mean of the other
      completions of its group;
    - ``reinforce_pp`` (REINFORCE++, Hu 2025, arXiv:2501.03262): the group-mean-centered reward
      normalized over the batch (``std + 1e-8``, verl's).

    Not differentiable (rewards are data); fp32 (fp64 for fp64 rewards).
    """
    _checks.float_tensor(rewards, "rewards")
    if rewards.dim() not in (1, 2):
        raise ValueError(f"rewards: expected shape [N] or [K, N], got {list(rewards.shape)}")
    r = (rewards if rewards.dim() == 2 else rewards.unsqueeze(0)).detach()
    r = r.to(torch.float64 if r.dtype == torch.float64 else torch.float32)
    K, N = r.shape
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size: expected an int >= 1, got {group_size!r}")
    if N % group_size:
        raise ValueError(f"group_size: {group_size} does not divide the {N} completions")
    _checks.choice(scale_rewards, "scale_rewards", ("group", "batch", "none"))
    _checks.choice(multi_objective_aggregation, "multi_objective_aggregation", MULTI_OBJECTIVE_AGGREGATIONS)
    _checks.choice(estimator, "estimator", ESTIMATORS)
    if reward_weights is None:
        w = torch.ones(K, dtype=r.dtype, device=r.device)
    else:
        w = torch.tensor([_checks.finite(x, "reward_weights") for x in reward_weights], dtype=r.dtype, device=r.device)
        if w.numel() != K:
            raise ValueError(f"reward_weights: expected {K} weights (one per reward function), got {w.numel()}")
    per = r.t()  # [N, K]
    unscorable = torch.isnan(per).all(dim=1)
    if estimator == "grpo" and multi_objective_aggregation == "normalize_then_sum":
        grouped = per.view(-1, group_size, K)
        mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
        std_k = _nanstd(grouped, 1) if group_size > 1 else torch.zeros_like(mean_k)
        total = (((grouped - mean_k) / (std_k + 1e-4)).view(-1, K) * w).nansum(dim=1)
        total = torch.where(unscorable, torch.full_like(total, float("nan")), total)
        std = _nanstd(total) if N > 1 else torch.zeros((), dtype=r.dtype, device=r.device)
        return torch.nan_to_num((total - torch.nanmean(total)) / (std + 1e-4), nan=0.0)
    if multi_objective_aggregation in ("sum_then_normalize", "normalize_then_sum"):
        total = (per * w).nansum(dim=1)
    else:  # every reward of a scorable completion is needed: a min or a product has no "missing" term
        if bool((torch.isnan(per).any(dim=1) & ~unscorable).any()):
            raise ValueError(f"rewards: multi_objective_aggregation={multi_objective_aggregation!r} needs every "
                             "reward of a completion (NaN only where all of its rewards are NaN)")
        method = multi_objective_aggregation.split("_then_")[0]
        scored = torch.where(unscorable.unsqueeze(1), torch.ones_like(per) + _disagreement_floor(objective_disagreement),
                             per)
        total = aggregate_objectives(scored.t(), method=method, weights=w, temperature=objective_temperature,
                                     disagreement=objective_disagreement)
    total = torch.where(unscorable, torch.full_like(total, float("nan")), total)
    g = total.view(-1, group_size)
    if estimator == "rloo":
        cnt = (~torch.isnan(g)).sum(1, keepdim=True)
        others = (torch.nansum(g, 1, keepdim=True) - torch.nan_to_num(g)) / (cnt - 1).clamp(min=1)
        return torch.nan_to_num((g - others).reshape(-1), nan=0.0)
    centered = (g - torch.nanmean(g, 1, keepdim=True)).reshape(-1)
    if estimator == "reinforce_pp":
        std = _nanstd(centered) if N > 1 else torch.zeros((), dtype=r.dtype, device=r.device)
        return torch.nan_to_num((centered - torch.nanmean(centered)) / (std + 1e-8), nan=0.0)
    if scale_rewards == "none":
        return torch.nan_to_num(centered, nan=0.0)
    if scale_rewards == "batch":
        std = _nanstd(total) if N > 1 else torch.zeros((), dtype=r.dtype, device=r.device)
    else:
        std = (_nanstd(g, 1).expand_as(g).reshape(-1) if group_size > 1 else torch.zeros_like(total))
    return torch.nan_to_num(centered / (std + 1e-4), nan=0.0)


def ensemble_advantages(
    member_rewards: Tensor,
    group_size: int,
    *,
    method: str = "uwo",
    lam: float = 1.0,
    q: float = 0.1,
    member_weights: Optional[Tensor] = None,
    reward_variance: Optional[Tensor] = None,
    variance_coef: float = 0.0,
    **group_advantages_options,
) -> Tensor:
    """Group advantages ``[N]`` from a reward ensemble's rewards ``[M, N]``, penalized by the
    ensemble's disagreement: ``group_advantages(aggregate_rewards(member_rewards, method=method,
    lam=lam).reward, group_size, **group_advantages_options)``.

    ``method`` is any of :data:`pyalign.uncertainty.METHODS`: ``mean``; ``uwo`` (mean - lam *
    variance, uncertainty-weighted optimization) and ``min`` (worst case) of Coste et al. 2023,
    arXiv:2310.02743; ``lcb`` (mean - lam * std); ``median``; ``quantile`` (``q``). Reward-model
    ensembles mitigate but do not remove over-optimization (Eisenstein et al. 2023,
    arXiv:2312.09244); the penalty keeps the policy where the members agree.

    ``reward_variance`` ``[N]`` (optional): a per-sequence predictive variance of the reward, e.g.
    from a last-layer Laplace head (:meth:`pyalign.uncertainty.LaplaceRewardHead.predict`);
    ``variance_coef * sqrt(reward_variance)`` is subtracted from the aggregated reward first, the
    lower confidence bound that adversarial policy optimization with lightweight uncertainty uses
    (AdvPO, Zhang et al. 2024, arXiv:2403.05171). A single reward model with that variance is
    ``member_rewards`` of shape ``[1, N]`` with ``method="mean"``.

    NaN marks an unscorable completion as in :func:`group_advantages` (a NaN in any member's
    reward makes that completion's aggregate NaN). Not differentiable (rewards are data).
    """
    _checks.float_tensor(member_rewards, "member_rewards")
    if member_rewards.dim() != 2 or member_rewards.shape[0] < 1:
        raise ValueError(f"member_rewards: expected shape [M, N] with M >= 1 members, got {list(member_rewards.shape)}")
    reward = aggregate_rewards(member_rewards.detach(), method=method, lam=lam, q=q,
                               member_weights=member_weights).reward
    coef = _checks.finite(variance_coef, "variance_coef")
    if coef < 0:
        raise ValueError(f"variance_coef: expected a number >= 0, got {variance_coef!r}")
    if reward_variance is not None:
        _checks.float_tensor(reward_variance, "reward_variance")
        _checks.same_device(("member_rewards", member_rewards), ("reward_variance", reward_variance))
        if tuple(reward_variance.shape) != tuple(reward.shape):
            raise ValueError(f"reward_variance: expected shape {list(reward.shape)} (one variance per completion), "
                             f"got {list(reward_variance.shape)}")
        var = reward_variance.detach().to(reward.dtype)
        if bool((var < 0).any()):
            raise ValueError("reward_variance: expected non-negative variances")
        reward = reward - coef * var.sqrt()
    elif coef:
        raise ValueError("variance_coef: given without reward_variance (the per-sequence variance it scales)")
    return group_advantages(reward, group_size, **group_advantages_options)
