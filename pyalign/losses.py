"""Preference losses: the DPO family and its relatives, one fused kernel per call.

Every function takes per-sequence log-probs (as :func:`pyalign.sequence_logprobs` returns them,
summed over the completion's tokens) of the policy and, where the loss needs one, of a reference
model, and returns ``(loss, metrics)``:

- ``loss``: the reduced loss (``reduction="mean"`` or ``"sum"``, a 0-d tensor) or the per-element
  loss (``"none"``), in fp32 (fp64 for fp64 inputs) whatever the input dtype. Gradients flow to
  every log-prob input and to ``weights``.
- ``metrics``: a read-only mapping of detached 0-d tensors named as TRL logs them
  (``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
  ``logps/chosen``, ``logps/rejected``, plus a few per loss). ``metrics.to_floats()`` gives
  Python floats with one device sync.

The kernel computes the loss, its gradient w.r.t. each input and the metrics in one pass over the
batch; the backward is a single multiply. ``weights`` (optional, per pair or per element) multiply
each element's loss before the reduction; ``"mean"`` divides the weighted sum by the number of
elements (as TRL does with its WPO weights), not by the sum of the weights.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from pyalign import _checks
from pyalign._ext import FLOAT_DTYPES, HAS_CUDA
from pyalign.ops.losses import (CPO_TYPES, DPO_TYPES, F_DIVERGENCES, FAMILIES, KTO_TYPES, N_PARAMS,
                                REDUCTIONS, preference_loss)

__all__ = ["Metrics", "dpo_loss", "kto_loss", "bco_loss", "BCORunningMean", "orpo_loss", "cpo_loss",
           "simpo_loss", "reward_model_loss", "fused_linear_dpo_loss", "DPO_LOSS_TYPES", "F_DIVERGENCES"]

DPO_LOSS_TYPES = DPO_TYPES
# Loss types that are defined through per-response log-ratios against a reference model.
_NEEDS_REF = {"nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down"}
# Loss types that are defined on per-token (length-normalized) scores.
_NEEDS_LENGTHS = {"ipo", "sigmoid_norm"}
# Loss types with a generalization to other f-divergences (built on the chosen - rejected score).
_F_DIV_TYPES = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
# Valid label_smoothing per loss type that uses it: (low, high, low_inclusive, high_inclusive).
_SMOOTHING = {
    "sigmoid": (0.0, 0.5, True, True),
    "robust": (0.0, 0.5, True, False),
    "exo_pair": (0.0, 1.0, False, False),
    "aot": (0.0, 0.5, True, True),
    "aot_unpaired": (0.0, 0.5, True, True),
}


def _smoothing_ok(loss_type: str, eps: float) -> bool:
    """Whether ``eps`` is a valid label_smoothing for ``loss_type`` (one of the keys of _SMOOTHING)."""
    lo, hi, lo_in, hi_in = _SMOOTHING[loss_type]
    return (eps > lo or (lo_in and eps == lo)) and (eps < hi or (hi_in and eps == hi))

_PAIRED_METRICS = {"rewards/chosen": 0, "rewards/rejected": 1, "rewards/margins": 2,
                   "rewards/accuracies": 3, "logps/chosen": 4, "logps/rejected": 5}
_UNPAIRED_METRICS = {"rewards/chosen": 0, "rewards/rejected": 1, "rewards/margins": 2,
                     "logps/chosen": 4, "logps/rejected": 5, "count/chosen": 8, "count/rejected": 9}
_METRICS = {
    "dpo": _PAIRED_METRICS,
    "kto": {**_UNPAIRED_METRICS, "kl": 6},
    "bco": {**_UNPAIRED_METRICS, "delta": 6},
    "orpo": {**_PAIRED_METRICS, "nll_loss": 6, "log_odds_ratio": 7, "log_odds_chosen": 8},
    "cpo": {**_PAIRED_METRICS, "nll_loss": 6},
    "rm": {"rewards/chosen": 0, "rewards/rejected": 1, "rewards/margins": 2, "rewards/accuracies": 3},
}


class Metrics(Mapping):
    """Detached batch metrics, named as TRL logs them; values are 0-d tensors on the loss's device.

    Unpaired losses (KTO, BCO) give NaN for the means of an empty class.
    """

    __slots__ = ("values", "_index")

    def __init__(self, values: Tensor, index: dict):
        self.values = values
        self._index = index

    def __getitem__(self, name: str) -> Tensor:
        return self.values[self._index[name]]

    def __iter__(self):
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def to_floats(self) -> dict:
        """All metrics as Python floats (one device-to-host copy)."""
        v = self.values.tolist()
        return {k: v[i] for k, i in self._index.items()}

    def __repr__(self) -> str:
        return f"Metrics({self.to_floats()})"


# ------------------------------------------------------------------------------------------
# Argument checks

_NUMERIC = FLOAT_DTYPES + (torch.int32, torch.int64, torch.uint8, torch.bool)


def _vec(x, name: str, n: Optional[int], device, *, numeric: bool = False) -> Tensor:
    """A 1-d tensor of n elements on `device`: float (or, with numeric, any int/bool/float)."""
    _checks.tensor(x, name)
    ok = _NUMERIC if numeric else FLOAT_DTYPES
    if x.dtype not in ok:
        raise TypeError(f"{name}: expected a {'real' if numeric else 'floating'} tensor "
                        f"({', '.join(str(d) for d in ok)}), got {x.dtype}")
    if x.device.type == "cuda" and not HAS_CUDA:
        raise RuntimeError(f"{name}: got a CUDA tensor, but this pyalign build has no CUDA kernels "
                           "(built without nvcc or with PYALIGN_CUDA=OFF); reinstall with a CUDA toolkit present")
    if x.dim() != 1:
        raise ValueError(f"{name}: expected a 1-d tensor [batch], got shape {tuple(x.shape)}")
    if n is not None and x.shape[0] != n:
        raise ValueError(f"{name}: expected {n} elements like the policy log-probs, got {x.shape[0]}")
    if device is not None and x.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} like the policy log-probs, got {x.device}")
    return x


def _opt(x, name, n, device, **kw) -> Optional[Tensor]:
    return None if x is None else _vec(x, name, n, device, **kw)


def _policy(x, name: str) -> Tensor:
    _vec(x, name, None, None)
    if x.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one element, got an empty tensor")
    return x


def _reduction(reduction) -> int:
    return REDUCTIONS.index(_checks.choice(reduction, "reduction", REDUCTIONS))


def _number(x, name: str) -> float:
    return _checks.finite(x, name)


def _run(family: str, a, b=None, c=None, d=None, la=None, lb=None, w=None, label=None, kla=None,
         klb=None, state=None, *, types=(0,), type_weights=(1.0,), beta=0.1, label_smoothing=0.0,
         f_alpha=0.5, tau=0.05, gamma=0.5, alpha=0.0, cpo_alpha=0.0, desirable_weight=1.0,
         undesirable_weight=1.0, center=0.0, fdiv=0, reduction=1):
    params = [beta, label_smoothing, f_alpha, tau, gamma, alpha, cpo_alpha, desirable_weight,
              undesirable_weight, center]
    assert len(params) == N_PARAMS
    loss, _, metrics = preference_loss(a, b, c, d, la, lb, w, label, kla, klb, state, FAMILIES[family],
                                       list(types), [float(t) for t in type_weights], params, fdiv,
                                       reduction)
    return loss, Metrics(metrics, _METRICS[family])


# ------------------------------------------------------------------------------------------
# DPO family

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

    Metrics: ``rewards/* = beta * r`` (beta * policy log-prob when reference-free), ``logps/*``
    the policy log-probs, ``rewards/accuracies`` the fraction with chosen reward > rejected.
    """
    pc = _policy(policy_chosen_logps, "policy_chosen_logps")
    n, dev = pc.shape[0], pc.device
    pr = _vec(policy_rejected_logps, "policy_rejected_logps", n, dev)
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("ref_chosen_logps / ref_rejected_logps: give both reference log-probs or neither "
                         "(neither: reference-free)")
    rc = _opt(ref_chosen_logps, "ref_chosen_logps", n, dev)
    rr = _opt(ref_rejected_logps, "ref_rejected_logps", n, dev)
    lc = _opt(chosen_lengths, "chosen_lengths", n, dev, numeric=True)
    lr = _opt(rejected_lengths, "rejected_lengths", n, dev, numeric=True)
    w = _opt(weights, "weights", n, dev)

    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if not types:
        raise ValueError("loss_type: expected a loss type name or a non-empty list of them")
    for t in types:
        if not isinstance(t, str) or t not in DPO_TYPES:
            raise ValueError(f"loss_type: unknown loss type {t!r}; valid types: {', '.join(DPO_TYPES)}")
    if loss_weights is None:
        lw = [1.0] * len(types)
    else:
        lw = [_number(x, "loss_weights") for x in loss_weights]
        if len(lw) != len(types):
            raise ValueError(f"loss_weights: expected {len(types)} weights (one per loss type), got {len(lw)}")
    if rpo_alpha is not None:
        rpo = _number(rpo_alpha, "rpo_alpha")
        if rpo != 0:
            types.append("sft")
            lw.append(rpo)
    if len(types) > 16:
        raise ValueError(f"loss_type: at most 16 loss types, got {len(types)}")
    beta = _checks.positive(beta, "beta")
    eps = _number(label_smoothing, "label_smoothing")
    users = [t for t in types if t in _SMOOTHING]
    if not users and eps != 0:
        raise ValueError(f"label_smoothing: loss type(s) {', '.join(types)} do not use it (only "
                         f"{', '.join(_SMOOTHING)} do); got {eps}")
    for t in users:
        lo, hi, lo_in, hi_in = _SMOOTHING[t]
        if not _smoothing_ok(t, eps):
            rng = f"{'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"
            hint = " (EXO's paper uses 1e-3)" if t == "exo_pair" else ""
            raise ValueError(f"label_smoothing: loss type {t!r} needs a value in {rng}{hint}, got {eps}")
    fd = _checks.choice(f_divergence, "f_divergence", F_DIVERGENCES)
    if fd != "reverse_kl":
        bad = [t for t in types if t not in _F_DIV_TYPES]
        if bad:
            raise ValueError(f"f_divergence: {fd!r} is only defined for loss types "
                             f"{', '.join(sorted(_F_DIV_TYPES))}; got {', '.join(bad)}")
    f_alpha = _number(f_alpha, "f_alpha")
    tau = _checks.positive(discopop_tau, "discopop_tau")
    red = _reduction(reduction)
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
    if red == 0 and any(t in ("aot", "aot_unpaired") for t in types):
        raise ValueError("reduction: 'none' is not defined for aot / aot_unpaired (they couple pairs "
                         "through a sort of the batch); use 'mean' or 'sum'")
    codes = [DPO_TYPES.index(t) for t in types]
    return _run("dpo", pc, pr, rc, rr, lc, lr, w, types=codes, type_weights=lw, beta=beta,
                label_smoothing=eps, f_alpha=f_alpha, tau=tau, fdiv=F_DIVERGENCES.index(fd), reduction=red)


