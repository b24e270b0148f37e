"""Policy-gradient losses straight from the policy's hidden states and LM head: a composite of the
fused linear head (:mod:`pyalign.logprob.linear`) and the policy-loss kernel; the ``[B, T, V]`` logits
never exist."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from pyalign.logprob.linear import linear_token_logprobs
from pyalign.rl.policy import policy_loss

__all__ = ["fused_linear_policy_loss"]


def fused_linear_policy_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Optional[Tensor] = None,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    chunk_size: Optional[int] = None,
    **policy_loss_options,
):
    """:func:`pyalign.rl.policy_loss` on the completion tokens' log-probs (and, when the options need
    it, entropy) computed by the fused linear head from ``hidden`` ``[B, T, H]`` (the hidden states
    that predict ``labels`` ``[B, T]``, already aligned: no shift), ``weight`` ``[V, H]`` and ``bias``;
    gradients reach ``hidden``, ``weight`` and ``bias``. ``temperature``, ``logit_scale`` and
    ``softcap`` transform the logits as in :func:`pyalign.logprob.linear_token_logprobs` (TRL divides
    the logits by its sampling temperature). Returns ``(loss, metrics)``.

    Positions where ``mask`` is 0 are passed to the head as ignored (no GEMM work). The head makes 1
    GEMM per token chunk in the forward and 3 in the backward (it recomputes each chunk's logits);
    its memory beyond the returned gradients is one ``[chunk, V]`` logits block and ``O(B T H)``.
    """
    needs_entropy = (policy_loss_options.get("entropy_coef", 0.0) != 0
                     or policy_loss_options.get("top_entropy_quantile", 1.0) < 1)
    if "entropy" in policy_loss_options:
        raise TypeError("entropy: computed here by the fused head; do not pass it")
    head_labels = labels if mask is None else labels.masked_fill(mask == 0, -100)
    out = linear_token_logprobs(hidden, weight, head_labels, bias=bias, temperature=temperature,
                                logit_scale=logit_scale, softcap=softcap, chunk_size=chunk_size,
                                return_entropy=needs_entropy)
    logps, entropy = out if needs_entropy else (out, None)
    return policy_loss(logps, old_logps, advantages, mask, entropy=entropy, **policy_loss_options)
