"""Policy-gradient losses straight from the policy's hidden states and LM head; the ``[B, T, V]``
logits never exist. Token-local configurations form the head's gradient in the forward
(``pyalign::linear_policy_loss_fwd_grad``, 3 GEMMs per chunk); the others compose the fused linear
head (:mod:`pyalign.logprob.linear`, 1 GEMM per chunk forward, 3 backward) with the policy-loss
kernel."""
from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import Tensor

from pyalign import _overrides
from pyalign._metrics import Metrics
from pyalign._tensors import acc_dtype
from pyalign.logprob.linear import linear_token_logprobs, prepared_head
from pyalign.ops.linear import NEED_BIAS, NEED_HIDDEN, NEED_WEIGHT
from pyalign.ops.linear_policy import IGNORE, linear_policy_loss_fwd_grad_op
from pyalign.rl.policy import policy_loss, prepare

__all__ = ["fused_linear_policy_loss"]

_POLICY_LOSS = inspect.signature(policy_loss)


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

    Positions where ``mask`` is 0 are passed to the head as ignored (no GEMM work). Two schedules,
    the same results (values to rounding; metrics and loss bitwise):

    - token-local configurations (token-level ratio, ``top_entropy_quantile == 1``, no
      ``off_policy_mask_threshold``, not VESPO: each token's gradient is known once its own log-prob
      is), under grad mode with an input that requires grad: the head's gradients are formed in the
      forward, 3 GEMMs per token chunk, and the backward only scales them. Memory: the gradients of
      the inputs that require grad are held from the forward to the backward (as
      :func:`pyalign.logprob.linear_cross_entropy` holds them), plus one ``[chunk, V]`` logits block
      and ``O(B T)``; bf16/fp16 weights whose tokens need several chunks accumulate ``dweight`` in
      an fp32 ``[V, H]`` buffer.
    - the others (sequence-level statistics of the current log-probs are needed before any token's
      gradient) and calls without a gradient: 1 GEMM per chunk in the forward and 3 in the backward
      (it recomputes each chunk's logits); memory beyond the returned gradients: one ``[chunk, V]``
      logits block and ``O(B T H)``.

    ``pyalign.overrides(forward_gradients=False)`` forces the second schedule.
    """
    if "entropy" in policy_loss_options:
        raise TypeError("entropy: computed here by the fused head; do not pass it")
    needs_entropy = (policy_loss_options.get("entropy_coef", 0.0) != 0
                     or policy_loss_options.get("top_entropy_quantile", 1.0) < 1)
    head_labels = labels if mask is None else labels.masked_fill(mask == 0, IGNORE)
    h2, w, b, l1, shape, chunk, tf = prepared_head(
        hidden, weight, bias, head_labels, shift=False, validate=None, ignore_index=IGNORE,
        temperature=temperature, logit_scale=logit_scale, softcap=softcap, chunk_size=chunk_size)
    needs = 0
    if torch.is_grad_enabled() and _overrides.forward_gradients():
        needs = ((NEED_HIDDEN if h2.requires_grad else 0) | (NEED_WEIGHT if w.requires_grad else 0)
                 | (NEED_BIAS if (b is not None and b.requires_grad) else 0))
    if needs:
        # the log-probs and entropy do not exist yet: a placeholder of their shape and dtype stands
        # for them while the options and the other inputs are checked
        placeholder = h2.new_zeros(tuple(shape), dtype=acc_dtype(h2))
        bound = _POLICY_LOSS.bind(placeholder, old_logps, advantages, mask,
                                  entropy=placeholder if needs_entropy else None, **policy_loss_options)
        bound.apply_defaults()
        args, o = prepare(bound.arguments)
        if o.token_local:
            loss, values, _, _, _ = linear_policy_loss_fwd_grad_op(
                h2, w, b, l1, *tf, chunk, needs, needs_entropy, args[1], args[2], args[3], args[5], *args[6:])
            return loss, Metrics(values, o.metric_index)
    out = linear_token_logprobs(hidden, weight, head_labels, bias=bias, temperature=temperature,
                                logit_scale=logit_scale, softcap=softcap, chunk_size=chunk_size,
                                return_entropy=needs_entropy)
    logps, entropy = out if needs_entropy else (out, None)
    return policy_loss(logps, old_logps, advantages, mask, entropy=entropy, **policy_loss_options)