# ------------------------------------------------------------------------------------------
# Unpaired: KTO and BCO

def _unpaired_inputs(policy_logps, ref_logps, desirable, weights):
    p = _policy(policy_logps, "policy_logps")
    n, dev = p.shape[0], p.device
    if ref_logps is None:
        raise ValueError("ref_logps: this loss needs reference log-probs")
    r = _vec(ref_logps, "ref_logps", n, dev)
    lab = _vec(desirable, "desirable", n, dev, numeric=True)
    if lab.is_floating_point():
        raise TypeError(f"desirable: expected a bool (or integer 0/1) tensor, got {lab.dtype}")
    w = _opt(weights, "weights", n, dev)
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
        kla = _policy(policy_kl_logps, "policy_kl_logps")
        if kla.device != dev:
            raise ValueError(f"policy_kl_logps: expected a tensor on {dev} like the policy log-probs, got {kla.device}")
        klb = _vec(ref_kl_logps, "ref_kl_logps", kla.shape[0], dev)
        kla, klb = kla.detach(), klb.detach()
    return _run("kto", p, None, r, None, None, None, w, lab, kla, klb, types=[KTO_TYPES.index(lt)],
                beta=_checks.positive(beta, "beta"),
                desirable_weight=_number(desirable_weight, "desirable_weight"),
                undesirable_weight=_number(undesirable_weight, "undesirable_weight"),
                reduction=_reduction(reduction))


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
    acc = torch.float64 if p.dtype == torch.float64 else torch.float32
    state = running.state
    if state is None or state.device != p.device:
        state = torch.zeros(2, dtype=acc, device=p.device) if state is None else state.to(p.device)
    loss, metrics = _run("bco", p, None, r, None, None, None, w, lab, None, None, state.detach(),
                         beta=_checks.positive(beta, "beta"), reduction=_reduction(reduction))
    running.state = metrics.values[6:8].clone()
    return loss, metrics


