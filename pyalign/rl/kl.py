"""Per-token KL estimators between the policy and a reference model (for KL-in-reward or a KL loss)."""
from __future__ import annotations

from torch import Tensor

from pyalign import _checks
from pyalign.ops.rl import K3_CLAMP, KL_ESTIMATORS, LOG_RATIO_CLAMP

__all__ = ["kl_penalty"]


def kl_penalty(logps: Tensor, ref_logps: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimates of KL(pi || pi_ref) from the sampled tokens' log-probs (Schulman 2020,
    "Approximating KL divergence"), with gradients w.r.t. ``logps``; ``d = logps - ref_logps``:

    - ``k1``: ``d`` (unbiased value, high variance); ``abs``: ``|d|``; ``k2``: ``d^2 / 2``;
    - ``k3``: ``exp(-d) + d - 1`` (unbiased, low variance, >= 0), with verl's clamps (``-d`` to
      [-20, 20], the value to [-10, 10]: finite for any input; TRL's unclamped form agrees inside);
    - ``k1+``, ``k3+``: the value of ``k1`` / ``k3`` with the gradient of ``k2`` (verl's straight-through
      forms: ``k2``'s gradient is the unbiased gradient of the KL).

    Elementwise; any shape, fp32/bf16/fp16 (or fp64), the result in the inputs' dtype.
    """
    _checks.float_tensor(logps, "logps")
    _checks.float_tensor(ref_logps, "ref_logps")
    _checks.same_device(("logps", logps), ("ref_logps", ref_logps))
    if logps.shape != ref_logps.shape:
        raise ValueError(f"ref_logps: expected the shape of logps {list(logps.shape)}, got {list(ref_logps.shape)}")
    est = _checks.choice(estimator, "estimator", KL_ESTIMATORS)
    base = est.rstrip("+")
    d = logps - ref_logps
    if base == "k1":
        value = d
    elif base == "abs":
        value = d.abs()
    elif base == "k2":
        value = 0.5 * d * d
    else:
        kl = (-d).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        value = (kl.exp() - kl - 1).clamp(-K3_CLAMP, K3_CLAMP)
    if est.endswith("+"):
        k2 = 0.5 * d * d
        value = k2 - k2.detach() + value.detach()
    return value
