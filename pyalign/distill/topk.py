"""Distillation from a sparse teacher given as its top-k log-probs and token ids per position
(``pyalign::topk_distillation_loss``)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from pyalign import _checks
from pyalign._tensors import acc_dtype
from pyalign.distill.divergence import bump_version, checked_inplace, checked_labels, checked_options, row_weights
from pyalign.ops.distill import inplace_gradient_op
from pyalign.ops.distill_topk import (DIVERGENCES as TOPK_DIVERGENCES, IGNORE, TAILS, topk_distillation_inplace_op,
                                      topk_distillation_op)

__all__ = ["topk_distillation_loss", "MASS_TOLERANCE"]

# How far past 1 the teacher's top-k probabilities may sum (stored log-probs are rounded).
MASS_TOLERANCE = 1e-3


def topk_distillation_loss(student_logits: Tensor, teacher_topk_logprobs: Tensor, teacher_topk_ids: Tensor,
                           labels: Optional[Tensor] = None, *, divergence: str = "forward_kl", tail: str = "bucket",
                           temperature: float = 1.0, reduction: str = "batchmean", ignore_index: int = -100,
                           num_items_in_batch=None, validate: Optional[bool] = None,
                           inplace_backward: bool = False) -> Tensor:
    """A divergence between the student's softmax of ``student_logits / temperature`` (``[..., V]``) and
    a teacher known only by its top-k log-probs ``teacher_topk_logprobs [..., K]`` at the token ids
    ``teacher_topk_ids [..., K]`` (as stored offline or returned by an inference server; used as given,
    the temperature applies to the student).

    Both distributions are reduced to the same outcomes, the usual treatment of cached top-K teacher
    probabilities (whose bias against full distillation Anshumann et al. 2025, "Sparse Logit Sampling:
    Accelerating Knowledge Distillation in LLMs", arXiv:2503.16870, analyse):

    - ``tail="bucket"``: the K ids plus one outcome for everything else, holding the teacher's
      remaining mass ``1 - sum(exp(topk))`` and the student's mass outside the ids (both formed as
      ``log(1 - exp(logsumexp))``, accurate when a tail is ~0 or ~1);
    - ``tail="renormalize"``: the K ids alone, each side renormalized over them.

    ``divergence``: ``"forward_kl"`` (KL(teacher || student)) or ``"reverse_kl"`` (KL(student ||
    teacher)); with ``tail="bucket"`` the reverse KL is infinite where the teacher's tail is exactly 0
    but the student's is not (its true value). Outcomes of probability 0 contribute 0. ``labels``,
    ``ignore_index``, ``reduction`` and ``num_items_in_batch`` as in
    :func:`pyalign.distill.distillation_loss`. The gradient flows to the student's logits.
    ``validate``: check the teacher's ids (in range, distinct per position) and log-probs (at most 0,
    summing to at most 1 beyond rounding); default on CPU (cheap), not on CUDA (a host sync), never
    under ``torch.compile`` (unchecked, an out-of-range id trips torch's own index check in ``gather``).

    The student's full softmax enters through its log-sum-exp alone: the log-prob kernels' forward (one
    read of the logits) and backward (one read and one write) plus ``[N, K]`` work.

    ``inplace_backward``: the gradient is written over the student's logits in this call (the log-prob
    backward kernel reads each entry before writing over it), as in
    :func:`pyalign.distill.distillation_loss`: the logits are consumed, the backward scales that storage
    in place and returns it (for a view of another tensor requiring grad, through ``as_strided``); refused
    for logits that are not contiguous. The same bits as without it, in every dtype (the gradient is in
    the logits' dtype either way).
    """
    _checks.float_tensor(student_logits, "student_logits")
    if student_logits.dim() < 2:
        raise ValueError(f"student_logits: expected [..., V] with at least 2 dimensions, got shape "
                         f"{tuple(student_logits.shape)}")
    lead, V = student_logits.shape[:-1], student_logits.shape[-1]
    b, ids, flat_labels, temperature = checked_topk(
        ("student_logits", student_logits), lead, V, teacher_topk_logprobs, teacher_topk_ids, labels, divergence,
        tail, temperature, reduction, ignore_index, validate)
    weight = row_weights(flat_labels, ids.shape[0], V, student_logits.shape[0], reduction, IGNORE,
                         num_items_in_batch, acc_dtype(student_logits), student_logits.device)
    args = (b, ids, flat_labels, weight, divergence, tail, temperature)
    if inplace_backward and student_logits.requires_grad and torch.is_grad_enabled():
        checked_inplace(student_logits, "student_logits", ("teacher_topk_logprobs", teacher_topk_logprobs))
        with torch.no_grad():
            total, rows = topk_distillation_inplace_op(student_logits.detach().view(-1, V), *args)
        bump_version(student_logits)
        total, rows = inplace_gradient_op(student_logits.view(-1, V), total, rows, weight, None,
                                          weight.new_empty(0))
    else:
        total, rows, _ = topk_distillation_op(student_logits.reshape(-1, V), *args)
    if reduction == "none" and num_items_in_batch is None:
        return rows.reshape(lead)
    return total


def checked_topk(student, lead, V, teacher_topk_logprobs, teacher_topk_ids, labels, divergence, tail, temperature,
                 reduction, ignore_index, validate):
    """The top-k teacher and the options of a student of leading shape ``lead`` and vocabulary ``V``
    (``student``: its ``(name, tensor)``), checked: ``(log-probs [N, K], ids [N, K], labels [N] with
    IGNORE for the ignored rows or None, temperature)``."""
    name, like = student
    _checks.float_tensor(teacher_topk_logprobs, "teacher_topk_logprobs")
    _checks.index_tensor(teacher_topk_ids, "teacher_topk_ids")
    _checks.same_device((name, like), ("teacher_topk_logprobs", teacher_topk_logprobs),
                        ("teacher_topk_ids", teacher_topk_ids), ("labels", labels))
    _checks.choice(divergence, "divergence", TOPK_DIVERGENCES)
    _checks.choice(tail, "tail", TAILS)
    _, temperature, _, ignore_index = checked_options(0.0, temperature, reduction, ignore_index, None, None)
    if teacher_topk_logprobs.shape[:-1] != lead or teacher_topk_logprobs.dim() != len(lead) + 1:
        raise ValueError(f"teacher_topk_logprobs: expected shape {tuple(lead)} + [K], got "
                         f"{tuple(teacher_topk_logprobs.shape)}")
    K = teacher_topk_logprobs.shape[-1]
    if teacher_topk_ids.shape != teacher_topk_logprobs.shape:
        raise ValueError(f"teacher_topk_ids: expected the shape of teacher_topk_logprobs "
                         f"{tuple(teacher_topk_logprobs.shape)}, got {tuple(teacher_topk_ids.shape)}")
    if not 1 <= K <= V:
        raise ValueError(f"teacher_topk_logprobs: expected 1 <= K <= V = {V} entries per position, got K = {K}")
    checked_labels(labels, lead)
    ids, b = teacher_topk_ids.reshape(-1, K), teacher_topk_logprobs.reshape(-1, K)
    flat_labels = None if labels is None else labels.reshape(-1)
    if validate is None:
        validate = like.device.type == "cpu"
    if validate and not torch.compiler.is_compiling():
        _check_teacher(ids, b, V, None if flat_labels is None else flat_labels != ignore_index)
    if flat_labels is not None and ignore_index != IGNORE:  # the op knows one ignore value
        flat_labels = torch.where(flat_labels == ignore_index, IGNORE, torch.where(flat_labels == IGNORE, 0,
                                                                                   flat_labels))
    return b, ids, flat_labels, temperature


def _check_teacher(ids: Tensor, logprobs: Tensor, V: int, kept: Optional[Tensor]) -> None:
    """The teacher's top-k must be a sub-distribution over distinct in-range ids (at the kept rows)."""
    if kept is not None:
        ids, logprobs = ids[kept], logprobs[kept]
    if ids.numel() == 0:
        return
    if bool(((ids < 0) | (ids >= V)).any()):
        bad = ids[(ids < 0) | (ids >= V)][0].item()
        raise ValueError(f"teacher_topk_ids: expected ids in [0, {V}), got {bad}")
    if ids.shape[-1] > 1 and bool((ids.sort(-1).values.diff(dim=-1) == 0).any()):
        raise ValueError("teacher_topk_ids: expected distinct ids within each position, got a duplicate")
    lp = logprobs.double()
    if bool(torch.isnan(lp).any()) or bool((lp > MASS_TOLERANCE).any()):
        raise ValueError("teacher_topk_logprobs: expected log-probabilities (<= 0, no NaN), got "
                         f"{lp[torch.isnan(lp) | (lp > MASS_TOLERANCE)][0].item()}")
    mass = torch.logsumexp(lp, -1)
    if bool((mass > math.log1p(MASS_TOLERANCE)).any()):
        raise ValueError(f"teacher_topk_logprobs: expected probabilities summing to at most 1 per position "
                         f"(beyond rounding, {MASS_TOLERANCE}), got {mass.exp().max().item():.6g}")