# ------------------------------------------------------------------------------------------
# Reference-free paired losses: ORPO, CPO / SimPO / AlphaPO

def _lengths(lc, lr, n, dev, who: str):
    if lc is None or lr is None:
        raise ValueError(f"chosen_lengths / rejected_lengths: {who} is length-normalized and needs both "
                         "completion lengths (pass ones if your log-probs are already per-token means)")
    return (_vec(lc, "chosen_lengths", n, dev, numeric=True), _vec(lr, "rejected_lengths", n, dev, numeric=True))


def orpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    *,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float = 0.1,
    weights: Optional[Tensor] = None,
    reduction: str = "mean",
):
    """ORPO (Hong et al. 2024, arXiv:2403.07691, eqs. 6-7): NLL plus a log odds-ratio penalty.

    On per-token mean log-probs ``m = logps / lengths``: ``log_odds = (m_c - m_r) - (log(1 - e^m_c) -
    log(1 - e^m_r))`` with ``log(1 - e^m)`` evaluated by log1mexp (finite for m near 0; m is
    clamped at -1e-6, where p = 1 would make the odds infinite) and the per-pair loss
    ``-m_c - beta * log sigmoid(log_odds)`` (``beta`` is the paper's lambda, as in TRL). The NLL is
    per sequence; TRL pools the chosen tokens of the batch (equal when lengths are equal).

    Metrics: ``rewards/* = beta * m``, ``nll_loss``, ``log_odds_ratio`` (mean log sigmoid(log_odds)),
    ``log_odds_chosen`` (mean log_odds).
    """
    pc = _policy(policy_chosen_logps, "policy_chosen_logps")
    n, dev = pc.shape[0], pc.device
    pr = _vec(policy_rejected_logps, "policy_rejected_logps", n, dev)
    lc, lr = _lengths(chosen_lengths, rejected_lengths, n, dev, "orpo_loss")
    w = _opt(weights, "weights", n, dev)
    return _run("orpo", pc, pr, None, None, lc, lr, w, beta=_checks.positive(beta, "beta"),
                reduction=_reduction(reduction))


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
):
    """CPO (Xu et al. 2024, arXiv:2401.08417), SimPO (Meng et al. 2024, arXiv:2405.14734) and
    AlphaPO (Gupta et al. 2025, arXiv:2501.03884): reference-free, as TRL's ``CPOTrainer``.

    Scores are the policy log-probs: summed for ``sigmoid``/``hinge``, per token (``logps /
    lengths``, lengths required) for ``ipo``/``simpo``. With ``alpha != 0`` each score l becomes
    AlphaPO's reward ``(1 - exp(-alpha l)) / alpha`` (exponent capped at 40). With ``x = r_c - r_r``
    (minus ``gamma / beta`` for ``simpo``) the preference term is the smoothed logistic loss
    ``-(1-e) log sigmoid(beta x) - e log sigmoid(-beta x)`` (sigmoid, simpo), ``relu(1 - beta x)``
    (hinge) or ``(x - 1/(2 beta))^2`` (ipo); ``cpo_alpha`` adds the chosen NLL (per token when
    ``chosen_lengths`` is given, else per sequence).

    Metrics: ``rewards/* = beta * r``, ``nll_loss``.
    """
    pc = _policy(policy_chosen_logps, "policy_chosen_logps")
    n, dev = pc.shape[0], pc.device
    pr = _vec(policy_rejected_logps, "policy_rejected_logps", n, dev)
    lt = _checks.choice(loss_type, "loss_type", CPO_TYPES)
    if lt in ("ipo", "simpo"):
        lc, lr = _lengths(chosen_lengths, rejected_lengths, n, dev, f"loss_type {lt!r}")
    else:
        lc = _opt(chosen_lengths, "chosen_lengths", n, dev, numeric=True)
        lr = _opt(rejected_lengths, "rejected_lengths", n, dev, numeric=True)
    eps = _number(label_smoothing, "label_smoothing")
    if lt in ("sigmoid", "simpo"):
        if not 0 <= eps <= 0.5:
            raise ValueError(f"label_smoothing: loss type {lt!r} needs a value in [0, 0.5], got {eps}")
    elif eps != 0:
        raise ValueError(f"label_smoothing: loss type {lt!r} does not use it (only sigmoid and simpo do); got {eps}")
    w = _opt(weights, "weights", n, dev)
    return _run("cpo", pc, pr, None, None, lc, lr, w, types=[CPO_TYPES.index(lt)],
                beta=_checks.positive(beta, "beta"), label_smoothing=eps, gamma=_number(gamma, "gamma"),
                alpha=_number(alpha, "alpha"), cpo_alpha=_number(cpo_alpha, "cpo_alpha"),
                reduction=_reduction(reduction))


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
):
    """SimPO (Meng et al. 2024, arXiv:2405.14734, eq. 6): ``-log sigmoid(beta (m_c - m_r) - gamma)``
    on per-token mean log-probs; ``alpha != 0`` gives AlphaPO, ``cpo_alpha > 0`` CPO-SimPO.
    See :func:`cpo_loss`.
    """
    return cpo_loss(policy_chosen_logps, policy_rejected_logps, loss_type="simpo", beta=beta,
                    label_smoothing=label_smoothing, gamma=gamma, alpha=alpha, cpo_alpha=cpo_alpha,
                    chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, weights=weights,
                    reduction=reduction)


