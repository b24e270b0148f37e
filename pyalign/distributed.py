"""Vocab-parallel log-probs: each rank holds the columns ``[vocab_start, vocab_start + V_local)``
of the logits (or the matching rows of the LM head weight), the results are exact over the whole
vocabulary.

Every rank computes, with the log-prob kernels in vocabulary-slice mode, its shard's statistics
per token: ``lse_k`` (log-sum-exp of the transformed logits), ``H_k`` (entropy of the softmax
restricted to the shard), the raw logit of the label when the label lies in the shard,
``log sum p_k^2``, the sum of the transformed logits, and (for ``is_top1``) the shard's largest
raw logit. One ``all_gather`` of these small ``[7, tokens]`` tables (plus each rank's
``(vocab_start, V_local)``, used to check that the shards tile the vocabulary) is the only
collective of the forward; every rank then combines them identically, with
``w_k = exp(lse_k - lse)``:

    lse = logsumexp_k lse_k,   H = sum_k w_k (H_k - log w_k),   log sum p^2 = logsumexp_k (lss_k + 2 log w_k).

These forms use only shard-level log-sum-exps, never raw logits, so they keep the precision of
the single-process kernel at large logits. The backward needs no collective for the logits: the
gradient of each shard is the single-process formula with the global ``lse`` and ``H``, plus
the upstream gradients of ``lse`` (``d lse/dz_v = p_v``) and ``mean_logit`` (``1 / V`` of the whole
vocabulary) folded into the same slice kernel. The fused linear variant all-reduces ``dhidden``
(a sum over the shards' partial products) once.

Labels must be the same on every rank. Collectives take a process group, which no op schema can
carry, so the ops behind these functions (:mod:`pyalign.ops.vocab_parallel`) are
``torch.autograd.Function``s: eager only, not traced by ``torch.compile``. A composite over the
log-prob kernels (vocabulary-slice mode) and, for the linear variant, the fused head's chunk loops.

Vocab-parallel distillation (:func:`vocab_parallel_distillation_loss`): each rank holds the same
columns of the student's and the teacher's logits; one ``all_gather`` of each row's two local
log-sum-exps gives the global normalizers, one ``all_reduce`` of each row's local parts of the
divergence gives the divergence, and each rank forms its shard's gradients
(:mod:`pyalign.ops.vocab_parallel_distill`); from both models' hidden states and their heads split by
vocabulary rows (:func:`vocab_parallel_linear_distillation_loss`), the same per token chunk. To a top-k teacher
(:func:`vocab_parallel_topk_distillation_loss`): one ``all_gather`` of the student's local
log-sum-exps and one ``all_reduce`` of its logits at the teacher's ids.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from pyalign import _checks
from pyalign._outputs import package, requested
from pyalign._tensors import cast_head
from pyalign.ops.linear import auto_chunk_size
from pyalign._tensors import acc_dtype
from pyalign.distill.divergence import checked_labels, checked_options, row_weights
from pyalign.ops.vocab_parallel import VocabParallelLinear, VocabParallelLogprobs, group_info, resolve_start
from pyalign.distill.linear import checked_heads
from pyalign.distill.topk import checked_topk
from pyalign.ops.distill_topk import IGNORE
from pyalign.ops.vocab_parallel_distill import (VocabParallelDistillation, VocabParallelLinearDistillation,
                                                VocabParallelTopkDistillation, shard_layout)

__all__ = ["vocab_parallel_token_logprobs", "vocab_parallel_linear_token_logprobs",
           "vocab_parallel_distillation_loss", "vocab_parallel_linear_distillation_loss",
           "vocab_parallel_topk_distillation_loss"]


def vocab_parallel_token_logprobs(
    logits_shard: Tensor,
    labels: Tensor,
    *,
    group=None,
    vocab_start: Optional[int] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    shift: bool = False,
    return_entropy: bool = False,
    outputs: Optional[Sequence[str]] = None,
    validate: Optional[bool] = None,
):
    """:func:`pyalign.logprob.token_logprobs` over a vocabulary split across the ranks of ``group``.

    ``logits_shard`` is ``[..., V_local]``: this rank's columns ``[vocab_start, vocab_start +
    V_local)`` of the full logits; ``labels`` (``[...]``, the same on every rank) index the full
    vocabulary. ``vocab_start=None`` places the shards in rank order (one extra tiny
    ``all_gather`` of the shard sizes). Results and options are those of ``token_logprobs`` on the
    concatenated logits (``outputs`` may include ``"lse"``); the gradient flows to ``logits_shard``
    through the log-probs, the entropy, ``lse`` and ``mean_logit``.

    Raises ValueError (on every rank) when the shards do not tile ``[0, V)`` or a label lies
    outside ``[0, V)`` (checked on CPU always; on CUDA only with ``validate=True``, a host sync).
    """
    _checks.float_tensor(logits_shard, "logits_shard")
    _checks.index_tensor(labels, "labels")
    _checks.same_device(("logits_shard", logits_shard), ("labels", labels))
    if logits_shard.dim() < 1 or logits_shard.shape[-1] < 1:
        raise ValueError(f"logits_shard: expected shape [..., V_local] with V_local >= 1, got "
                         f"{tuple(logits_shard.shape)}")
    if tuple(labels.shape) != tuple(logits_shard.shape[:-1]):
        raise ValueError(f"labels: expected shape {tuple(logits_shard.shape[:-1])} (the leading shape of "
                         f"logits_shard), got {tuple(labels.shape)}")
    if shift and logits_shard.dim() < 2:
        raise ValueError(f"shift=True: logits_shard needs a sequence dimension, got {tuple(logits_shard.shape)}")
    temperature, logit_scale, softcap = _checks.logit_options(ignore_index, temperature, logit_scale, softcap)
    flags, wanted = requested(outputs, return_entropy)
    group_info(group)
    if logits_shard.stride(-1) != 1 and logits_shard.shape[-1] > 1:
        logits_shard = logits_shard.contiguous()
    start = resolve_start(vocab_start, logits_shard.shape[-1], group, logits_shard.device)
    if validate is None:
        validate = logits_shard.device.type == "cpu"
    out_shape = labels[..., 1:].shape if shift else labels.shape
    res = VocabParallelLogprobs.apply(logits_shard, labels, group, start, ignore_index,
                                       (temperature, logit_scale, softcap), bool(shift), flags, bool(validate))
    logp, lse, ent, lss, mean, top1 = res
    return package((logp, ent, lss, mean, top1, lse), out_shape, wanted, outputs, return_entropy)


def vocab_parallel_linear_token_logprobs(
    hidden: Tensor,
    weight_shard: Tensor,
    labels: Tensor,
    *,
    bias_shard: Optional[Tensor] = None,
    group=None,
    vocab_start: Optional[int] = None,
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
    """:func:`pyalign.logprob.linear_token_logprobs` with the LM head split by vocabulary rows.

    ``hidden`` (``[..., H]``) and ``labels`` are the same on every rank; ``weight_shard`` is
    ``[V_local, H]``, rows ``[vocab_start, vocab_start + V_local)`` of the full head, and
    ``bias_shard`` the matching ``[V_local]``. Each rank computes its shard chunk by chunk (no
    ``[tokens, V_local]`` logits are held); the forward makes one ``all_gather`` of per-token
    statistics, the backward one ``all_reduce`` of ``dhidden`` (so ``hidden.grad`` is the full
    gradient on every rank), while ``weight_shard`` and ``bias_shard`` get their shard's gradient.
    ``outputs`` may include ``"lse"``; gradients flow through the log-probs, the entropy, ``lse`` and
    ``mean_logit``. Dtypes as in :func:`pyalign.logprob.linear_token_logprobs`: fp32/bf16/fp16 tensors
    of different dtypes run in the promoted dtype (or autocast's), each gradient in its input's
    dtype; the backward's loop order (token-outer or vocab-blocked) is chosen as there.
    """
    _checks.head(hidden, weight_shard, bias_shard, labels, shift=shift, weight_name="weight_shard",
                 bias_name="bias_shard")
    temperature, logit_scale, softcap = _checks.logit_options(ignore_index, temperature, logit_scale, softcap)
    _checks.chunk_size(chunk_size)
    flags, wanted = requested(outputs, return_entropy)
    group_info(group)
    hidden, weight_shard, bias_shard = cast_head(hidden, weight_shard, bias_shard)
    if shift:
        hidden, labels = hidden[..., :-1, :], labels[..., 1:]
    out_shape = labels.shape
    v_local, H = weight_shard.shape
    start = resolve_start(vocab_start, v_local, group, hidden.device)
    if validate is None:
        validate = hidden.device.type == "cpu"
    h2, l1 = hidden.reshape(-1, H), labels.reshape(-1)
    if chunk_size is None:
        chunk_size = auto_chunk_size(max(1, l1.numel()), v_local, hidden.dtype, hidden.device, H)
    res = VocabParallelLinear.apply(h2, weight_shard, bias_shard, l1, group, start, ignore_index,
                                     (temperature, logit_scale, softcap), flags, int(chunk_size), bool(validate))
    logp, lse, ent, lss, mean, top1 = res
    return package((logp, ent, lss, mean, top1, lse), out_shape, wanted, outputs, return_entropy)


def vocab_parallel_distillation_loss(
    student_shard: Tensor,
    teacher_shard: Tensor,
    labels: Optional[Tensor] = None,
    *,
    group=None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    ignore_index: int = -100,
    num_items_in_batch=None,
    student_softcap: Optional[float] = None,
    teacher_softcap: Optional[float] = None,
) -> Tensor:
    """:func:`pyalign.distill.distillation_loss` over a vocabulary split across the ranks of ``group``.

    ``student_shard`` and ``teacher_shard`` are ``[..., V_local]``: this rank's columns of the full
    student and teacher logits (the same columns of both; any split, in any order, as long as the
    ranks' columns tile the vocabulary together). ``labels`` and the options are those of
    ``distillation_loss`` and must be the same on every rank; ``reduction="none"`` gives the
    per-position divergence (no gradient through it). The result is the same on every rank; the
    gradient flows to each rank's shards (the teacher's when it requires grad).
    """
    _checks.float_tensor(student_shard, "student_shard")
    _checks.float_tensor(teacher_shard, "teacher_shard")
    _checks.same_device(("student_shard", student_shard), ("teacher_shard", teacher_shard), ("labels", labels))
    if student_shard.dim() < 2 or student_shard.shape[-1] < 1:
        raise ValueError(f"student_shard: expected [..., V_local] with at least 2 dimensions and V_local >= 1, "
                         f"got {tuple(student_shard.shape)}")
    if teacher_shard.shape != student_shard.shape:
        raise ValueError(f"teacher_shard: expected the shape of student_shard {tuple(student_shard.shape)}, got "
                         f"{tuple(teacher_shard.shape)}")
    (_, beta), temperature, caps, ignore_index = checked_options(beta, temperature, reduction, ignore_index,
                                                                 student_softcap, teacher_softcap)
    lead, v_local = student_shard.shape[:-1], student_shard.shape[-1]
    checked_labels(labels, lead)
    group_info(group)
    if teacher_shard.dtype != student_shard.dtype:
        teacher_shard = teacher_shard.to(student_shard.dtype)
    s2, t2 = student_shard.reshape(-1, v_local), teacher_shard.reshape(-1, v_local)
    flat = None if labels is None else labels.reshape(-1)
    V = torch.tensor(v_local, device=student_shard.device)
    dist.all_reduce(V, group=group)  # the whole vocabulary's size, for reduction="mean"
    acc = acc_dtype(student_shard)
    weight = row_weights(flat, s2.shape[0], int(V), student_shard.shape[0], reduction, ignore_index,
                         num_items_in_batch, acc, student_shard.device)
    kept = torch.ones(s2.shape[0], dtype=torch.bool, device=s2.device) if flat is None else flat != ignore_index
    teacher_grad = teacher_shard.requires_grad and torch.is_grad_enabled()
    total, rows = VocabParallelDistillation.apply(s2, t2, weight, kept, group, beta, temperature, caps, teacher_grad)
    if reduction == "none" and num_items_in_batch is None:
        return rows.reshape(lead)
    return total


def vocab_parallel_linear_distillation_loss(
    student_hidden: Tensor,
    student_weight_shard: Tensor,
    teacher_hidden: Tensor,
    teacher_weight_shard: Tensor,
    labels: Optional[Tensor] = None,
    *,
    student_bias_shard: Optional[Tensor] = None,
    teacher_bias_shard: Optional[Tensor] = None,
    group=None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    ignore_index: int = -100,
    num_items_in_batch=None,
    student_softcap: Optional[float] = None,
    teacher_softcap: Optional[float] = None,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """:func:`pyalign.distill.linear_distillation_loss` with both LM heads split by vocabulary rows.

    ``student_hidden [..., Hs]`` and ``teacher_hidden [..., Ht]`` (the same on every rank), this
    rank's rows of the student's head ``student_weight_shard [V_local, Hs]`` and of the teacher's
    ``teacher_weight_shard [V_local, Ht]`` (the same vocabulary rows of both, any split), biases
    ``[V_local]``. Options as :func:`vocab_parallel_distillation_loss` (reductions other than
    ``"none"``). Per chunk of ``chunk_size`` tokens each rank forms its columns of both logits three
    times (for the local log-sum-exps, gathered; for the local parts of the divergence, reduced; for
    the gradients), never all ``[tokens, V_local]`` at once. The hidden states' gradients are
    all-reduced (the full gradient on every rank); each head shard gets its own. Gradients flow to
    every input that requires grad.
    """
    checked_heads(student_hidden, student_weight_shard, student_bias_shard, teacher_hidden, teacher_weight_shard,
                  teacher_bias_shard, labels, reduction, suffix="_shard", logits_fn="vocab_parallel_distillation_loss")
    (_, beta), temperature, caps, ignore_index = checked_options(beta, temperature, reduction, ignore_index,
                                                                 student_softcap, teacher_softcap)
    _checks.chunk_size(chunk_size)
    group_info(group)
    hs, ws, bs = cast_head(student_hidden, student_weight_shard, student_bias_shard)
    ht, wt, bt = cast_head(teacher_hidden, teacher_weight_shard, teacher_bias_shard)
    v_local = ws.shape[0]
    hs2, ht2 = hs.reshape(-1, hs.shape[-1]), ht.reshape(-1, ht.shape[-1])
    n = hs2.shape[0]
    flat = None if labels is None else labels.reshape(-1)
    V = torch.tensor(v_local, device=hs.device)
    dist.all_reduce(V, group=group)
    acc = acc_dtype(hs)
    weight = row_weights(flat, n, int(V), student_hidden.shape[0] if student_hidden.dim() > 1 else n, reduction,
                         ignore_index, num_items_in_batch, acc, hs.device)
    kept = torch.ones(n, dtype=torch.bool, device=hs.device) if flat is None else flat != ignore_index
    if chunk_size is None:
        chunk_size = auto_chunk_size(max(1, n), v_local, hs.dtype, hs.device, max(hs2.shape[1], ht2.shape[1]))
    grad_on = torch.is_grad_enabled()
    needs = [tuple(grad_on and x is not None and x.requires_grad for x in side) for side in ((hs2, ws, bs),
                                                                                             (ht2, wt, bt))]
    total, _ = VocabParallelLinearDistillation.apply(hs2, ws, bs, ht2, wt, bt, weight, kept, group, beta, temperature,
                                                     caps, int(chunk_size), needs[0], needs[1])
    return total


def vocab_parallel_topk_distillation_loss(
    student_shard: Tensor,
    teacher_topk_logprobs: Tensor,
    teacher_topk_ids: Tensor,
    labels: Optional[Tensor] = None,
    *,
    group=None,
    vocab_start: Optional[int] = None,
    divergence: str = "forward_kl",
    tail: str = "bucket",
    temperature: float = 1.0,
    reduction: str = "batchmean",
    ignore_index: int = -100,
    num_items_in_batch=None,
    validate: Optional[bool] = None,
) -> Tensor:
    """:func:`pyalign.distill.topk_distillation_loss` with the student's logits split by vocabulary
    columns across the ranks of ``group``.

    ``student_shard`` is ``[..., V_local]``: this rank's columns ``[vocab_start, vocab_start +
    V_local)`` of the student's logits (``vocab_start=None``: the shards in rank order). The teacher's
    ``teacher_topk_logprobs`` / ``teacher_topk_ids`` (``[..., K]``, ids into the whole vocabulary),
    ``labels`` and the options are those of ``topk_distillation_loss`` and the same on every rank. The
    result is the same on every rank; the gradient flows to each rank's shard. Raises ValueError on
    every rank when the shards do not tile ``[0, V)``, and (with ``validate``, default on CPU) when
    the teacher's ids or log-probs are not a sub-distribution over distinct ids in ``[0, V)``.
    """
    _checks.float_tensor(student_shard, "student_shard")
    if student_shard.dim() < 2 or student_shard.shape[-1] < 1:
        raise ValueError(f"student_shard: expected [..., V_local] with at least 2 dimensions and V_local >= 1, "
                         f"got {tuple(student_shard.shape)}")
    lead, v_local = student_shard.shape[:-1], student_shard.shape[-1]
    group_info(group)
    start = resolve_start(vocab_start, v_local, group, student_shard.device)
    V = shard_layout(start, v_local, group, student_shard.device)
    b, ids, flat, temperature = checked_topk(("student_shard", student_shard), lead, V, teacher_topk_logprobs,
                                             teacher_topk_ids, labels, divergence, tail, temperature, reduction,
                                             ignore_index, validate)
    ids = ids.long()
    kept = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device) if flat is None else flat != IGNORE
    s2 = student_shard.reshape(-1, v_local)
    if s2.stride(-1) != 1:
        s2 = s2.contiguous()
    weight = row_weights(flat, s2.shape[0], V, student_shard.shape[0], reduction, IGNORE, num_items_in_batch,
                         acc_dtype(student_shard), student_shard.device)
    total, rows = VocabParallelTopkDistillation.apply(s2, b, ids, weight, kept, group, start, V, divergence, tail,
                                                      temperature)
    if reduction == "none" and num_items_in_batch is None:
        return rows.reshape(lead)
    return total
