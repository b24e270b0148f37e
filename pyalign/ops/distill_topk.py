"""The divergence to a sparse (top-k) teacher: ``pyalign::topk_distillation_loss``.

The teacher is given per position as K log-probs at K token ids (stored offline, or returned by an
inference server). Both distributions are reduced to the same outcomes: the K ids and, with
``tail="bucket"``, one more outcome holding the mass outside them (the teacher's ``1 - sum exp``, the
student's own mass outside the ids); with ``tail="renormalize"``, the K ids alone, each side
renormalized over them. The student's full softmax enters through its log-sum-exp only, so the op is
the log-prob kernels' forward (the row statistics, one read of the logits) and their backward (the
dense part of the gradient, ``c_r p_j`` for every entry, one read and one write), plus ``[N, K]``
work: the reduced divergence and the corrections at the K ids.

In terms of the student's logits z (after the temperature) and the reduced distributions q_s, q_t
over outcomes o, with o(j) the outcome of entry j and g(o) = dL/dq_s(o),
dL/dz_j = p_j (g(o(j)) - sum_o q_s(o) g(o)): for the forward KL g = -q_t / q_s, for the reverse KL
g = log q_s - log q_t + 1; the entries outside the ids share one coefficient (the tail's), which is
the dense part.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pyalign._tensors import acc_dtype
from pyalign.ops._op import kernel_op
from pyalign.ops.distill import row_scale
from pyalign.ops.logprob import backward_rows, forward_rows

DIVERGENCES = ("forward_kl", "reverse_kl")
TAILS = ("bucket", "renormalize")
IGNORE = -100


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate for x near 0 and very negative (Maechler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _xlogy_diff(p: Tensor, lp: Tensor, lq: Tensor) -> Tensor:
    """p (lp - lq), 0 where p is 0."""
    return torch.where(p > 0, p * (lp - lq), torch.zeros_like(p))


def reduced_divergence(a: Tensor, b: Tensor, divergence: str, tail: str, vocab: int):
    """``(rows [N], g_ids [N, K], c [N])`` from the student's log-probs ``a`` and the teacher's ``b`` at
    the ids: each row's divergence on the reduced distributions, its gradient w.r.t. the student's
    logits at the ids (``g_ids``) and the coefficient of ``p_j`` at every other entry (``c``), in terms
    of the logits after the temperature. With K = V there is no entry outside the ids, so no tail
    outcome (its masses would be rounding alone)."""
    bucket = tail == "bucket" and a.shape[-1] < vocab
    if tail == "renormalize":
        a = a - torch.logsumexp(a, -1, keepdim=True)
        b = b - torch.logsumexp(b, -1, keepdim=True)
    qs, qt = a.exp(), b.exp()
    if bucket:
        a_tail = _log1mexp(torch.logsumexp(a, -1).clamp(max=0))
        b_tail = _log1mexp(torch.logsumexp(b, -1).clamp(max=0))  # rounding can push the sum past 1
        qs_tail, qt_tail = a_tail.exp(), b_tail.exp()
    if divergence == "forward_kl":
        rows = _xlogy_diff(qt, b, a).sum(-1)
        g_ids = qs - qt
        c = torch.zeros_like(rows)
        if bucket:
            rows = rows + _xlogy_diff(qt_tail, b_tail, a_tail)
            c = torch.where(qt_tail > 0, 1 - torch.exp(b_tail - a_tail), torch.ones_like(rows))
    else:
        rows = _xlogy_diff(qs, a, b).sum(-1)
        if bucket:
            rows = rows + _xlogy_diff(qs_tail, a_tail, b_tail)
        g_ids = torch.where(qs > 0, qs * (a - b - rows.unsqueeze(-1)), torch.zeros_like(qs))
        c = (a_tail - b_tail - rows) if bucket else torch.zeros_like(rows)
    return rows, g_ids, c


def topk_rows_into(grad: Tensor, logits: Tensor, teacher_logprobs: Tensor, teacher_ids: Tensor,
                   labels: Optional[Tensor], weight: Tensor, divergence: str, tail: str, temperature: float
                   ) -> tuple[Tensor, Tensor]:
    """``(total [], per-row divergences [N])`` of rows ``[N, V]`` of the student's logits, the gradient of
    ``total = sum weight * rows`` w.r.t. them written into ``grad`` (``[N, V]`` in the logits' dtype),
    which may be ``logits`` itself: every read of the logits (the forward kernel, the gather at the ids)
    comes before the backward kernel, which reads each entry before writing its gradient over it
    (``csrc/{cpu,cuda}/logprob``), and the corrections at the ids are added to the gradient alone."""
    n = logits.shape[0]
    acc = acc_dtype(logits)
    kept = torch.ones(n, dtype=torch.bool, device=logits.device) if labels is None else labels != IGNORE
    lab = torch.where(kept, teacher_ids[:, 0].long(), IGNORE)  # any valid id: only the lse is used
    logp = torch.empty(n, dtype=acc, device=logits.device)
    lse = torch.empty(n, dtype=acc, device=logits.device)
    forward_rows(logits, lab, logp, lse, None, None, None, None, temperature, 1.0, 0.0, IGNORE)
    ids = teacher_ids.long()
    a = logits.gather(1, ids).to(acc) / temperature - lse.unsqueeze(-1)
    rows, g_ids, c = reduced_divergence(a, teacher_logprobs.to(acc), divergence, tail, logits.shape[1])
    zero = torch.zeros_like(rows)
    rows = torch.where(kept, rows, zero)
    w = torch.where(kept, weight, zero)
    # the dense part: w c p_j at every entry (d lse / dz_j = p_j), then the ids' own gradient
    backward_rows(logits, lab, lse, None, None, None, grad, temperature, 1.0, 0.0, IGNORE, w * c)
    p_ids = a.exp()
    corr = (g_ids - c.unsqueeze(-1) * p_ids) * (w / temperature).unsqueeze(-1)
    corr = torch.where(kept.unsqueeze(-1), corr, torch.zeros_like(corr))  # whatever ignored rows hold
    grad.scatter_add_(1, ids, corr.to(grad.dtype))
    return (w * rows).sum(), rows


@kernel_op("topk_distillation_loss")
def topk_distillation_op(logits: Tensor, teacher_logprobs: Tensor, teacher_ids: Tensor, labels: Optional[Tensor],
                         weight: Tensor, divergence: str, tail: str, temperature: float
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """``(total [], per-row divergences [N], grad [N, V])`` (the gradient of ``total = sum weight *
    rows`` w.r.t. the student's raw logits ``[N, V]``; rows whose label is ``IGNORE`` give 0)."""
    grad = torch.empty_like(logits)
    total, rows = topk_rows_into(grad, logits, teacher_logprobs, teacher_ids, labels, weight, divergence, tail,
                                 temperature)
    return total, rows, grad


@topk_distillation_op.register_fake
def _(logits, teacher_logprobs, teacher_ids, labels, weight, divergence, tail, temperature):
    acc = acc_dtype(logits)
    return (logits.new_empty((), dtype=acc), logits.new_empty(logits.shape[0], dtype=acc), torch.empty_like(logits))


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[2], inputs[4])


def _backward(ctx, g_total, g_rows, g_grad):
    out = [None] * 8
    if (g_total is None and g_rows is None) or not ctx.needs_input_grad[0]:
        return tuple(out)
    grad, weight = ctx.saved_tensors
    out[0] = grad * row_scale(weight, g_total, g_rows, grad.dtype)
    return tuple(out)


topk_distillation_op.register_autograd(_backward, setup_context=_setup_context)


@kernel_op("topk_distillation_loss_", mutates_args=("logits",))
def topk_distillation_inplace_op(logits: Tensor, teacher_logprobs: Tensor, teacher_ids: Tensor,
                                 labels: Optional[Tensor], weight: Tensor, divergence: str, tail: str,
                                 temperature: float) -> tuple[Tensor, Tensor]:
    """:func:`topk_distillation_op` with the gradient written over ``logits``: ``(total, rows)``."""
    return topk_rows_into(logits, logits, teacher_logprobs, teacher_ids, labels, weight, divergence, tail, temperature)


@topk_distillation_inplace_op.register_fake
def _(logits, teacher_logprobs, teacher_ids, labels, weight, divergence, tail, temperature):
    acc = acc_dtype(logits)
    return logits.new_empty((), dtype=acc), logits.new_empty(logits.shape[0], dtype=acc)
