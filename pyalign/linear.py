"""Per-token log-probs of a linear LM head without materializing the logits.

``linear_token_logprobs(hidden, weight, labels, bias=b, ...)`` computes what
``token_logprobs(hidden @ weight.T + b, labels, ...)`` computes (log-probs, entropy and the
optional statistics), with gradients for ``hidden``, ``weight`` and ``bias``, while holding only
one ``[chunk_size, V]`` block of logits at a time (see :mod:`pyalign.ops.linear` for the method).
Also re-exported from :mod:`pyalign.logprob`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from pyalign import _checks
from pyalign.logprob import OUTPUT_FLAGS, TokenStats, check_labels, package
from pyalign.ops.linear import auto_chunk_size, linear_token_logprobs_op


def check_head(hidden, weight, bias, labels, *, shift: bool, weight_name: str = "weight",
               bias_name: str = "bias") -> None:
    """Shape/dtype/device checks shared with the vocab-parallel variant."""
    _checks.float_tensor(hidden, "hidden")
    _checks.float_tensor(weight, weight_name)
    _checks.index_tensor(labels, "labels")
    if bias is not None:
        _checks.float_tensor(bias, bias_name)
    _checks.same_device(("hidden", hidden), (weight_name, weight), (bias_name, bias), ("labels", labels))
    if hidden.dim() < 1 or hidden.shape[-1] < 1:
        raise ValueError(f"hidden: expected shape [..., H] with H >= 1, got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[0] < 1:
        raise ValueError(f"{weight_name}: expected shape [V, H] with V >= 1, got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{weight_name}: expected shape [V, {hidden.shape[-1]}] (H of hidden), "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{weight_name}: expected dtype {hidden.dtype} like hidden, got {weight.dtype}")
    if bias is not None:
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{bias_name}: expected shape [{weight.shape[0]}] (V of {weight_name}), "
                             f"got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{bias_name}: expected dtype {hidden.dtype} like hidden, got {bias.dtype}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels: expected shape {tuple(hidden.shape[:-1])} (the leading shape of hidden), "
                         f"got {tuple(labels.shape)}")
    if shift and hidden.dim() < 2:
        raise ValueError(f"shift=True: hidden needs a sequence dimension [..., T, H], got {tuple(hidden.shape)}")


def check_options(ignore_index, temperature, logit_scale, softcap, chunk_size, outputs, return_entropy):
    """Validates the scalar options; returns ``(temperature, logit_scale, softcap, flags, wanted)``."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {ignore_index!r}")
    temperature = _checks.positive(temperature, "temperature")
    logit_scale = _checks.positive(logit_scale, "logit_scale")
    softcap = 0.0 if softcap is None else _checks.positive(softcap, "softcap")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size: expected None or an int >= 1, got {chunk_size!r}")
    wanted = set(outputs or ())
    for name in wanted:
        _checks.choice(name, "outputs", tuple(OUTPUT_FLAGS))
    if return_entropy:
        wanted.add("entropy")
    return temperature, logit_scale, softcap, sum(OUTPUT_FLAGS[n] for n in wanted), wanted


def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    shift: bool = False,
    return_entropy: bool = False,
    outputs: Optional[Sequence[str]] = None,
    chunk_size: Optional[int] = None,
    validate: Optional[bool] = None,
):
    """Per-token ``log p(label)`` of the logits ``hidden @ weight.T + bias``, never held whole.

    Same results and options as :func:`pyalign.logprob.token_logprobs` applied to those logits
    (``temperature``, ``logit_scale``, ``softcap``, ``shift``, ``return_entropy``, ``outputs``,
    ``validate``); gradients flow to ``hidden``, ``weight`` and ``bias`` (any subset) through the
    log-probs and the entropy.

    Args:
        hidden: ``[..., H]`` fp32/bf16/fp16 (fp64 on CPU).
        weight: ``[V, H]`` of the same dtype (the LM head / tied embedding).
        labels: int32/int64 of shape ``hidden.shape[:-1]``.
        bias: optional ``[V]`` of the same dtype.
        chunk_size: tokens per chunk; default from V, dtype and device
            (:func:`pyalign.ops.linear.auto_chunk_size`: a 64 MiB logits block on CPU, 512 MiB on
            CUDA). Peak extra memory is about ``chunk_size * V * itemsize`` plus, when ``weight``
            needs a gradient and is bf16/fp16, an fp32 ``[V, H]`` accumulator, plus O(tokens * H).

    Rows with ``labels == ignore_index`` cost no matmul work and give 0.
    """
    check_head(hidden, weight, bias, labels, shift=shift)
    temperature, logit_scale, softcap, flags, wanted = check_options(
        ignore_index, temperature, logit_scale, softcap, chunk_size, outputs, return_entropy)
    if shift:
        hidden, labels = hidden[..., :-1, :], labels[..., 1:]
    out_shape = labels.shape
    V, H = weight.shape
    if validate is None:
        validate = hidden.device.type == "cpu"
    if validate and hidden.device.type != "cpu":
        check_labels(labels, V, ignore_index)
    h2, l1 = hidden.reshape(-1, H), labels.reshape(-1)
    if chunk_size is None:
        chunk_size = auto_chunk_size(max(1, l1.numel()), V, hidden.dtype, hidden.device)
    logp, _, ent, lss, mean, top1 = linear_token_logprobs_op(
        h2, weight, bias, l1, ignore_index, temperature, logit_scale, softcap, flags, int(chunk_size))
    return package((logp, ent, lss, mean, top1), out_shape, wanted, outputs, return_entropy)


def linear_sequence_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    shift: bool = False,
    reduction: str = "sum",
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """Per-sequence sum (or mean) of :func:`linear_token_logprobs` over non-ignored tokens, and
    the token counts, like :func:`pyalign.logprob.sequence_logprobs`. ``hidden`` is
    ``[..., T, H]``; returns ``(logps [...], counts [...] int64)``; a sequence with no valid token
    gives 0."""
    _checks.choice(reduction, "reduction", ("sum", "mean"))
    _checks.index_tensor(labels, "labels")
    if labels.dim() < 1:
        raise ValueError("labels: expected shape [..., T] with a sequence dimension")
    lp = linear_token_logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                               temperature=temperature, shift=shift, **kwargs)
    if isinstance(lp, tuple):
        raise ValueError("linear_sequence_logprobs: return_entropy/outputs are not supported here; "
                         "use linear_token_logprobs")
    lab = labels[..., 1:] if shift else labels
    counts = (lab != ignore_index).sum(-1)
    total = lp.sum(-1)
    if reduction == "mean":
        total = total / counts.clamp(min=1).to(total.dtype)
    return total, counts
