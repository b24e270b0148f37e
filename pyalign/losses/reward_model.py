"""The Bradley-Terry reward-model loss, as TRL's ``RewardTrainer``."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from pyalign.losses import _inputs as inp

__all__ = ["reward_model_loss"]


def reward_model_loss(
    rewards_chosen: Tensor,
    rewards_rejected: Tensor,
    *,
    margin: Union[Tensor, float, None] = None,
    center_rewards_coefficient: Optional[float] = None,
    weights: Optional[Tensor] = None,
    reduction: str = "mean",
    dro_temperature: float = 1.0,
):
    """Bradley-Terry reward-model loss (Ouyang et al. 2022, arXiv:2203.02155, eq. 1).

    Per pair ``-log sigmoid(r_c - r_r - margin)`` (margin per Touvron et al. 2023,
    arXiv:2307.09288, eq. 2) plus ``center_rewards_coefficient * (r_c + r_r)^2`` (reward centering,
    Eisenstein et al. 2023, arXiv:2312.09244), as TRL's ``RewardTrainer``. ``rewards_*`` are the
    model's scalar rewards [batch]; ``margin`` a tensor [batch] or a number. ``reduction="dro"``
    (with ``dro_temperature``) is the KL-DRO reduction of :func:`pyalign.losses.dpo_loss`.
    Metrics: ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``.
    """
    a = inp.policy(rewards_chosen, "rewards_chosen")
    n, dev = a.shape[0], a.device
    b = inp.vec(rewards_rejected, "rewards_rejected", n, dev)
    if margin is not None and not isinstance(margin, Tensor):
        margin = torch.full((n,), inp.number(margin, "margin"), dtype=a.dtype, device=dev)
    m = inp.opt(margin, "margin", n, dev)
    center = 0.0 if center_rewards_coefficient is None else inp.number(center_rewards_coefficient,
                                                                    "center_rewards_coefficient")
    w = inp.opt(weights, "weights", n, dev)
    red, dro_tau = inp.pair_reduction(reduction, dro_temperature)
    loss, metrics, _ = inp.run("rm", a, b, m, None, None, None, w, center=center, reduction=red,
                               dro_temperature=dro_tau)
    return loss, metrics
