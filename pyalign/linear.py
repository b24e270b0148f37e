"""Per-token log-probs of a linear LM head without materializing the logits.

``linear_token_logprobs(hidden, weight, labels, bias=b, ...)`` computes what
``token_logprobs(hidden @ weight.T + b, labels, ...)`` computes (log-probs, entropy and the
optional statistics), with gradients for ``hidden``, ``weight`` and ``bias``, while holding only
one ``[chunk_size, V]`` block of logits at a time (see :mod:`pyalign.ops.linear` for the method).
``linear_cross_entropy`` is the same head as a loss with the options of
``torch.nn.functional.cross_entropy`` plus a z-loss. Also re-exported from :mod:`pyalign.logprob`.

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

from pyalign import _checks
from pyalign.logprob import (OUTPUT_FLAGS, TokenStats, assemble_cross_entropy, check_labels, check_loss_options,
                             package)
from pyalign.ops.logprob import ENTROPY, MEAN_LOGIT
from pyalign.ops import linear as ops_linear
from pyalign.ops.linear import auto_chunk_size, linear_token_logprobs_op


def check_head(hidden, weight, bias, labels, *, shift: bool, weight_name: str = "weight",
               bias_name: str = "bias", mixed_dtypes: bool = False) -> None:
    """Shape/dtype/device checks shared with the vocab-parallel variant. ``mixed_dtypes``: allow
    fp32/bf16/fp16 tensors of different dtypes (see :func:`compute_dtype`)."""
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
    def dtype_ok(t):
        if t.dtype == hidden.dtype:
            return True
        return mixed_dtypes and torch.float64 not in (t.dtype, hidden.dtype)
    if not dtype_ok(weight):
        raise TypeError(f"{weight_name}: expected dtype {hidden.dtype} like hidden"
                        + (" (fp64 cannot be mixed with other dtypes)" if mixed_dtypes else "")
                        + f", got {weight.dtype}")
    if bias is not None:
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{bias_name}: expected shape [{weight.shape[0]}] (V of {weight_name}), "
                             f"got {tuple(bias.shape)}")
        if not dtype_ok(bias):
            raise TypeError(f"{bias_name}: expected dtype {hidden.dtype} like hidden"
                            + (" (fp64 cannot be mixed with other dtypes)" if mixed_dtypes else "")
                            + f", got {bias.dtype}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels: expected shape {tuple(hidden.shape[:-1])} (the leading shape of hidden), "
                         f"got {tuple(labels.shape)}")
    if shift and hidden.dim() < 2:
        raise ValueError(f"shift=True: hidden needs a sequence dimension [..., T, H], got {tuple(hidden.shape)}")


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """Autocast's dtype for ``device_type`` when autocast is enabled there, else None."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # older torch: no per-device query
        enabled = torch.is_autocast_enabled() if device_type == "cuda" else (
            device_type == "cpu" and torch.is_autocast_cpu_enabled())
    if not enabled:
        return None
    try:
        return torch.get_autocast_dtype(device_type)
    except (AttributeError, TypeError):
        return torch.get_autocast_gpu_dtype() if device_type == "cuda" else torch.get_autocast_cpu_dtype()


