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

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from pyalign import _checks
from pyalign.ops.logprob import ENTROPY, LOG_SUM_SQ, MEAN_LOGIT, TOP1, token_logprobs_op

OUTPUT_FLAGS = {"entropy": ENTROPY, "log_sum_sq_probs": LOG_SUM_SQ, "mean_logit": MEAN_LOGIT, "is_top1": TOP1,
                "lse": 0}  # the log-sum-exp is always computed (no flag)
REDUCTIONS = ("mean", "sum", "none")


class TokenStats(NamedTuple):
    """Per-token results; a field is None when it was not asked for."""

    logprobs: Tensor
    entropy: Optional[Tensor] = None
    log_sum_sq_probs: Optional[Tensor] = None
    mean_logit: Optional[Tensor] = None
    is_top1: Optional[Tensor] = None
    lse: Optional[Tensor] = None


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
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {ignore_index!r}")
    temperature = _checks.positive(temperature, "temperature")
    logit_scale = _checks.positive(logit_scale, "logit_scale")
    softcap = 0.0 if softcap is None else _checks.positive(softcap, "softcap")
    if logits.stride(-1) != 1 and logits.shape[-1] > 1:
        # The kernels read each row with unit stride; leading dims may have any strides.
        logits = logits.contiguous()
    if validate is None:
        validate = logits.device.type == "cpu"  # free on CPU (the kernel checks); a sync on CUDA
    if validate and logits.device.type != "cpu":
        check_labels(labels, logits.shape[-1], ignore_index)
    return logits, temperature, logit_scale, softcap


