"""The distillation divergences from hidden states and LM heads, the logits never held whole: from both
models' (``pyalign::linear_distillation_loss``), and from the student's to a top-k teacher
(``pyalign::linear_topk_distillation_loss``)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pyalign import _checks
from pyalign._tensors import acc_dtype, cast_head, gathered
from pyalign.distill.divergence import checked_options, row_weights
from pyalign.distill.topk import checked_topk
from pyalign.ops.distill_topk import IGNORE
from pyalign.ops.linear.chunks import NEED_BIAS, NEED_HIDDEN, NEED_WEIGHT, auto_chunk_size
from pyalign.ops.linear_distill import linear_distillation_op, linear_topk_distillation_op

__all__ = ["linear_distillation_loss", "linear_topk_distillation_loss"]


def _needs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> int:
    if not torch.is_grad_enabled():
        return 0
    return ((NEED_HIDDEN if hidden.requires_grad else 0) | (NEED_WEIGHT if weight.requires_grad else 0)
            | (NEED_BIAS if (bias is not None and bias.requires_grad) else 0))


def checked_heads(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels,
                  reduction, *, suffix: str = "", logits_fn: str = "distillation_loss") -> None:
    """Both models' hidden states and LM heads (``suffix``: ``"_shard"`` for heads split by vocabulary
    rows) checked against each other, and a reduction with a fused gradient from hidden states."""
    for side, h, w, b in (("student", student_hidden, student_weight, student_bias),
                          ("teacher", teacher_hidden, teacher_weight, teacher_bias)):
        _checks.float_tensor(h, f"{side}_hidden")
        # without labels, the head's checks see labels of the right shape (every position kept)
        lab = labels if labels is not None else torch.zeros(h.shape[:-1], dtype=torch.long, device=h.device)
        _checks.head(h, w, b, lab, shift=False, hidden_name=f"{side}_hidden", weight_name=f"{side}_weight{suffix}",
                     bias_name=f"{side}_bias{suffix}")
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(f"teacher_hidden: expected the leading shape of student_hidden "
                         f"{tuple(student_hidden.shape[:-1])}, got {tuple(teacher_hidden.shape[:-1])}")
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(f"teacher_weight{suffix}: expected {student_weight.shape[0]} rows (the student's "
                         f"vocabulary{' shard' if suffix else ''}), got {teacher_weight.shape[0]}")
    _checks.same_device(("student_hidden", student_hidden), ("teacher_hidden", teacher_hidden))
    if reduction == "none":
        raise ValueError("reduction: 'none' has no fused gradient from hidden states; expected 'batchmean', "
                         f"'sum' or 'mean' (or use {logits_fn} on the logits)")


def linear_distillation_loss(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                             teacher_weight: Tensor, labels: Optional[Tensor] = None, *,
                             student_bias: Optional[Tensor] = None, teacher_bias: Optional[Tensor] = None,
                             beta: float = 0.5, temperature: float = 1.0, reduction: str = "batchmean",
                             ignore_index: int = -100, num_items_in_batch=None,
                             student_softcap: Optional[float] = None, teacher_softcap: Optional[float] = None,
                             chunk_size: Optional[int] = None, divergence: str = "jsd",
                             skew_alpha: float = 0.1) -> Tensor:
    """:func:`pyalign.distill.distillation_loss` of the logits ``student_hidden @ student_weight.T +
    student_bias`` and ``teacher_hidden @ teacher_weight.T + teacher_bias``, neither formed whole.

    ``student_hidden [..., Hs]``, ``teacher_hidden [..., Ht]`` of one leading shape (the hidden sizes
    may differ), ``student_weight [V, Hs]``, ``teacher_weight [V, Ht]`` (one vocabulary), biases
    ``[V]``; the same options as :func:`~pyalign.distill.distillation_loss` except ``reduction="none"``
    (a per-position result has no fused gradient: use the logits function). Gradients flow to every
    input of either head that requires grad (the teacher's usually do not, and then cost nothing).
    FSDP2-sharded (DTensor) weights are gathered for the call.

    Each chunk of ``chunk_size`` tokens (default: from V, H and the device, as the fused linear head
    chooses) costs both heads' logits GEMMs, the divergence kernel and, per head with gradients, two
    GEMMs (``dh = g @ W``, ``dW += g.T @ h``), all in the forward; the backward scales them. Transient
    memory: one chunk's two logits blocks and their fp32 gradients (plus an fp32 ``[V, H]``
    accumulator per bf16/fp16 head whose tokens span several chunks); ignored positions do no work.
    """
    student_weight, student_bias = gathered(student_weight), gathered(student_bias)
    teacher_weight, teacher_bias = gathered(teacher_weight), gathered(teacher_bias)
    checked_heads(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels,
                  reduction)
    (divergence, mix), temperature, caps, ignore_index = checked_options(
        beta, temperature, reduction, ignore_index, student_softcap, teacher_softcap, divergence, skew_alpha)
    _checks.chunk_size(chunk_size)
    hs, ws, bs = cast_head(student_hidden, student_weight, student_bias)
    ht, wt, bt = cast_head(teacher_hidden, teacher_weight, teacher_bias)
    if ht.dtype != hs.dtype:  # the divergence kernel reads both logits in one dtype
        ht, wt, bt = (None if t is None else t.to(hs.dtype) for t in (ht, wt, bt))
    V = ws.shape[0]
    hs2, ht2 = hs.reshape(-1, hs.shape[-1]), ht.reshape(-1, ht.shape[-1])
    n = hs2.shape[0]
    flat_labels = None if labels is None else labels.reshape(-1)
    if chunk_size is None:
        chunk_size = auto_chunk_size(max(1, n), V, hs.dtype, hs.device, max(hs2.shape[1], ht2.shape[1]))
    weight = row_weights(flat_labels, n, V, student_hidden.shape[0] if student_hidden.dim() > 1 else n, reduction,
                         ignore_index, num_items_in_batch, acc_dtype(hs), hs.device)
    out = linear_distillation_op(hs2, ws, bs, ht2, wt, bt, flat_labels, weight, divergence, mix, temperature, *caps,
                                 ignore_index, int(chunk_size), _needs(hs, ws, bs), _needs(ht, wt, bt))
    return out[0]


def linear_topk_distillation_loss(student_hidden: Tensor, student_weight: Tensor, teacher_topk_logprobs: Tensor,
                                  teacher_topk_ids: Tensor, labels: Optional[Tensor] = None, *,
                                  student_bias: Optional[Tensor] = None, divergence: str = "forward_kl",
                                  tail: str = "bucket", temperature: float = 1.0, reduction: str = "batchmean",
                                  ignore_index: int = -100, num_items_in_batch=None, validate: Optional[bool] = None,
                                  chunk_size: Optional[int] = None) -> Tensor:
    """:func:`pyalign.distill.topk_distillation_loss` of the student's logits ``student_hidden @
    student_weight.T + student_bias``, never formed whole, to a teacher given by its top-k log-probs and
    ids (the reduced distributions of Anshumann et al. 2025, arXiv:2503.16870: the K ids plus a tail
    bucket, or the K ids renormalized).

    ``student_hidden [..., H]`` (at least 2-d), ``student_weight [V, H]``, ``student_bias [V]``,
    ``teacher_topk_logprobs`` and ``teacher_topk_ids`` ``[..., K]`` of the hidden states' leading shape;
    the same options as :func:`~pyalign.distill.topk_distillation_loss` except ``reduction="none"`` (a
    per-position result has no fused gradient: use the logits function). Gradients flow to whichever of
    the hidden states, weight and bias require grad; FSDP2-sharded (DTensor) weights are gathered for
    the call.

    Each chunk of ``chunk_size`` tokens (default: from V, H and the device, as the fused linear head
    chooses) costs the logits GEMM, the log-prob forward kernel, ``[c, K]`` work, the backward kernel
    writing the gradient over the chunk's logits, and ``dh = g @ W``, ``dW += g.T @ h``: 3 GEMMs, all in
    the forward; the backward scales them. Transient memory: one chunk's logits block (which becomes
    its gradient) and ``[c, K]`` temporaries, plus an fp32 ``[V, H]`` accumulator for a bf16/fp16 head
    whose tokens span several chunks; ignored positions do no work.
    """
    student_weight, student_bias = gathered(student_weight), gathered(student_bias)
    _checks.float_tensor(student_hidden, "student_hidden")
    if student_hidden.dim() < 2:
        raise ValueError(f"student_hidden: expected [..., H] with at least 2 dimensions, got shape "
                         f"{tuple(student_hidden.shape)}")
    lead = student_hidden.shape[:-1]
    # without labels, the head's checks see labels of the right shape (every position kept)
    lab = labels if labels is not None else torch.zeros(lead, dtype=torch.long, device=student_hidden.device)
    _checks.head(student_hidden, student_weight, student_bias, lab, shift=False, hidden_name="student_hidden",
                 weight_name="student_weight", bias_name="student_bias")
    if reduction == "none":
        raise ValueError("reduction: 'none' has no fused gradient from hidden states; expected 'batchmean', "
                         "'sum' or 'mean' (or use topk_distillation_loss on the logits)")
    _checks.chunk_size(chunk_size)
    V = student_weight.shape[0]
    b, ids, flat_labels, temperature = checked_topk(
        ("student_hidden", student_hidden), lead, V, teacher_topk_logprobs, teacher_topk_ids, labels, divergence,
        tail, temperature, reduction, ignore_index, validate)
    hs, ws, bs = cast_head(student_hidden, student_weight, student_bias)
    hs2 = hs.reshape(-1, hs.shape[-1])
    n = hs2.shape[0]
    if chunk_size is None:
        chunk_size = auto_chunk_size(max(1, n), V, hs.dtype, hs.device, hs2.shape[1])
    weight = row_weights(flat_labels, n, V, student_hidden.shape[0], reduction, IGNORE, num_items_in_batch,
                         acc_dtype(hs), hs.device)
    out = linear_topk_distillation_op(hs2, ws, bs, b, ids, flat_labels, weight, divergence, tail, temperature,
                                      int(chunk_size), _needs(hs, ws, bs))
    return out[0]
