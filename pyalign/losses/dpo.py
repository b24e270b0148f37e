"""DPO (Rafailov et al. 2023) and its variants, as TRL's ``DPOTrainer`` defines them: one fused
kernel call per batch (loss, gradients, metrics)."""
from __future__ import annotations

from typing import Optional, Sequence, Union

from torch import Tensor

from pyalign import _checks
from pyalign.losses import _inputs as inp
from pyalign.ops.losses import DPO_TYPES, F_DIVERGENCES, MAX_LOSS_TYPES

__all__ = ["dpo_loss", "DPO_LOSS_TYPES", "SMOOTHED_TYPES", "label_smoothing_valid"]

DPO_LOSS_TYPES = DPO_TYPES
# Loss types that are defined through per-response log-ratios against a reference model.
_NEEDS_REF = {"nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down"}
# Loss types that are defined on per-token (length-normalized) scores.
_NEEDS_LENGTHS = {"ipo", "sigmoid_norm"}
# Loss types with a generalization to other f-divergences (built on the chosen - rejected score).
_F_DIV_TYPES = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
# Valid label_smoothing per loss type that uses it: (low, high, low_inclusive, high_inclusive).
SMOOTHED_TYPES = {
    "sigmoid": (0.0, 0.5, True, True),
    "robust": (0.0, 0.5, True, False),
    "exo_pair": (0.0, 1.0, False, False),
    "aot": (0.0, 0.5, True, True),
    "aot_unpaired": (0.0, 0.5, True, True),
}


