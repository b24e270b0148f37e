"""The distillation divergences straight from the LM heads, their gradients formed in the forward:
``pyalign::linear_distillation_loss`` (both heads) and ``pyalign::linear_topk_distillation_loss`` (the
student's head and a top-k teacher).

Each token chunk costs the student's and the teacher's logits GEMMs, the divergence kernel
(:mod:`pyalign.ops.distill`: the row's divergence and its gradient w.r.t. both logits, already
weighted by the reduction), and for each head that needs gradients ``dh = g @ W`` and ``dW += g.T @ h``:
4 GEMMs per chunk for the student alone, 6 with the teacher's gradients. Neither logits tensor exists
whole: the peak beyond the returned gradients is one chunk's two logits blocks and its fp32 gradient
blocks (plus, for bf16/fp16 weights whose tokens need several chunks, an fp32 ``[V, H]`` ``dW``
accumulator per head). The backward only scales the saved gradients by the loss's upstream gradient.

The top-k twin runs the student's side of that loop with :func:`pyalign.ops.distill_topk.topk_rows_into`
in place of the divergence kernel: per chunk the logits GEMM, the log-prob forward kernel, the ``[c, K]``
reduced divergence, the backward kernel writing the gradient over the chunk's logits, the corrections at
the ids, then ``dh = g @ W`` and ``dW += g.T @ h``: 3 GEMMs. Its transient memory is one chunk's logits
block (which becomes its gradient), ``[c, K]`` temporaries and the fp32 ``dW`` accumulator of a
bf16/fp16 head whose tokens span several chunks.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pyalign._tensors import acc_dtype
from pyalign.ops._op import kernel_op
from pyalign.ops.distill import distillation_op
from pyalign.ops.distill_topk import IGNORE, topk_rows_into
from pyalign.ops.linear.chunks import NEED_BIAS, NEED_HIDDEN, NEED_WEIGHT, scatter_rows, select_rows, valid_rows
from pyalign.ops.linear.gemm import accumulate_dw, dhidden_into, logits_buffer, logits_into


class _HeadGrads:
    """The gradients of one head (those in ``needs``), accumulated chunk by chunk."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], needs: int, n: int, chunk: int):
        V, H = weight.shape
        dev = hidden.device
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.dh = torch.empty(n, H, dtype=hidden.dtype, device=dev) if needs & NEED_HIDDEN else None
        self.db = torch.zeros(V, dtype=acc_dtype(hidden), device=dev) if (needs & NEED_BIAS and bias is not None) \
            else None
        self.dw = self.dw_acc = None
        if needs & NEED_WEIGHT:
            if acc_dtype(weight) != weight.dtype and n > chunk:  # several chunks: an fp32 accumulator
                self.dw_acc = torch.zeros(V, H, dtype=torch.float32, device=dev)
            else:
                self.dw = torch.zeros(V, H, dtype=weight.dtype, device=dev)
        self.any = self.dh is not None or self.db is not None or needs & NEED_WEIGHT

    def add(self, s: slice, g32: Tensor) -> None:
        """Adds the chunk ``s``'s logits gradient ``g32 [c, V]`` (fp32/fp64, or the head's dtype)."""
        g = g32 if g32.dtype == self.weight.dtype else g32.to(self.weight.dtype)
        h = self.hidden[s]
        if self.dh is not None:
            dhidden_into(self.dh[s], g, self.weight)
        if self.dw_acc is not None:
            accumulate_dw(self.dw_acc, g, h)
        elif self.dw is not None:
            self.dw.addmm_(g.t(), h)
        if self.db is not None:
            self.db += g32.sum(0, dtype=self.db.dtype)

    def results(self, idx: Optional[Tensor], n: int) -> tuple[Tensor, Tensor, Tensor]:
        empty = lambda: self.hidden.new_empty(0)  # one each: a custom op's outputs must not alias
        dw = self.dw_acc.to(self.weight.dtype) if self.dw_acc is not None else self.dw
        return (empty() if self.dh is None else scatter_rows(self.dh, idx, n), empty() if dw is None else dw,
                empty() if self.db is None else self.db.to(self.bias.dtype))


