"""Batched per-token log-probs and softmax statistics straight from logits.

For logits ``x`` of shape ``[..., V]`` and integer ``labels`` of shape ``[...]`` every function
here works with ``p = softmax(transform(x))``, where

    transform(x) = softcap * tanh(logit_scale * x / softcap) / temperature   (softcap set)
                 = logit_scale * x / temperature                            (otherwise)

(Gemma 2-style logit softcapping). Each logits row is read once in the forward (online max and
sum) and once in the backward, whose gradient is written straight into a fresh buffer or, with
``inplace_backward=True``, into the logits' own storage.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from pyalign import _checks
from pyalign._outputs import MEAN_LOGIT, package, requested
from pyalign.ops.cross_entropy import assemble_cross_entropy
from pyalign.ops.logprob import token_logprobs_op

__all__ = ["token_logprobs", "sequence_logprobs", "cross_entropy", "sequence_totals"]

def _prepare(logits, labels, ignore_index, temperature, logit_scale, softcap, shift, validate):
    _checks.float_tensor(logits, "logits")
    _checks.index_tensor(labels, "labels")
    _checks.same_device(("logits", logits), ("labels", labels))
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits: expected shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"labels: expected shape {tuple(logits.shape[:-1])} (the leading shape of logits), "
                         f"got {tuple(labels.shape)}")
    if shift and logits.dim() < 2:
        raise ValueError(f"shift=True: logits need a sequence dimension [..., T, V], got {tuple(logits.shape)}")
    temperature, logit_scale, softcap = _checks.logit_options(ignore_index, temperature, logit_scale, softcap)
    if logits.stride(-1) != 1 and logits.shape[-1] > 1:
        # The kernels read each row with unit stride; leading dims may have any strides.
        logits = logits.contiguous()
    if validate is None:
        validate = logits.device.type == "cpu"  # free on CPU (the kernel checks); a sync on CUDA
    if validate and logits.device.type != "cpu":
        check_labels(labels, logits.shape[-1], ignore_index)
    return logits, temperature, logit_scale, softcap


def token_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    shift: bool = False,
    return_entropy: bool = False,
    outputs: Optional[Sequence[str]] = None,
    inplace_backward: bool = False,
    validate: Optional[bool] = None,
):
    """Per-token ``log p(label)`` (0 where ``labels == ignore_index``), in fp32 (fp64 for fp64 logits).

    Args:
        logits: ``[..., V]`` fp32/bf16/fp16 (or fp64). Leading dims may have any strides (a
            slice is read in place); a vocabulary stride other than 1 costs one contiguous copy.
        labels: int32/int64 of shape ``logits.shape[:-1]``.
        shift: causal-LM shift: position ``t`` predicts ``labels[..., t + 1]``; the result has
            shape ``[..., T - 1]``. No copy of the logits is made.
        return_entropy: also return the per-token entropy of ``p`` (0 where ignored).
        outputs: names of statistics to compute in the same pass, any of ``"entropy"``,
            ``"log_sum_sq_probs"`` (log sum_v p_v^2, the WPO weight), ``"mean_logit"`` (mean of
            the transformed logits over V), ``"is_top1"`` (the label is the argmax of the logits; ties
            go to the first index, as ``torch.argmax``), ``"lse"`` (log-sum-exp of the transformed
            logits, the z-loss input; computed anyway, so ``TokenStats.lse`` is always filled).
            When given, a :class:`TokenStats` is returned.
        inplace_backward: the backward writes the gradient into the logits' storage (the logits
            are consumed: do not use them after ``backward()``); saves one ``[..., V]`` buffer.
        validate: check labels against ``[0, V)``. Default: on CPU always (at no cost, inside
            the kernel); on CUDA not, to avoid a host sync (an out-of-range label then yields NaN
            and is never read out of bounds).

    Returns:
        the log-probs; ``(log-probs, entropy)`` with ``return_entropy``; a :class:`TokenStats`
        when ``outputs`` is given.

    Gradients flow to ``logits`` through the log-probs, the entropy, ``lse`` and ``mean_logit``
    (all in the one backward pass); ``log_sum_sq_probs`` and ``is_top1`` are not differentiable.
    """
    logits, temperature, logit_scale, softcap = _prepare(
        logits, labels, ignore_index, temperature, logit_scale, softcap, shift, validate)
    flags, wanted = requested(outputs, return_entropy)
    if inplace_backward:
        _checks.writable(logits, "logits")
    out_shape = labels[..., 1:].shape if shift else labels.shape
    logp, lse, ent, lss, mean, top1 = token_logprobs_op(
        logits, labels, ignore_index, temperature, logit_scale, softcap, bool(shift), flags,
        bool(inplace_backward))
    return package((logp, ent, lss, mean, top1, lse), out_shape, wanted, outputs, return_entropy)


def sequence_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    shift: bool = False,
    reduction: str = "sum",
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """Per-sequence sum (or mean) of token log-probs over non-ignored tokens, and token counts.

    ``logits`` is ``[..., T, V]``; returns ``(logps [...], counts [...] int64)``. A sequence
    with no valid token gives 0 (never NaN). Other keyword arguments go to :func:`token_logprobs`,
    except the per-token statistics (``return_entropy``, ``outputs``: ValueError; use
    :func:`token_logprobs` and sum them as needed).
    """
    _checks.choice(reduction, "reduction", ("sum", "mean"))
    _checks.index_tensor(labels, "labels")
    if labels.dim() < 1:
        raise ValueError("labels: expected shape [..., T] with a sequence dimension")
    _checks.per_token_only(kwargs, "sequence_logprobs", "token_logprobs")
    lp = token_logprobs(logits, labels, ignore_index=ignore_index, temperature=temperature,
                        shift=shift, **kwargs)
    return sequence_totals(lp, labels[..., 1:] if shift else labels, ignore_index, reduction)


def sequence_totals(lp: Tensor, labels: Tensor, ignore_index: int, reduction: str) -> tuple[Tensor, Tensor]:
    """``(sum or mean over the last dimension of the per-token log-probs lp, kept-token counts)``."""
    counts = (labels != ignore_index).sum(-1)
    total = lp.sum(-1)
    if reduction == "mean":
        total = total / counts.clamp(min=1).to(total.dtype)
    return total, counts


def cross_entropy(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss_scale: float = 0.0,
    class_weights: Optional[Tensor] = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    shift: bool = False,
    return_z_loss: bool = False,
    inplace_backward: bool = False,
    validate: Optional[bool] = None,
):
    """``torch.nn.functional.cross_entropy(transform(logits), labels, weight=class_weights,
    ignore_index=..., reduction=..., label_smoothing=...)`` plus Liger's z-loss
    ``z_loss_scale * lse^2`` (averaged over kept tokens for "mean"), in one pass over each logits
    row forward and one backward (fp32 result; fp64 for fp64 logits).

    ``logits`` ``[..., V]`` and ``labels`` ``[...]`` as in :func:`token_logprobs` (so also
    ``temperature``, ``logit_scale``, ``softcap``, ``shift``, ``inplace_backward``).
    ``class_weights``: ``[V]`` float (no gradient). Returns the loss (``[...]`` for
    ``reduction="none"``, 0 at ignored tokens), and with ``return_z_loss`` also the z-loss part
    (already included in the loss), reduced the same way. See
    :func:`pyalign.ops.cross_entropy.assemble_cross_entropy`.
    """
    logits, temperature, logit_scale, softcap = _prepare(
        logits, labels, ignore_index, temperature, logit_scale, softcap, shift, validate)
    V = logits.shape[-1]
    eps, zs, w = _checks.cross_entropy_options(reduction, label_smoothing, z_loss_scale, class_weights, V, logits)
    if inplace_backward:
        _checks.writable(logits, "logits")
    lab = labels[..., 1:] if shift else labels
    flags = MEAN_LOGIT if eps > 0 else 0
    logp, lse, _, _, mean, _ = token_logprobs_op(
        logits, labels, ignore_index, temperature, logit_scale, softcap, bool(shift), flags,
        bool(inplace_backward), w if eps > 0 else None)
    shape = lab.shape
    return assemble_cross_entropy(
        logp.view(shape), lse.view(shape), mean.view(shape) if eps > 0 else None, lab,
        ignore_index=ignore_index, reduction=reduction, label_smoothing=eps, z_loss_scale=zs,
        class_weights=w, vocab_size=V, return_z_loss=return_z_loss)