def label_smoothing_valid(loss_type: str, eps: float) -> bool:
    """Whether ``eps`` is a valid label_smoothing for ``loss_type`` (one of ``SMOOTHED_TYPES``)."""
    lo, hi, lo_in, hi_in = SMOOTHED_TYPES[loss_type]
    return (eps > lo or (lo_in and eps == lo)) and (eps < hi or (hi_in and eps == hi))


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Optional[Tensor] = None,
    ref_rejected_logps: Optional[Tensor] = None,
    *,
    loss_type: Union[str, Sequence[str]] = "sigmoid",
    loss_weights: Optional[Sequence[float]] = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
    chosen_lengths: Optional[Tensor] = None,
    rejected_lengths: Optional[Tensor] = None,
    weights: Optional[Tensor] = None,
    reduction: str = "mean",
    discopop_tau: float = 0.05,
    rpo_alpha: Optional[float] = None,
    dro_temperature: float = 1.0,
):
    """DPO (Rafailov et al. 2023, arXiv:2305.18290) and its variants, as TRL's ``DPOTrainer`` defines them.

    With log-ratios ``r_c = pi_c - ref_c`` and ``r_r = pi_r - ref_r`` (the policy log-probs when no
    reference is given: reference-free), f-divergence scores ``s = f'(exp(r))`` (Wang et al. 2023,
    arXiv:2309.16240; TRL's generators, all with f'(1) = 0: ``reverse_kl`` s = r, ``forward_kl``
    1 - exp(-r), ``js_divergence`` log 2 + log sigmoid(r), ``alpha_divergence``
    (exp((f_alpha - 1) r) - 1) / (f_alpha - 1); exponents capped at 40, so that even the squared
    losses stay finite in fp32, with zero gradient beyond) and ``delta = s_c - s_r``, the per-pair
    losses are (the constants of f' cancel in delta but not in the length-normalized
    ``s_c / L_c - s_r / L_r`` of ``ipo`` and ``sigmoid_norm``):

    - ``sigmoid``: -(1-e) log sigmoid(beta delta) - e log sigmoid(-beta delta); cDPO with e > 0.
    - ``sigmoid_norm``: -log sigmoid(beta (s_c / L_c - s_r / L_r)) (needs lengths).
    - ``hinge``: relu(1 - beta delta) (SLiC, Zhao et al. 2023, arXiv:2305.10425).
    - ``ipo``: (s_c / L_c - s_r / L_r - 1 / (2 beta))^2 (Azar et al. 2023, arXiv:2310.12036, eq. 17,
      normalized per token as its authors use it; needs lengths).
    - ``exo_pair``: EXO (Ji et al. 2024, arXiv:2402.00856, eq. 16) with smoothing e in (0, 1).
    - ``nca_pair``: -log sigmoid(beta s_c) - log sigmoid(-beta s_c)/2 - log sigmoid(-beta s_r)/2
      (Chen et al. 2024, arXiv:2402.05369).
    - ``robust``: ((1-e) softplus(-beta delta) - e softplus(beta delta)) / (1 - 2e), e in [0, 0.5)
      (Chowdhury et al. 2024, arXiv:2403.00409).
    - ``bco_pair``: -log sigmoid(beta s_c) - log sigmoid(-beta s_r) (Jung et al. 2024,
      arXiv:2404.04656).
    - ``sppo_hard``: (s_c - 1/(2 beta))^2 + (s_r + 1/(2 beta))^2 (Wu et al. 2024, arXiv:2405.00675).
    - ``aot``: the cDPO loss on sort(pi_c - pi_r)_k - sort(ref_c - ref_r)_k; ``aot_unpaired``: on
      sort(r_c)_k - sort(r_r)_k (Melnyk et al. 2024, arXiv:2406.05882). The term of rank k belongs
      (for ``reduction="none"``, which these refuse, and for ``weights``) to the pair whose first
      sequence has rank k. Gradient through the sort: the permutation is held fixed (ties broken
      by index), so the k-th term's gradient goes to the two inputs of rank k - the subgradient
      torch.sort's backward gives.
    - ``apo_zero``: 1 - sigmoid(beta r_c) + sigmoid(beta r_r); ``apo_down``: sigmoid(beta r_c) +
      1 - sigmoid(beta delta) (D'Oosterlinck et al. 2024, arXiv:2408.06266, eqs. 7-8).
    - ``discopop``: (1-m) softplus(-x) + m exp(-x), x = beta delta, m = sigmoid(x / discopop_tau)
      (Lu et al. 2024, arXiv:2406.08414, eq. 5).
    - ``sft``: -pi_c / L_c, the chosen response's NLL per token (per sequence without lengths).
      TRL pools the chosen tokens of the whole batch instead; the two agree when lengths are equal.

    ``label_smoothing`` e applies to every type that has one; unlike TRL, whose ``sigmoid``
    ignores it, pyalign's ``sigmoid`` with e > 0 is cDPO (:func:`pyalign.integrations.trl.patch_trainer`
    reproduces TRL's behaviour).

    Args:
        loss_type: one name or a list (e.g. MPO: ``["sigmoid", "bco_pair", "sft"]``), summed with
            ``loss_weights`` (default all 1).
        rpo_alpha: RPO (Pang et al. 2024, arXiv:2404.19733): adds ``rpo_alpha`` times the ``sft``
            term.
        chosen_lengths / rejected_lengths: completion token counts (any numeric dtype, clamped at
            1), needed by ``ipo`` and ``sigmoid_norm``; ``sft`` uses ``chosen_lengths`` if given.
        weights: per-pair weights applied before the reduction (e.g. from ensemble uncertainty).
        reduction: ``"mean"``, ``"sum"``, ``"none"`` (per pair), or ``"dro"``: the KL-DRO reduction of
            Dr. DPO (Wu et al. 2024, arXiv:2407.07880), ``-tau log(mean_i exp(-w_i l_i / tau))`` with
            ``tau = dro_temperature`` (> 0; the mean as tau -> inf), which down-weights high-loss
            (likely mislabeled) pairs: the gradient of pair i is scaled by ``softmax(-w l / tau)_i``.
            ``aot`` / ``aot_unpaired`` refuse ``"none"`` and ``"dro"``.

    Metrics: ``rewards/* = beta * r`` (beta * policy log-prob when reference-free), ``logps/*``
    the policy log-probs, ``rewards/accuracies`` the fraction with chosen reward > rejected.
    """
    pc = inp.policy(policy_chosen_logps, "policy_chosen_logps")
    n, dev = pc.shape[0], pc.device
    pr = inp.vec(policy_rejected_logps, "policy_rejected_logps", n, dev)
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("ref_chosen_logps / ref_rejected_logps: give both reference log-probs or neither "
                         "(neither: reference-free)")
    rc = inp.opt(ref_chosen_logps, "ref_chosen_logps", n, dev)
    rr = inp.opt(ref_rejected_logps, "ref_rejected_logps", n, dev)
    lc = inp.opt(chosen_lengths, "chosen_lengths", n, dev, numeric=True)
    lr = inp.opt(rejected_lengths, "rejected_lengths", n, dev, numeric=True)
    w = inp.opt(weights, "weights", n, dev)

    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if not types:
        raise ValueError("loss_type: expected a loss type name or a non-empty list of them")
    for t in types:
        if not isinstance(t, str) or t not in DPO_TYPES:
            raise ValueError(f"loss_type: unknown loss type {t!r}; valid types: {', '.join(DPO_TYPES)}")
    if loss_weights is None:
        lw = [1.0] * len(types)
    else:
        lw = [inp.number(x, "loss_weights") for x in loss_weights]
        if len(lw) != len(types):
            raise ValueError(f"loss_weights: expected {len(types)} weights (one per loss type), got {len(lw)}")
    if rpo_alpha is not None:
        rpo = inp.number(rpo_alpha, "rpo_alpha")
        if rpo != 0:
            types.append("sft")
            lw.append(rpo)
    if len(types) > MAX_LOSS_TYPES:
        raise ValueError(f"loss_type: at most {MAX_LOSS_TYPES} loss types, got {len(types)}")
    beta = _checks.positive(beta, "beta")
    eps = inp.number(label_smoothing, "label_smoothing")
    users = [t for t in types if t in SMOOTHED_TYPES]
    if not users and eps != 0:
        raise ValueError(f"label_smoothing: loss type(s) {', '.join(types)} do not use it (only "
                         f"{', '.join(SMOOTHED_TYPES)} do); got {eps}")
    for t in users:
        lo, hi, lo_in, hi_in = SMOOTHED_TYPES[t]
        if not label_smoothing_valid(t, eps):
            rng = f"{'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"
            hint = " (EXO's paper uses 1e-3)" if t == "exo_pair" else ""
            raise ValueError(f"label_smoothing: loss type {t!r} needs a value in {rng}{hint}, got {eps}")
    fd = _checks.choice(f_divergence, "f_divergence", F_DIVERGENCES)
    if fd != "reverse_kl":
        bad = [t for t in types if t not in _F_DIV_TYPES]
        if bad:
            raise ValueError(f"f_divergence: {fd!r} is only defined for loss types "
                             f"{', '.join(sorted(_F_DIV_TYPES))}; got {', '.join(bad)}")
    f_alpha = inp.number(f_alpha, "f_alpha")
    tau = _checks.positive(discopop_tau, "discopop_tau")
    red, dro_tau = inp.pair_reduction(reduction, dro_temperature)
    if rc is None:
        need = [t for t in types if t in _NEEDS_REF]
        if need:
            raise ValueError(f"ref_chosen_logps / ref_rejected_logps: loss type(s) {', '.join(need)} need "
                             "reference log-probs")
    if lc is None or lr is None:
        need = [t for t in types if t in _NEEDS_LENGTHS]
        if need:
            raise ValueError(f"chosen_lengths / rejected_lengths: loss type(s) {', '.join(need)} are "
                             "length-normalized and need both completion lengths")
    if red in ("none", "dro") and any(t in ("aot", "aot_unpaired") for t in types):
        raise ValueError(f"reduction: {red!r} is not defined for aot / aot_unpaired (they couple pairs "
                         "through a sort of the batch, so they have no per-pair losses); use 'mean' or 'sum'")
    codes = [DPO_TYPES.index(t) for t in types]
    loss, metrics, _ = inp.run("dpo", pc, pr, rc, rr, lc, lr, w, types=codes, type_weights=lw, beta=beta,
                               label_smoothing=eps, f_alpha=f_alpha, tau=tau, fdiv=fd, reduction=red,
                               dro_temperature=dro_tau)
    return loss, metrics
