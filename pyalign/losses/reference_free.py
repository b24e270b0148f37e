"""Reference-free paired losses: ORPO, and CPO / SimPO / AlphaPO as TRL's ``CPOTrainer``."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from pyalign import _checks
from pyalign.losses import _inputs as inp
from pyalign.ops.losses import CPO_TYPES

__all__ = ["orpo_loss", "cpo_loss", "simpo_loss"]


def _lengths(lc, lr, n, dev, who: str):
    if lc is None or lr is None:
        raise ValueError(f"chosen_lengths / rejected_lengths: {who} is length-normalized and needs both "
                         "completion lengths (pass ones if your log-probs are already per-token means)")
    return (inp.vec(lc, "chosen_lengths", n, dev, numeric=True), inp.vec(lr, "rejected_lengths", n, dev, numeric=True))


def orpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    *,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float = 0.1,
    weights: Optional[Tensor] = None,
    reduction: str = "mean",
    dro_temperature: float = 1.0,
):
    """ORPO (Hong et al. 2024, arXiv:2403.07691, eqs. 6-7): NLL plus a log odds-ratio penalty.

    On per-token mean log-probs ``m = logps / lengths``: ``log_odds = (m_c - m_r) - (log(1 - e^m_c) -
    log(1 - e^m_r))`` with ``log(1 - e^m)`` evaluated by log1mexp (finite for m near 0; m is
    clamped at -1e-6, where p = 1 would make the odds infinite) and the per-pair loss
    ``-m_c - beta * log sigmoid(log_odds)`` (``beta`` is the paper's lambda, as in TRL). The NLL is
    per sequence; TRL pools the chosen tokens of the batch (equal when lengths are equal).

    ``reduction="dro"`` (with ``dro_temperature``) is the KL-DRO reduction of :func:`pyalign.losses.dpo_loss`.
    Metrics: ``rewards/* = beta * m``, ``nll_loss``, ``log_odds_ratio`` (mean log sigmoid(log_odds)),
    ``log_odds_chosen`` (mean log_odds).
    """
    pc = inp.policy(policy_chosen_logps, "policy_chosen_logps")
    n, dev = pc.shape[0], pc.device
    pr = inp.vec(policy_rejected_logps, "policy_rejected_logps", n, dev)
    lc, lr = _lengths(chosen_lengths, rejected_lengths, n, dev, "orpo_loss")
    w = inp.opt(weights, "weights", n, dev)
    red, dro_tau = inp.pair_reduction(reduction, dro_temperature)
    loss, metrics, _ = inp.run("orpo", pc, pr, None, None, lc, lr, w, beta=_checks.positive(beta, "beta"),
                               reduction=red, dro_temperature=dro_tau)
    return loss, metrics


def cpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
    alpha: float = 0.0,
    cpo_alpha: float = 1.0,
    chosen_lengths: Optional[Tensor] = None,
    rejected_lengths: Optional[Tensor] = None,
    weights: Optional[Tensor] = None,
    reduction: str = "mean",
    dro_temperature: float = 1.0,
):
    """CPO (Xu et al. 2024, arXiv:2401.08417), SimPO (Meng et al. 2024, arXiv:2405.14734) and
    AlphaPO (Gupta et al. 2025, arXiv:2501.03884): reference-free, as TRL's ``CPOTrainer``.

    Scores are the policy log-probs: summed for ``sigmoid``/``hinge``, per token (``logps /
    lengths``, lengths required) for ``ipo``/``simpo``. With ``alpha != 0`` each score l becomes
    AlphaPO's reward ``(1 - exp(-alpha l)) / alpha`` (exponent capped at 40). With ``x = r_c - r_r``
    (minus ``gamma / beta`` for ``simpo``) the preference term is the smoothed logistic loss
    ``-(1-e) log sigmoid(beta x) - e log sigmoid(-beta x)`` (sigmoid, simpo), ``relu(1 - beta x)``
    (hinge) or ``(x - 1/(2 beta))^2`` (ipo); ``cpo_alpha`` adds the chosen NLL (per token when
    ``chosen_lengths`` is given, else per sequence). ``reduction="dro"`` (with ``dro_temperature``)
    is the KL-DRO reduction of :func:`pyalign.losses.dpo_loss`.

    Metrics: ``rewards/* = beta * r``, ``nll_loss``.
    """
    pc = inp.policy(policy_chosen_logps, "policy_chosen_logps")
    n, dev = pc.shape[0], pc.device
    pr = inp.vec(policy_rejected_logps, "policy_rejected_logps", n, dev)
    lt = _checks.choice(loss_type, "loss_type", CPO_TYPES)
    if lt in ("ipo", "simpo"):
        lc, lr = _lengths(chosen_lengths, rejected_lengths, n, dev, f"loss_type {lt!r}")
    else:
        lc = inp.opt(chosen_lengths, "chosen_lengths", n, dev, numeric=True)
        lr = inp.opt(rejected_lengths, "rejected_lengths", n, dev, numeric=True)
    eps = inp.number(label_smoothing, "label_smoothing")
    if lt in ("sigmoid", "simpo"):
        if not 0 <= eps <= 0.5:
            raise ValueError(f"label_smoothing: loss type {lt!r} needs a value in [0, 0.5], got {eps}")
    elif eps != 0:
        raise ValueError(f"label_smoothing: loss type {lt!r} does not use it (only sigmoid and simpo do); got {eps}")
    w = inp.opt(weights, "weights", n, dev)
    red, dro_tau = inp.pair_reduction(reduction, dro_temperature)
    loss, metrics, _ = inp.run("cpo", pc, pr, None, None, lc, lr, w, types=[CPO_TYPES.index(lt)],
                beta=_checks.positive(beta, "beta"), label_smoothing=eps, gamma=inp.number(gamma, "gamma"),
                alpha=inp.number(alpha, "alpha"), cpo_alpha=inp.number(cpo_alpha, "cpo_alpha"),
                reduction=red, dro_temperature=dro_tau)
    return loss, metrics


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    *,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
    alpha: float = 0.0,
    label_smoothing: float = 0.0,
    cpo_alpha: float = 0.0,
    weights: Optional[Tensor] = None,
    reduction: str = "mean",
    dro_temperature: float = 1.0,
):
    """SimPO (Meng et al. 2024, arXiv:2405.14734, eq. 6): ``-log sigmoid(beta (m_c - m_r) - gamma)``
    on per-token mean log-probs; ``alpha != 0`` gives AlphaPO, ``cpo_alpha > 0`` CPO-SimPO.
    See :func:`cpo_loss`.
    """
    return cpo_loss(policy_chosen_logps, policy_rejected_logps, loss_type="simpo", beta=beta,
                    label_smoothing=label_smoothing, gamma=gamma, alpha=alpha, cpo_alpha=cpo_alpha,
                    chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, weights=weights,
                    reduction=reduction, dro_temperature=dro_temperature)