def check_labels(labels: Tensor, vocab_size: int, ignore_index: int = -100) -> None:
    """Raises ValueError if a label is outside ``[0, vocab_size)`` and is not ``ignore_index``.

    On CUDA this synchronizes with the host; the kernels themselves never read out of bounds and
    return NaN for such a label, so the check is opt-in there (``validate=True``).
    """
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        idx = int(bad.flatten().nonzero()[0])
        raise ValueError(f"labels: value {int(labels.flatten()[idx])} at flat position {idx} is outside "
                         f"[0, {vocab_size}) and is not ignore_index ({ignore_index})")


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
        logits: ``[..., V]`` fp32/bf16/fp16 (fp64 on CPU). Leading dims may have any strides (a
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
    wanted = set(outputs or ())
    for name in wanted:
        _checks.choice(name, "outputs", tuple(OUTPUT_FLAGS))
    if return_entropy:
        wanted.add("entropy")
    flags = sum(OUTPUT_FLAGS[n] for n in wanted)
    if inplace_backward:
        _checks.writable(logits, "logits")
    out_shape = labels[..., 1:].shape if shift else labels.shape
    logp, lse, ent, lss, mean, top1 = token_logprobs_op(
        logits, labels, ignore_index, temperature, logit_scale, softcap, bool(shift), flags,
        bool(inplace_backward))
    return package((logp, ent, lss, mean, top1, lse), out_shape, wanted, outputs, return_entropy)


def package(results, out_shape, wanted, outputs, return_entropy):
    """Shapes flat per-token results like ``token_logprobs`` returns them; ``results`` is
    ``(logp, entropy, log_sum_sq, mean_logit, top1[, lse])``."""
    logp, ent, lss, mean, top1, *rest = results
    lse = rest[0] if rest else None
    shaped = lambda t, name: t.view(out_shape) if (name in wanted and t is not None) else None
    if outputs is not None:
        return TokenStats(logp.view(out_shape), shaped(ent, "entropy"), shaped(lss, "log_sum_sq_probs"),
                          shaped(mean, "mean_logit"), shaped(top1, "is_top1"),
                          None if lse is None else lse.view(out_shape))  # lse is free: always filled
    if return_entropy:
        return logp.view(out_shape), ent.view(out_shape)
    return logp.view(out_shape)


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
    with no valid token gives 0 (never NaN). Other keyword arguments go to :func:`token_logprobs`.
    """
    _checks.choice(reduction, "reduction", ("sum", "mean"))
    _checks.index_tensor(labels, "labels")
    if labels.dim() < 1:
        raise ValueError("labels: expected shape [..., T] with a sequence dimension")
    lp = token_logprobs(logits, labels, ignore_index=ignore_index, temperature=temperature,
                        shift=shift, **kwargs)
    lab = labels[..., 1:] if shift else labels
    counts = (lab != ignore_index).sum(-1)
    total = lp.sum(-1)
    if reduction == "mean":
        total = total / counts.clamp(min=1).to(total.dtype)
    return total, counts


def check_loss_options(reduction, label_smoothing, z_loss_scale, class_weights, vocab_size, like,
                       like_name="logits"):
    """Validates the cross-entropy options; returns ``(label_smoothing, z_loss_scale, weights)``
    with the class weights as a detached contiguous ``[V]`` tensor in the accumulation dtype."""
    _checks.choice(reduction, "reduction", REDUCTIONS)
    eps = _checks.finite(label_smoothing, "label_smoothing")
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label_smoothing: expected a number in [0, 1], got {label_smoothing!r}")
    zs = _checks.finite(z_loss_scale, "z_loss_scale")
    if zs < 0:
        raise ValueError(f"z_loss_scale: expected a finite number >= 0, got {z_loss_scale!r}")
    w = None
    if class_weights is not None:
        _checks.float_tensor(class_weights, "class_weights")
        if tuple(class_weights.shape) != (vocab_size,):
            raise ValueError(f"class_weights: expected shape [{vocab_size}] (one weight per class), "
                             f"got {tuple(class_weights.shape)}")
        _checks.same_device((like_name, like), ("class_weights", class_weights))
        acc = torch.float64 if like.dtype == torch.float64 else torch.float32
        w = class_weights.detach().to(acc).contiguous()
    return eps, zs, w


def assemble_cross_entropy(logp, lse, mean, labels, *, ignore_index, reduction, label_smoothing,
                           z_loss_scale, class_weights, vocab_size, return_z_loss):
    """The cross-entropy of :func:`torch.nn.functional.cross_entropy` (with ``weight``,
    ``label_smoothing``, ``reduction``, ``ignore_index``) plus a z-loss, from per-token
    ``log p(label)``, ``lse`` and (with label smoothing) the class-weighted ``mean_logit``
    ``sum_c w_c z_c / V``. For a kept token with label y and class weights w (1 without):

        ce = (1 - eps) * w_y * (lse - z_y) + eps / V * sum_c w_c (lse - z_c)
           = (1 - eps) * w_y * (-logp) + eps / V * (W * lse - V * mean),   W = sum_c w_c

    "mean" divides the summed ``ce`` by ``sum w_y`` over kept tokens (PyTorch's rule; NaN when no
    token is kept, like PyTorch), and adds ``z_loss_scale * mean(lse^2)`` over kept tokens.
    """
    valid = labels != ignore_index
    acc = logp.dtype
    if class_weights is None:
        wy = valid.to(acc)
    else:
        wy = class_weights.gather(0, labels.long().clamp(0, vocab_size - 1).reshape(-1)).view(labels.shape)
        wy = torch.where(valid, wy, torch.zeros_like(wy))
    ce = -logp if label_smoothing == 0 else -(1.0 - label_smoothing) * logp
    if class_weights is not None:
        ce = ce * wy
    if label_smoothing > 0:
        total_w = float(vocab_size) if class_weights is None else class_weights.sum()
        smooth = total_w * lse - vocab_size * mean  # 0 where ignored (lse = mean = 0 there)
        ce = ce + (label_smoothing / vocab_size) * smooth
    z = z_loss_scale * lse * lse if z_loss_scale > 0 else None
    if reduction == "none":
        loss, zl = ce, (torch.zeros_like(ce) if z is None else z)
    elif reduction == "sum":
        loss, zl = ce.sum(), (ce.new_zeros(()) if z is None else z.sum())
    else:
        loss = ce.sum() / wy.sum()
        zl = ce.new_zeros(()) if z is None else z.sum() / valid.sum().to(acc)
    loss = loss + zl if z is not None else loss
    return (loss, zl) if return_z_loss else loss


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
    (already included in the loss), reduced the same way. See :func:`assemble_cross_entropy`.
    """
    logits, temperature, logit_scale, softcap = _prepare(
        logits, labels, ignore_index, temperature, logit_scale, softcap, shift, validate)
    V = logits.shape[-1]
    eps, zs, w = check_loss_options(reduction, label_smoothing, z_loss_scale, class_weights, V, logits)
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


# The fused linear head (pyalign/linear.py) belongs to this family's public API.
from pyalign.linear import linear_cross_entropy, linear_sequence_logprobs, linear_token_logprobs  # noqa: E402,F401 (re-export)
