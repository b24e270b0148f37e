"""The per-token outputs of the log-prob family (logits, fused linear head, vocab-parallel): which
statistics a call computes, and how its flat results are handed back."""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

from torch import Tensor

from pyalign import _checks

# Bits of the optional statistics (op arguments): each is computed in the same pass only when asked.
ENTROPY, LOG_SUM_SQ, MEAN_LOGIT, TOP1 = 1, 2, 4, 8
# Output names of ``outputs=``; the log-sum-exp is always computed (no bit).
OUTPUT_FLAGS = {"entropy": ENTROPY, "log_sum_sq_probs": LOG_SUM_SQ, "mean_logit": MEAN_LOGIT, "is_top1": TOP1,
                "lse": 0}


class TokenStats(NamedTuple):
    """Per-token results; a field is None when it was not asked for (``lse`` is always filled)."""

    logprobs: Tensor
    entropy: Optional[Tensor] = None
    log_sum_sq_probs: Optional[Tensor] = None
    mean_logit: Optional[Tensor] = None
    is_top1: Optional[Tensor] = None
    lse: Optional[Tensor] = None


def requested(outputs: Optional[Sequence[str]], return_entropy: bool) -> tuple[int, set]:
    """``(flags, names)`` of the statistics asked for by ``outputs`` and ``return_entropy``."""
    wanted = set(outputs or ())
    for name in wanted:
        _checks.choice(name, "outputs", tuple(OUTPUT_FLAGS))
    if return_entropy:
        wanted.add("entropy")
    return sum(OUTPUT_FLAGS[n] for n in wanted), wanted


def package(results, out_shape, wanted, outputs, return_entropy):
    """Shapes flat per-token results as the public functions return them; ``results`` is
    ``(logp, entropy, log_sum_sq, mean_logit, top1, lse)``: the log-probs; ``(log-probs, entropy)``
    with ``return_entropy``; a :class:`TokenStats` when ``outputs`` is given."""
    logp, ent, lss, mean, top1, lse = results
    shaped = lambda t, name: t.view(out_shape) if (name in wanted and t is not None) else None
    if outputs is not None:
        return TokenStats(logp.view(out_shape), shaped(ent, "entropy"), shaped(lss, "log_sum_sq_probs"),
                          shaped(mean, "mean_logit"), shaped(top1, "is_top1"), lse.view(out_shape))
    if return_entropy:
        return logp.view(out_shape), ent.view(out_shape)
    return logp.view(out_shape)
