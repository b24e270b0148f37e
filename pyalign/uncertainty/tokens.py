"""Token distributions of an ensemble of language models: total / expected entropy, mutual
information and the ensemble log-prob per token, and their sequence summaries."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from pyalign import _checks
from pyalign.ops.uncertainty import token_uncertainty_op

__all__ = ["TokenUncertainty", "token_uncertainty", "SequenceUncertainty", "sequence_uncertainty"]


class TokenUncertainty(NamedTuple):
    """Per token (shape ``logits.shape[1:-1]``); label fields are None without labels.

    ``total_entropy`` H(mean_m p_m), ``expected_entropy`` mean_m H(p_m) (aleatoric),
    ``mutual_information`` their difference (epistemic, >= 0), ``logprobs`` log mean_m p_m(label),
    ``prob_variance`` var_m p_m(label) (ddof 0), ``member_logprobs`` ``[M, ...]`` log p_m(label).
    Positions whose label is ``ignore_index`` are 0 in every field.
    """

    total_entropy: Tensor
    expected_entropy: Tensor
    mutual_information: Tensor
    logprobs: Optional[Tensor] = None
    prob_variance: Optional[Tensor] = None
    member_logprobs: Optional[Tensor] = None


def _check_token_args(logits, labels, temperature, ignore_index, validate):
    _checks.float_tensor(logits, "logits")
    if logits.dim() < 2 or logits.shape[0] < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits: expected shape [M, ..., V] with M >= 1 members and V >= 1, got {tuple(logits.shape)}")
    if labels is not None:
        _checks.index_tensor(labels, "labels")
        _checks.same_device(("logits", logits), ("labels", labels))
        if tuple(labels.shape) != tuple(logits.shape[1:-1]):
            raise ValueError(f"labels: expected shape {tuple(logits.shape[1:-1])} (logits without the member and "
                             f"vocabulary dimensions), got {tuple(labels.shape)}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {ignore_index!r}")
    temperature = _checks.positive(temperature, "temperature")
    if logits.stride(-1) != 1 and logits.shape[-1] > 1:
        logits = logits.contiguous()
    if validate is None:
        validate = logits.device.type == "cpu"
    if validate and labels is not None and logits.device.type != "cpu":
        _checks.check_labels(labels, logits.shape[-1], ignore_index)
    return logits, temperature


def token_uncertainty(logits: Tensor, labels: Optional[Tensor] = None, *, temperature: float = 1.0,
                      ignore_index: int = -100, validate: Optional[bool] = None) -> TokenUncertainty:
    """Per-token ensemble uncertainty from the logits of M members, fused over the vocabulary.

    Args:
        logits: ``[M, ..., V]`` fp32/bf16/fp16 (or fp64); leading dims may have any strides.
        labels: optional int32/int64 ``logits.shape[1:-1]``; ``ignore_index`` positions give 0.
        temperature: ``p_m = softmax(logits_m / temperature)``.
        validate: check labels are in ``[0, V)`` (CPU: always, inside the kernel; CUDA: opt-in, it
            syncs; an invalid label then gives NaN and is never read).

    Memory is O(M x tokens): no ``[M, tokens, V]`` probability tensor is formed. Each member's
    row is read twice (softmax statistics, then the mean distribution).

    Gradients: ``logprobs`` and ``member_logprobs`` are differentiable w.r.t. ``logits`` (fused
    backward kernel); the entropies and the mutual information are not (they are returned
    detached from the graph).
    """
    logits, temperature = _check_token_args(logits, labels, temperature, ignore_index, validate)
    total, expected, mi, ens, lvar, mlp, _ = token_uncertainty_op(logits, labels, temperature, ignore_index)
    shape = tuple(logits.shape[1:-1])
    if labels is None:
        return TokenUncertainty(total.view(shape), expected.view(shape), mi.view(shape))
    return TokenUncertainty(total.view(shape), expected.view(shape), mi.view(shape), ens.view(shape),
                            lvar.view(shape), mlp.view((logits.shape[0],) + shape))


class SequenceUncertainty(NamedTuple):
    """Per sequence: sums (or means) over valid tokens; ``logprobs`` None without labels."""

    total_entropy: Tensor
    expected_entropy: Tensor
    mutual_information: Tensor
    logprobs: Optional[Tensor]
    counts: Tensor


def sequence_uncertainty(logits: Tensor, labels: Optional[Tensor] = None, *, mask: Optional[Tensor] = None,
                         temperature: float = 1.0, ignore_index: int = -100, reduction: str = "sum",
                         validate: Optional[bool] = None) -> SequenceUncertainty:
    """Aggregates :func:`token_uncertainty` over the last (sequence) dimension ``T``.

    ``logits`` ``[M, ..., T, V]``; valid tokens are those with ``labels != ignore_index`` and
    ``mask`` (bool ``[..., T]``) true. ``reduction``: ``"sum"`` or ``"mean"`` (per valid token; a
    sequence without valid tokens gives 0). ``logprobs`` is the sum/mean of the per-token ensemble
    log-prob (differentiable); counts are int64.
    """
    _checks.choice(reduction, "reduction", ("sum", "mean"))
    _checks.tensor(logits, "logits")
    if logits.dim() < 3:
        raise ValueError(f"logits: expected shape [M, ..., T, V] with a sequence dimension, got {tuple(logits.shape)}")
    tok = token_uncertainty(logits, labels, temperature=temperature, ignore_index=ignore_index, validate=validate)
    seq_shape = tuple(logits.shape[1:-1])
    valid = torch.ones(seq_shape, dtype=torch.bool, device=logits.device)
    if labels is not None:
        valid = labels != ignore_index
    if mask is not None:
        _checks.tensor(mask, "mask")
        if tuple(mask.shape) != seq_shape:
            raise ValueError(f"mask: expected shape {seq_shape}, got {tuple(mask.shape)}")
        _checks.same_device(("logits", logits), ("mask", mask))
        valid = valid & mask.bool()
    counts = valid.sum(-1)
    vf = valid.to(tok.total_entropy.dtype)
    denom = counts.clamp(min=1).to(vf.dtype) if reduction == "mean" else None
    red = lambda t: None if t is None else ((t * vf).sum(-1) if denom is None else (t * vf).sum(-1) / denom)
    return SequenceUncertainty(red(tok.total_entropy), red(tok.expected_entropy), red(tok.mutual_information),
                               red(tok.logprobs), counts)
