"""Preference losses straight from the policy's hidden states and LM head: a composite of the fused
linear head (:mod:`pyalign.logprob.linear`) and the loss kernels; the ``[2B, T, V]`` logits never
exist."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pyalign.logprob.linear import linear_sequence_logprobs
from pyalign.losses.dpo import dpo_loss

__all__ = ["fused_linear_dpo_loss"]


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