def compute_dtype(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> torch.dtype:
    """The dtype the head's GEMMs run in: autocast's dtype under ``torch.autocast`` for the device
    (fp64 inputs excepted), else the promotion of the inputs' dtypes."""
    ts = [t for t in (hidden, weight, bias) if t is not None]
    if all(t.dtype != torch.float64 for t in ts):
        ac = _autocast_dtype(hidden.device.type)
        if ac is not None:
            return ac
    dt = hidden.dtype
    for t in ts[1:]:
        dt = torch.promote_types(dt, t.dtype)
    return dt


def cast_head(hidden, weight, bias):
    """``(hidden, weight, bias)`` in :func:`compute_dtype` (differentiable casts, no-ops when equal)."""
    dt = compute_dtype(hidden, weight, bias)
    cast = lambda t: t if (t is None or t.dtype == dt) else t.to(dt)
    return cast(hidden), cast(weight), cast(bias)


def check_options(ignore_index, temperature, logit_scale, softcap, chunk_size, outputs, return_entropy,
                  *, allow_lse: bool = False):
    """Validates the scalar options; returns ``(temperature, logit_scale, softcap, flags, wanted)``.
    ``allow_lse``: the output name ``"lse"`` is accepted (every public caller allows it now)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {ignore_index!r}")
    temperature = _checks.positive(temperature, "temperature")
    logit_scale = _checks.positive(logit_scale, "logit_scale")
    softcap = 0.0 if softcap is None else _checks.positive(softcap, "softcap")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size: expected None or an int >= 1, got {chunk_size!r}")
    wanted = set(outputs or ())
    names = tuple(n for n in OUTPUT_FLAGS if allow_lse or n != "lse")
    for name in wanted:
        _checks.choice(name, "outputs", names)
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
    (``temperature``, ``logit_scale``, ``softcap``, ``shift``, ``return_entropy``, ``outputs``
    including ``"lse"``, ``validate``); gradients flow to ``hidden``, ``weight`` and ``bias`` (any
    subset) through the log-probs, the entropy, ``lse`` and ``mean_logit``.

    Args:
        hidden: ``[..., H]`` fp32/bf16/fp16 (fp64 on CPU).
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

    Rows with ``labels == ignore_index`` cost no matmul work and give 0.
    """
    check_head(hidden, weight, bias, labels, shift=shift, mixed_dtypes=True)
    temperature, logit_scale, softcap, flags, wanted = check_options(
        ignore_index, temperature, logit_scale, softcap, chunk_size, outputs, return_entropy, allow_lse=True)
    hidden, weight, bias = cast_head(hidden, weight, bias)
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
        chunk_size = auto_chunk_size(max(1, l1.numel()), V, hidden.dtype, hidden.device, H)
    args = (h2, weight, bias, l1, ignore_index, temperature, logit_scale, softcap, flags, int(chunk_size))
    if frozen_head(h2, weight, bias) and not flags & (ENTROPY | MEAN_LOGIT):
        # only hidden needs a gradient: its basis is formed in the forward, 2 GEMMs per chunk
        logp, lse, ent, lss, mean, top1, _ = ops_linear.linear_token_logprobs_basis_op(*args)
    else:
        logp, lse, ent, lss, mean, top1 = linear_token_logprobs_op(*args)
    return package((logp, ent, lss, mean, top1, lse), out_shape, wanted, outputs, return_entropy)


def frozen_head(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """Grad mode on and only ``hidden`` requires grad (a frozen LM head, as in LoRA): the case
    :func:`pyalign.ops.linear.linear_token_logprobs_basis_op` makes in 2 GEMMs per chunk."""
    return (torch.is_grad_enabled() and hidden.requires_grad and not weight.requires_grad
            and not (bias is not None and bias.requires_grad) and ops_linear._FORWARD_GRAD is not False)


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
    See :func:`pyalign.logprob.assemble_cross_entropy` for the formula.

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
    check_head(hidden, weight, bias, labels, shift=shift, mixed_dtypes=True)
    temperature, logit_scale, softcap, _, _ = check_options(
        ignore_index, temperature, logit_scale, softcap, chunk_size, None, False)
    V, H = weight.shape
    eps, zs, w = check_loss_options(reduction, label_smoothing, z_loss_scale, class_weights, V, hidden,
                                    "hidden")
    hidden, weight, bias = cast_head(hidden, weight, bias)
    if shift:
        hidden, labels = hidden[..., :-1, :], labels[..., 1:]
    shape = labels.shape
    if validate is None:
        validate = hidden.device.type == "cpu"
    if validate and hidden.device.type != "cpu":
        check_labels(labels, V, ignore_index)
    h2, l1 = hidden.reshape(-1, H), labels.reshape(-1)
    if chunk_size is None:
        chunk_size = auto_chunk_size(max(1, l1.numel()), V, hidden.dtype, hidden.device, H)
    needs = 0
    if torch.is_grad_enabled():
        needs = ((ops_linear.NEED_HIDDEN if h2.requires_grad else 0)
                 | (ops_linear.NEED_WEIGHT if weight.requires_grad else 0)
                 | (ops_linear.NEED_BIAS if (bias is not None and bias.requires_grad) else 0))
    if reduction != "none" and needs and ops_linear._FORWARD_GRAD is not False:
        # The gradient is known in the forward up to grad_output: 3 GEMMs per chunk, no recompute.
        loss, zl, _, _, _, _ = ops_linear.linear_cross_entropy_fwd_grad_op(
            h2, weight, bias, l1, ignore_index, temperature, logit_scale, softcap, int(chunk_size), eps, zs,
            w, reduction == "sum", needs, bool(return_z_loss))
        return (loss, zl) if return_z_loss else loss
    flags = MEAN_LOGIT if eps > 0 else 0
    logp, lse, _, _, mean, _ = linear_token_logprobs_op(
        h2, weight, bias, l1, ignore_index, temperature, logit_scale, softcap, flags, int(chunk_size),
        w if eps > 0 else None)
    return assemble_cross_entropy(
        logp.view(shape), lse.view(shape), mean.view(shape) if eps > 0 else None, labels,
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
