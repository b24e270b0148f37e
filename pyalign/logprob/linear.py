"""Per-token log-probs of a linear LM head without materializing the logits.

``linear_token_logprobs(hidden, weight, labels, bias=b, ...)`` computes what
``token_logprobs(hidden @ weight.T + b, labels, ...)`` computes (log-probs, entropy and the
optional statistics), with gradients for ``hidden``, ``weight`` and ``bias``, while holding only
one ``[chunk_size, V]`` block of logits at a time (see :mod:`pyalign.ops.linear` for the method).
``linear_cross_entropy`` is the same head as a loss with the options of
``torch.nn.functional.cross_entropy`` plus a z-loss. A composite over the log-prob kernels and the
device's GEMMs, reached through the ops layer.

Dtypes (both functions): the GEMMs run in one compute dtype. Under ``torch.autocast`` for the
device of ``hidden``, it is autocast's dtype (as ``F.linear`` would run the head; fp64 tensors
are not cast). Otherwise ``hidden``, ``weight`` and ``bias`` of different dtypes among
fp32/bf16/fp16 are promoted to ``torch.promote_types`` of them (bf16 hidden with an fp32 head
runs in fp32; bf16 with fp16 in fp32); fp64 must not be mixed with other dtypes. The casts are
ordinary differentiable ``.to()`` copies (O(tokens * H), or ``[V, H]`` when the head is the one
cast), so each gradient comes back in its input's dtype.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from pyalign import _checks, _overrides
from pyalign._outputs import ENTROPY, MEAN_LOGIT, package, requested
from pyalign._tensors import cast_head, gathered
from pyalign.logprob.logits import sequence_totals
from pyalign.ops.linear import (NEED_BIAS, NEED_HIDDEN, NEED_WEIGHT, auto_chunk_size, linear_cross_entropy_fwd_grad_op,
                                linear_token_logprobs_basis_op, linear_token_logprobs_op)
from pyalign.ops.cross_entropy import assemble_cross_entropy

__all__ = ["linear_token_logprobs", "linear_sequence_logprobs", "linear_cross_entropy"]


def _rows(hidden, labels, shift, validate, V, ignore_index, chunk_size):
    """The head's rows ``[n, H]`` and labels ``[n]`` (after the causal shift), the result shape, the
    chunk size, with the labels checked where asked."""
    if shift:
        hidden, labels = hidden[..., :-1, :], labels[..., 1:]
    if validate is None:
        validate = hidden.device.type == "cpu"  # free on CPU (the kernel checks); a sync on CUDA
    if validate and hidden.device.type != "cpu":
        _checks.check_labels(labels, V, ignore_index)
    H = hidden.shape[-1]
    h2, l1 = hidden.reshape(-1, H), labels.reshape(-1)
    if chunk_size is None:
        chunk_size = auto_chunk_size(max(1, l1.numel()), V, hidden.dtype, hidden.device, H)
    return h2, l1, labels.shape, int(chunk_size)


def prepared_head(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, *, shift: bool,
                  validate: Optional[bool], ignore_index: int, temperature: float, logit_scale: float,
                  softcap: Optional[float], chunk_size: Optional[int]):
    """The checked head of a fused function: ``(hidden [n, H], weight, bias, labels [n], result shape,
    chunk size, (temperature, logit_scale, softcap))``, an FSDP2-sharded (DTensor) head gathered whole
    for the call and the dtypes cast as the module docstring says."""
    weight, bias = gathered(weight), gathered(bias)
    _checks.head(hidden, weight, bias, labels, shift=shift)
    tf = _checks.logit_options(ignore_index, temperature, logit_scale, softcap)
    _checks.chunk_size(chunk_size)
    hidden, weight, bias = cast_head(hidden, weight, bias)
    h2, l1, shape, chunk = _rows(hidden, labels, shift, validate, weight.shape[0], ignore_index, chunk_size)
    return h2, weight, bias, l1, shape, chunk, tf


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
    (``temperature``, ``logit_scale``, ``softcap``, ``shift``, ``return_entropy``, ``outputs``
    including ``"lse"``, ``validate``); gradients flow to ``hidden``, ``weight`` and ``bias`` (any
    subset) through the log-probs, the entropy, ``lse`` and ``mean_logit``.

    Args:
        hidden: ``[..., H]`` fp32/bf16/fp16 (or fp64).
        weight: ``[V, H]`` (the LM head / tied embedding); fp32/bf16/fp16 may differ from
            ``hidden``'s dtype: the GEMMs then run in the promoted dtype, or in autocast's dtype
            under ``torch.autocast`` (see the module docstring).
        labels: int32/int64 of shape ``hidden.shape[:-1]``.
        bias: optional ``[V]``.
        chunk_size: tokens per chunk; default from V, H, dtype and device
            (:func:`pyalign.ops.linear.auto_chunk_size`: a 64 MiB working set and at most 256
            rows on CPU, 512 MiB on CUDA). Peak extra memory beyond the returned gradients (``n``
            kept tokens): ``chunk_size * V * itemsize`` (the logits buffer; on CPU fp32, whose
            oneDNN GEMM makes a fresh buffer per chunk, 2-3 times that were measured, as the C
            allocator need not reuse the freed one in place; in the backward of bf16/fp16
            weights that need a gradient, the vocab-blocked logits block, at most
            ``max(chunk_size * V, 16 * min(V, 1024 CPU / 4096 CUDA))`` elements) + ``n * H * 4``
            (fp32 ``dhidden`` accumulator, bf16/fp16 only) + O(n * H); an fp32 ``[V_block, H]``
            staging block is added only when the tokens need several chunks of that block.
            No fp32 ``[V, H]`` accumulator is held (fp32/fp64 weights accumulate ``dW`` in the
            result itself). See :mod:`pyalign.ops.linear` for the two backward loop orders.

    Rows with ``labels == ignore_index`` cost no matmul work and give 0. A DTensor ``weight`` or
    ``bias`` (an FSDP2 ``fully_shard`` head read outside its module's forward) is gathered whole for
    the call; its gradient returns to the shards averaged over the ranks, as FSDP2 averages.
    """
    flags, wanted = requested(outputs, return_entropy)
    h2, weight, bias, l1, out_shape, chunk, tf = prepared_head(
        hidden, weight, bias, labels, shift=shift, validate=validate, ignore_index=ignore_index,
        temperature=temperature, logit_scale=logit_scale, softcap=softcap, chunk_size=chunk_size)
    args = (h2, weight, bias, l1, ignore_index, *tf, flags, chunk)
    if frozen_head(h2, weight, bias) and not flags & (ENTROPY | MEAN_LOGIT):
        # only hidden needs a gradient: its basis is formed in the forward, 2 GEMMs per chunk
        logp, lse, ent, lss, mean, top1, _ = linear_token_logprobs_basis_op(*args)
    else:
        logp, lse, ent, lss, mean, top1 = linear_token_logprobs_op(*args)
    return package((logp, ent, lss, mean, top1, lse), out_shape, wanted, outputs, return_entropy)