# ------------------------------------------------------------------------------------------
# Reward model

def reward_model_loss(
    rewards_chosen: Tensor,
    rewards_rejected: Tensor,
    *,
    margin: Union[Tensor, float, None] = None,
    center_rewards_coefficient: Optional[float] = None,
    weights: Optional[Tensor] = None,
    reduction: str = "mean",
):
    """Bradley-Terry reward-model loss (Ouyang et al. 2022, arXiv:2203.02155, eq. 1).

    Per pair ``-log sigmoid(r_c - r_r - margin)`` (margin per Touvron et al. 2023,
    arXiv:2307.09288, eq. 2) plus ``center_rewards_coefficient * (r_c + r_r)^2`` (reward centering,
    Eisenstein et al. 2023, arXiv:2312.09244), as TRL's ``RewardTrainer``. ``rewards_*`` are the
    model's scalar rewards [batch]; ``margin`` a tensor [batch] or a number.
    Metrics: ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``.
    """
    a = _policy(rewards_chosen, "rewards_chosen")
    n, dev = a.shape[0], a.device
    b = _vec(rewards_rejected, "rewards_rejected", n, dev)
    if margin is not None and not isinstance(margin, Tensor):
        margin = torch.full((n,), _number(margin, "margin"), dtype=a.dtype, device=dev)
    m = _opt(margin, "margin", n, dev)
    center = 0.0 if center_rewards_coefficient is None else _number(center_rewards_coefficient,
                                                                    "center_rewards_coefficient")
    w = _opt(weights, "weights", n, dev)
    return _run("rm", a, b, m, None, None, None, w, center=center, reduction=_reduction(reduction))