@kernel_op("linear_distillation_loss")
def linear_distillation_op(
    student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor], teacher_hidden: Tensor,
    teacher_weight: Tensor, teacher_bias: Optional[Tensor], labels: Optional[Tensor], weight: Tensor, divergence: str,
    beta: float,
    temperature: float, student_softcap: float, teacher_softcap: float, ignore_index: int, chunk_size: int,
    student_needs: int, teacher_needs: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(total, dh_s [n, Hs], dW_s, db_s, dh_t [n, Ht], dW_t, db_t)`` (``[0]`` for the gradients not in
    the needs) of ``sum_r weight_r D_r``, ``D_r`` the divergence of row ``r`` of the two heads'
    logits (:func:`pyalign.ops.distill.distillation_op`); rows whose label is ``ignore_index`` do no
    work."""
    n = student_hidden.shape[0]
    idx = None if labels is None else valid_rows(labels, ignore_index)
    hs, ht, w = select_rows(student_hidden, idx), select_rows(teacher_hidden, idx), select_rows(weight, idx)
    m = hs.shape[0]
    student = _HeadGrads(hs, student_weight, student_bias, student_needs, m, chunk_size)
    teacher = _HeadGrads(ht, teacher_weight, teacher_bias, teacher_needs, m, chunk_size)
    total = torch.zeros((), dtype=acc_dtype(student_hidden), device=student_hidden.device)
    if m > 0:
        c = min(chunk_size, m)
        buf_s = logits_buffer(c, hs, student_weight, student_bias)
        buf_t = logits_buffer(c, ht, teacher_weight, teacher_bias)
        for c0 in range(0, m, chunk_size):
            s = slice(c0, min(m, c0 + chunk_size))
            rows = s.stop - s.start
            zs = logits_into(None if buf_s is None else buf_s[:rows], hs[s], student_weight, student_bias)
            zt = logits_into(None if buf_t is None else buf_t[:rows], ht[s], teacher_weight, teacher_bias)
            part, _, gs, gt = distillation_op.impl(zs, zt, None, w[s], divergence, beta, temperature, student_softcap,
                                                   teacher_softcap, ignore_index, bool(teacher.any))
            total += part  # chunk order: the same bits on every run
            if student.any:
                student.add(s, gs)
            if teacher.any:
                teacher.add(s, gt)
            del zs, zt, gs, gt
    return (total, *student.results(idx, n), *teacher.results(idx, n))


@linear_distillation_op.register_fake
def _(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels, weight,
      divergence, beta, temperature, student_softcap, teacher_softcap, ignore_index, chunk_size, student_needs, teacher_needs):
    def grads(needs, h, w, b):
        g = lambda bit, like: torch.empty_like(like) if (needs & bit and like is not None) else h.new_empty(0)
        return g(NEED_HIDDEN, h), g(NEED_WEIGHT, w), g(NEED_BIAS, b)
    return (student_hidden.new_empty((), dtype=acc_dtype(student_hidden)),
            *grads(student_needs, student_hidden, student_weight, student_bias),
            *grads(teacher_needs, teacher_hidden, teacher_weight, teacher_bias))


# (input position, needs argument position, bit) of each saved gradient, in output order
_NEEDS = 15  # the position of student_needs (teacher_needs follows)
_GRADS = ((0, 0, NEED_HIDDEN), (1, 0, NEED_WEIGHT), (2, 0, NEED_BIAS),
          (3, 1, NEED_HIDDEN), (4, 1, NEED_WEIGHT), (5, 1, NEED_BIAS))
_NAMES = ("student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight", "teacher_bias")


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.needs = (inputs[_NEEDS], inputs[_NEEDS + 1])
    ctx.save_for_backward(*output[1:])


def _backward(ctx, g_total, *_):
    out = [None] * 17
    if g_total is None:
        return tuple(out)
    for (i, k, bit), grad, name in zip(_GRADS, ctx.saved_tensors, _NAMES):
        if ctx.needs_input_grad[i]:
            if not ctx.needs[k] & bit:
                raise RuntimeError(f"pyalign::linear_distillation_loss: {name} requires grad but the forward "
                                   f"was called without its gradient")
            out[i] = grad * g_total.to(grad.dtype)
    return tuple(out)


linear_distillation_op.register_autograd(_backward, setup_context=_setup_context)


@kernel_op("linear_topk_distillation_loss")
def linear_topk_distillation_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], teacher_logprobs: Tensor, teacher_ids: Tensor,
    labels: Optional[Tensor], row_weight: Tensor, divergence: str, tail: str, temperature: float, chunk_size: int,
    needs: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(total, dh [n, H], dW, db)`` (``[0]`` for the gradients not in ``needs``) of ``sum_r row_weight_r D_r``,
    ``D_r`` the divergence of row ``r`` of the logits ``hidden @ weight.T + bias`` to the top-k teacher
    (:func:`pyalign.ops.distill_topk.topk_distillation_op`); rows whose label is ``IGNORE`` do no work."""
    n = hidden.shape[0]
    idx = None if labels is None else valid_rows(labels, IGNORE)
    h, lp, ids, w = (select_rows(t, idx) for t in (hidden, teacher_logprobs, teacher_ids, row_weight))
    m = h.shape[0]
    head = _HeadGrads(h, weight, bias, needs, m, chunk_size)
    total = torch.zeros((), dtype=acc_dtype(hidden), device=hidden.device)
    if m > 0:
        buf = logits_buffer(min(chunk_size, m), h, weight, bias)
        for c0 in range(0, m, chunk_size):
            s = slice(c0, min(m, c0 + chunk_size))
            z = None  # the previous chunk's oneDNN output is freed before the next is made
            z = logits_into(None if buf is None else buf[: s.stop - s.start], h[s], weight, bias)
            part, _ = topk_rows_into(z, z, lp[s], ids[s], None, w[s], divergence, tail, temperature)
            total += part  # chunk order: the same bits on every run
            if head.any:
                head.add(s, z)
        del buf, z
    return (total, *head.results(idx, n))


@linear_topk_distillation_op.register_fake
def _(hidden, weight, bias, teacher_logprobs, teacher_ids, labels, row_weight, divergence, tail, temperature,
      chunk_size, needs):
    g = lambda bit, like: torch.empty_like(like) if (needs & bit and like is not None) else hidden.new_empty(0)
    return (hidden.new_empty((), dtype=acc_dtype(hidden)), g(NEED_HIDDEN, hidden), g(NEED_WEIGHT, weight),
            g(NEED_BIAS, bias))


def _topk_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.needs = inputs[11]
    ctx.save_for_backward(*output[1:])


def _topk_backward(ctx, g_total, *_):
    out = [None] * 12
    if g_total is None:
        return tuple(out)
    for (i, _, bit), grad, name in zip(_GRADS[:3], ctx.saved_tensors, _NAMES[:3]):
        if ctx.needs_input_grad[i]:
            if not ctx.needs & bit:
                raise RuntimeError(f"pyalign::linear_topk_distillation_loss: {name} requires grad but the forward "
                                   f"was called without its gradient")
            out[i] = grad * g_total.to(grad.dtype)
    return tuple(out)


linear_topk_distillation_op.register_autograd(_topk_backward, setup_context=_topk_setup_context)