def frozen_head(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """Grad mode on and only ``hidden`` requires grad (a frozen LM head, as in LoRA): the case
    ``pyalign::linear_token_logprobs_basis`` makes in 2 GEMMs per chunk."""
    return (torch.is_grad_enabled() and hidden.requires_grad and not weight.requires_grad
            and not (bias is not None and bias.requires_grad) and _overrides.forward_gradients())


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Optional[Tensor] = None,
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
    chunk_size: Optional[int] = None,
    validate: Optional[bool] = None,
):
    """Cross-entropy of the linear head ``hidden @ weight.T + bias`` without holding the logits:
    :func:`torch.nn.functional.cross_entropy` semantics (``class_weights`` = its ``weight``,
    ``label_smoothing``, ``reduction`` "mean"/"sum"/"none", ``ignore_index``) applied to
    ``transform(logits)``, plus the z-loss ``z_loss_scale * lse^2`` (Liger's ``lse_square_scale``),
    averaged over kept tokens for "mean" and included in the returned loss.

    Same head, chunking, dtypes and gradients (``hidden``, ``weight``, ``bias``) as
    :func:`linear_token_logprobs`; the z-loss and label smoothing enter the same fused backward
    (through ``lse`` and the class-weighted ``mean_logit``), with no extra pass over the logits.
    Returns the loss (fp32; fp64 for fp64 inputs; ``[...]`` for "none", 0 at ignored tokens) and,
    with ``return_z_loss``, ``(loss, z_loss)``. "mean" with no kept token gives NaN, as PyTorch.
    See :func:`pyalign.ops.cross_entropy.assemble_cross_entropy` for the formula.

    Reduced losses ("mean"/"sum") under grad mode with some input requiring grad form the
    gradient in the forward (3 GEMMs per chunk instead of 4; the backward only scales it by
    ``grad_output``; see :mod:`pyalign.ops.linear`). Memory: the gradients of the inputs that
    require grad (``dhidden`` ``[n, H]``, ``dweight`` ``[V, H]``, ``dbias`` ``[V]``, each in its
    compute dtype) are held from the forward to the backward, as in Liger-Kernel, and the backward
    allocates the scaled copies while they are alive (about 2x ``dweight`` for a moment).
    bf16/fp16 weights whose kept tokens need more than one chunk accumulate ``dweight`` in an fp32
    ``[V, H]`` buffer during the forward (rounded once; the recompute path's vocab-blocked backward
    avoids that buffer at the cost of the 4th GEMM). With ``return_z_loss`` a nonzero gradient
    reaching the z-loss output adds 3 GEMMs per chunk in the backward (its part is recomputed).
    ``reduction="none"``, grad mode off or no input requiring grad: the forward makes 1 GEMM per
    chunk and saves nothing beyond what the recompute path needs.
    """
    weight, bias = gathered(weight), gathered(bias)  # an FSDP2-sharded head: whole for the call
    _checks.head(hidden, weight, bias, labels, shift=shift)
    temperature, logit_scale, softcap = _checks.logit_options(ignore_index, temperature, logit_scale, softcap)
    _checks.chunk_size(chunk_size)
    V = weight.shape[0]
    eps, zs, w = _checks.cross_entropy_options(reduction, label_smoothing, z_loss_scale, class_weights, V, hidden,
                                               "hidden")
    hidden, weight, bias = cast_head(hidden, weight, bias)
    h2, l1, shape, chunk = _rows(hidden, labels, shift, validate, V, ignore_index, chunk_size)
    needs = 0
    if torch.is_grad_enabled():
        needs = ((NEED_HIDDEN if h2.requires_grad else 0) | (NEED_WEIGHT if weight.requires_grad else 0)
                 | (NEED_BIAS if (bias is not None and bias.requires_grad) else 0))
    if reduction != "none" and needs and _overrides.forward_gradients():
        # The gradient is known in the forward up to grad_output: 3 GEMMs per chunk, no recompute.
        loss, zl, _, _, _, _ = linear_cross_entropy_fwd_grad_op(
            h2, weight, bias, l1, ignore_index, temperature, logit_scale, softcap, chunk, eps, zs,
            w, reduction == "sum", needs, bool(return_z_loss))
        return (loss, zl) if return_z_loss else loss
    flags = MEAN_LOGIT if eps > 0 else 0
    logp, lse, _, _, mean, _ = linear_token_logprobs_op(
        h2, weight, bias, l1, ignore_index, temperature, logit_scale, softcap, flags, chunk, w if eps > 0 else None)
    return assemble_cross_entropy(
        logp.view(shape), lse.view(shape), mean.view(shape) if eps > 0 else None, l1.view(shape),
        ignore_index=ignore_index, reduction=reduction, label_smoothing=eps, z_loss_scale=zs,
        class_weights=w, vocab_size=V, return_z_loss=return_z_loss)


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
    _checks.per_token_only(kwargs, "linear_sequence_logprobs", "linear_token_logprobs")
    lp = linear_token_logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                               temperature=temperature, shift=shift, **kwargs)
    return sequence_totals(lp, labels[..., 1:] if shift else labels, ignore_index, reduction)