def fused_linear_dpo_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Optional[Tensor] = None,
    ref_logps=None,
    ref_hidden: Optional[Tensor] = None,
    ref_weight: Optional[Tensor] = None,
    ref_bias: Optional[Tensor] = None,
    shift: bool = True,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    chunk_size: Optional[int] = None,
    **dpo_kwargs,
):
    """:func:`dpo_loss` on policy log-probs computed by the fused linear head, in one call.

    ``hidden`` ``[2B, T, H]`` and ``labels`` ``[2B, T]`` hold the chosen responses in the first ``B``
    rows and the rejected ones in the last ``B`` (TRL's layout); ``weight`` ``[V, H]`` is the LM head.
    The sequence log-probs come from :func:`pyalign.logprob.linear_sequence_logprobs`, so the
    ``[2B, T, V]`` logits are never held and gradients flow to ``hidden``, ``weight`` and ``bias``.

    The reference is either given as ``ref_logps`` (a ``[2B]`` tensor in the same layout, or a pair
    ``(ref_chosen, ref_rejected)`` of ``[B]`` tensors; detached in both forms), or computed without
    gradient from ``ref_hidden`` (with ``ref_weight``/``ref_bias``, defaulting to the policy head);
    with neither, the loss is reference-free. Completion lengths (the non-ignored label counts) are passed to length-normalized
    losses unless given. Other keyword arguments go to :func:`dpo_loss`; returns ``(loss, metrics)``.
    """
    from pyalign.logprob import linear_sequence_logprobs

    if not isinstance(hidden, Tensor) or hidden.dim() < 2 or hidden.shape[0] % 2:
        raise ValueError("hidden: expected [2B, T, H] with the B chosen rows first and the B rejected rows "
                         f"last, got {tuple(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__}")
    head = dict(ignore_index=ignore_index, temperature=temperature, logit_scale=logit_scale, softcap=softcap,
                shift=shift, chunk_size=chunk_size)
    logps, counts = linear_sequence_logprobs(hidden, weight, labels, bias=bias, **head)
    chosen, rejected = logps.chunk(2)
    lengths_c, lengths_r = counts.chunk(2)
    if ref_logps is not None and ref_hidden is not None:
        raise ValueError("ref_logps / ref_hidden: give the reference log-probs or the reference hidden states, not both")
    if ref_hidden is None and (ref_weight is not None or ref_bias is not None):
        raise ValueError("ref_weight / ref_bias: only used with ref_hidden (the reference model's hidden states)")
    ref_c = ref_r = None
    if ref_hidden is not None:
        if not isinstance(ref_hidden, Tensor) or ref_hidden.shape[:-1] != hidden.shape[:-1]:
            got = tuple(ref_hidden.shape) if isinstance(ref_hidden, Tensor) else type(ref_hidden).__name__
            raise ValueError(f"ref_hidden: expected [2B, T, H_ref] with [2B, T] = {tuple(hidden.shape[:-1])} "
                             f"like hidden, got {got}")
        with torch.no_grad():
            ref, _ = linear_sequence_logprobs(ref_hidden, weight if ref_weight is None else ref_weight, labels,
                                              bias=bias if ref_weight is None and ref_bias is None else ref_bias,
                                              **head)
        ref_c, ref_r = ref.chunk(2)
    elif ref_logps is not None:
        if isinstance(ref_logps, (tuple, list)):
            if len(ref_logps) != 2:
                raise ValueError("ref_logps: expected a [2B] tensor or a pair (ref_chosen, ref_rejected)")
            for k, x in enumerate(ref_logps):
                if not isinstance(x, Tensor) or x.shape != chosen.shape:
                    got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                    raise ValueError(f"ref_logps[{k}]: expected a tensor of shape {tuple(chosen.shape)} "
                                     f"(one per pair), got {got}")
            # Reference log-probs are constants of the loss, in either form.
            ref_c, ref_r = (x.detach() for x in ref_logps)
        else:
            if not isinstance(ref_logps, Tensor) or ref_logps.shape != logps.shape:
                raise ValueError(f"ref_logps: expected a tensor of shape {tuple(logps.shape)} (chosen rows first)")
            ref_c, ref_r = ref_logps.detach().chunk(2)
    dpo_kwargs.setdefault("chosen_lengths", lengths_c)
    dpo_kwargs.setdefault("rejected_lengths", lengths_r)
    return dpo_loss(chosen, rejected, ref_c, ref_r, **dpo_kwargs)
