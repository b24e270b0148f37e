"""Float64 reference of the distillation divergences (pyalign.distill): the generalized JSD of GKD
(arXiv:2306.13649) per position, written directly from the definition with 0 log 0 = 0."""
from __future__ import annotations

import math

import torch


def _xlogy_ratio(p, log_p, log_q):
    """p (log p - log q), 0 where p is 0."""
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))


def _capped(x, cap):
    return x if cap is None else cap * torch.tanh(x / cap)


def _reduced(rows, labels, ignore_index, reduction, num_items_in_batch, logits_shape):
    """TRL's reductions of the per-position divergences (ignored positions left out)."""
    kept = torch.ones_like(rows) if labels is None else (labels != ignore_index).double()
    rows = torch.where(kept > 0, rows, torch.zeros_like(rows))
    if num_items_in_batch is not None:
        return rows.sum() / num_items_in_batch
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        return rows.sum() / max(float(kept.sum()) * logits_shape[-1], 1.0)
    return rows.sum() / (max(float(kept.sum()), 1.0) if labels is not None else max(logits_shape[0], 1))


def divergence_rows(student_logits, teacher_logits, *, beta=0.5, temperature=1.0, student_softcap=None,
                    teacher_softcap=None, divergence="jsd", skew_alpha=0.1):
    """The per-position divergence ``[...]`` (no masking, no reduction)."""
    ls = torch.log_softmax(_capped(student_logits.double(), student_softcap) / temperature, -1)
    lt = torch.log_softmax(_capped(teacher_logits.double(), teacher_softcap) / temperature, -1)
    ps, pt = ls.exp(), lt.exp()
    if divergence == "tvd":
        return 0.5 * (ps - pt).abs().sum(-1)
    if divergence in ("skew_kl", "skew_reverse_kl"):  # DistiLLM's skew KL divergences
        a = skew_alpha
        p, lp, lq = (pt, lt, ls) if divergence == "skew_kl" else (ps, ls, lt)
        lm = torch.logaddexp(lp + math.log(a) if a > 0 else torch.full_like(lp, -math.inf), lq + math.log1p(-a))
        return _xlogy_ratio(p, lp, lm).sum(-1)
    if beta == 0:
        return _xlogy_ratio(pt, lt, ls).sum(-1)
    if beta == 1:
        return _xlogy_ratio(ps, ls, lt).sum(-1)
    lm = torch.logaddexp(ls + math.log1p(-beta), lt + math.log(beta))  # log((1 - beta) p_s + beta p_t)
    return beta * _xlogy_ratio(pt, lt, lm).sum(-1) + (1 - beta) * _xlogy_ratio(ps, ls, lm).sum(-1)


def distillation_loss(student_logits, teacher_logits, labels=None, *, beta=0.5, temperature=1.0,
                      reduction="batchmean", ignore_index=-100, num_items_in_batch=None, student_softcap=None,
                      teacher_softcap=None, divergence="jsd", skew_alpha=0.1):
    rows = divergence_rows(student_logits, teacher_logits, beta=beta, temperature=temperature,
                           student_softcap=student_softcap, teacher_softcap=teacher_softcap, divergence=divergence,
                           skew_alpha=skew_alpha)
    return _reduced(rows, labels, ignore_index, reduction, num_items_in_batch, student_logits.shape)


def topk_distillation_loss(student_logits, teacher_topk_logprobs, teacher_topk_ids, labels=None, *,
                           divergence="forward_kl", tail="bucket", temperature=1.0, reduction="batchmean",
                           ignore_index=-100, num_items_in_batch=None):
    """The divergence on the reduced distributions (the K ids, plus the rest as one outcome with
    ``tail="bucket"``), from the student's full softmax, written directly."""
    ls = torch.log_softmax(student_logits.double() / temperature, -1)
    a = ls.gather(-1, teacher_topk_ids.long())
    b = teacher_topk_logprobs.double()
    if tail == "renormalize":
        a, b = a - torch.logsumexp(a, -1, keepdim=True), b - torch.logsumexp(b, -1, keepdim=True)
    elif a.shape[-1] < ls.shape[-1]:  # K = V: no entry outside the ids, no tail outcome
        # the student's mass outside the ids, summed directly over those entries
        outside = torch.ones_like(ls, dtype=torch.bool).scatter(-1, teacher_topk_ids.long(), False)
        a_tail = torch.logsumexp(ls.masked_fill(~outside, -math.inf), -1, keepdim=True)
        b_tail = torch.log((1 - b.exp().sum(-1, keepdim=True)).clamp_min(0))
        a, b = torch.cat([a, a_tail], -1), torch.cat([b, b_tail], -1)
    p, q = (b.exp(), a.exp()) if divergence == "forward_kl" else (a.exp(), b.exp())
    lp, lq = (b, a) if divergence == "forward_kl" else (a, b)
    rows = _xlogy_ratio(p, lp, lq).sum(-1)
    return _reduced(rows, labels, ignore_index, reduction, num_items_in_batch, student_logits.shape)
