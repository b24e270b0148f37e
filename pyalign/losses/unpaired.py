"""Losses on unpaired examples (each completion labelled desirable or not): KTO and BCO."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pyalign import _checks
from pyalign.losses import _inputs as inp
from pyalign._tensors import acc_dtype
from pyalign.ops.losses import KTO_TYPES

__all__ = ["kto_loss", "bco_loss", "BCORunningMean"]


def _unpaired_inputs(policy_logps, ref_logps, desirable, weights):
    p = inp.policy(policy_logps, "policy_logps")
    n, dev = p.shape[0], p.device
    if ref_logps is None:
        raise ValueError("ref_logps: this loss needs reference log-probs")
    r = inp.vec(ref_logps, "ref_logps", n, dev)
    lab = inp.vec(desirable, "desirable", n, dev, numeric=True)
    if lab.is_floating_point():
        raise TypeError(f"desirable: expected a bool (or integer 0/1) tensor, got {lab.dtype}")
    w = inp.opt(weights, "weights", n, dev)
    return p, r, lab, w


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    *,
    policy_kl_logps: Optional[Tensor] = None,
    ref_kl_logps: Optional[Tensor] = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
    weights: Optional[Tensor] = None,
    reduction: str = "mean",
):
    """KTO (Ethayarajh et al. 2024, arXiv:2402.01306, eq. 8) on unpaired examples.

    With ``r = policy_logps - ref_logps`` and the reference point ``z0 = max(0, mean(policy_kl_logps
    - ref_kl_logps))`` (detached; 0 without KL log-probs), the loss of a desirable example is
    ``desirable_weight * (1 - sigmoid(beta (r - z0)))`` and of an undesirable one
    ``undesirable_weight * (1 - sigmoid(beta (z0 - r)))``. ``loss_type="apo_zero_unpaired"``
    (APO, arXiv:2408.06266) uses ``1 - sigmoid(beta r)`` and ``sigmoid(beta r)`` and no KL term.
    The mean runs over all elements (TRL's concatenation of both classes).

    ``desirable``: bool (or 0/1 integer) tensor. Metrics: ``rewards/*`` and ``logps/*`` are means
    over each class (NaN for an empty class), ``kl`` the reference point, ``count/*`` class sizes.
    """
    p, r, lab, w = _unpaired_inputs(policy_logps, ref_logps, desirable, weights)
    dev = p.device
    lt = _checks.choice(loss_type, "loss_type", KTO_TYPES)
    if (policy_kl_logps is None) != (ref_kl_logps is None):
        raise ValueError("policy_kl_logps / ref_kl_logps: give both KL-batch log-probs or neither")
    kla = klb = None
    if policy_kl_logps is not None:
        if lt != "kto":
            raise ValueError(f"policy_kl_logps: loss_type {lt!r} has no KL term; do not pass KL log-probs")
        kla = inp.policy(policy_kl_logps, "policy_kl_logps")
        if kla.device != dev:
            raise ValueError(f"policy_kl_logps: expected a tensor on {dev} like the policy log-probs, got {kla.device}")
        klb = inp.vec(ref_kl_logps, "ref_kl_logps", kla.shape[0], dev)
        kla, klb = kla.detach(), klb.detach()
    loss, metrics, _ = inp.run("kto", p, None, r, None, None, None, w, lab, kla, klb, types=[KTO_TYPES.index(lt)],
                beta=_checks.positive(beta, "beta"),
                desirable_weight=inp.number(desirable_weight, "desirable_weight"),
                undesirable_weight=inp.number(undesirable_weight, "undesirable_weight"),
                reduction=inp.reduction(reduction))
    return loss, metrics


class BCORunningMean:
    """BCO's reward shift: the running mean of the batch-mean reward, one update per call.

    Holds ``state = [mean, count]`` as a small tensor on the loss's device (created by the first
    call), so no host sync is needed. Each :func:`bco_loss` call replaces it with the updated one:
    ``mean += (batch_mean_reward - mean) / (count + 1)``, ``count += 1`` (each batch counts once,
    as TRL's ``RunningMoments`` does when given the batch mean). The update is eager Python state:
    under ``torch.compile`` keep ``bco_loss`` outside the compiled region or expect a graph break.
    """

    def __init__(self):
        self.state: Optional[Tensor] = None

    @property
    def mean(self) -> Optional[Tensor]:
        return None if self.state is None else self.state[0]

    @property
    def count(self) -> Optional[Tensor]:
        return None if self.state is None else self.state[1]

    def reset(self) -> None:
        self.state = None

    def state_dict(self) -> dict:
        return {"state": self.state}

    def load_state_dict(self, d: dict) -> None:
        self.state = d["state"]


def bco_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    running: BCORunningMean,
    *,
    beta: float = 0.1,
    weights: Optional[Tensor] = None,
    reduction: str = "mean",
):
    """BCO (Jung et al. 2024, arXiv:2404.04656, eq. 9) on unpaired examples.

    Rewards ``beta * (policy - ref)`` are shifted by ``delta``, the running mean of batch-mean
    rewards including this batch (``running``, updated in place, detached): desirable examples
    have loss ``-log sigmoid(reward - delta)``, undesirable ``-log sigmoid(-(reward - delta))``.
    Metrics as :func:`kto_loss`, plus ``delta``.
    """
    p, r, lab, w = _unpaired_inputs(policy_logps, ref_logps, desirable, weights)
    if not isinstance(running, BCORunningMean):
        raise TypeError(f"running: expected a pyalign.losses.BCORunningMean, got {type(running).__name__}")
    acc = acc_dtype(p)
    state = running.state
    if state is None or state.device != p.device:
        state = torch.zeros(2, dtype=acc, device=p.device) if state is None else state.to(p.device)
    loss, metrics, state_out = inp.run("bco", p, None, r, None, None, None, w, lab, None, None, state.detach(),
                                       beta=_checks.positive(beta, "beta"), reduction=inp.reduction(reduction))
    running.state = state_out
    return loss, metrics
