"""The op of the distillation divergences: ``pyalign::distillation_loss`` over the kernels of
``csrc/{cpu,cuda}/distill`` (math: ``csrc/include/pyalign/distill.h``).

The forward computes each row's divergence, their weighted total and the weighted gradients
w.r.t. the student's (and, when asked, the teacher's) logits in one call; the backward only scales
the saved gradients by the incoming one (a scalar for the total, one value per row for the per-row
divergences)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pyalign._ext import desc, kernels, stream_of
from pyalign._tensors import acc_dtype
from pyalign.ops._op import kernel_op


@kernel_op("distillation_loss")
def distillation_op(student: Tensor, teacher: Tensor, labels: Optional[Tensor], weight: Tensor, divergence: str,
                    beta: float,
                    temperature: float, student_softcap: float, teacher_softcap: float, ignore_index: int,
                    teacher_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(total [], per-row divergences [N], grad_student [N, V], grad_teacher [N, V] or [0])`` of rows
    ``[N, V]`` of student and teacher logits (softcap 0: none); the gradients are those of
    ``total = sum weight * rows``. ``divergence``: ``"jsd"`` (the forward / reverse KL at ``beta`` 0 / 1),
    ``"tvd"``, ``"skew_kl"`` or ``"skew_reverse_kl"`` (``beta``: the teacher's weight in the mixture)."""
    n, v = student.shape
    acc, dev = acc_dtype(student), student.device
    total = torch.empty((), dtype=acc, device=dev)
    rows = torch.empty(n, dtype=acc, device=dev)
    grad_s = torch.empty(n, v, dtype=acc, device=dev)
    grad_t = torch.empty((n, v) if teacher_grad else (0,), dtype=acc, device=dev)
    kernels.distill_forward(desc(student, "student_logits"), desc(teacher, "teacher_logits"),
                            desc(labels, "labels"), desc(weight, "weight"), desc(rows, "loss"), desc(total, "total"),
                            desc(grad_s, "grad_student"), desc(grad_t, "grad_teacher") if teacher_grad else None,
                            divergence, beta, temperature, student_softcap, teacher_softcap, ignore_index, stream_of(student))
    return total, rows, grad_s, grad_t


@distillation_op.register_fake
def _(student, teacher, labels, weight, divergence, beta, temperature, student_softcap, teacher_softcap, ignore_index,
      teacher_grad):
    acc = acc_dtype(student)
    n, v = student.shape
    return (student.new_empty((), dtype=acc), student.new_empty(n, dtype=acc), student.new_empty(n, v, dtype=acc),
            student.new_empty((n, v) if teacher_grad else (0,), dtype=acc))


def _setup_context(ctx, inputs, output):
    _, _, grad_s, grad_t = output
    ctx.mark_non_differentiable(grad_s, grad_t)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad_s, grad_t, inputs[3])
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)


def row_scale(weight: Tensor, g_total: Optional[Tensor], g_rows: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """``[N, 1]`` factors that turn gradients saved as ``weight_r`` times each row's into those of the
    upstream gradients of the total (``g_total``) and of the per-row values (``g_rows``)."""
    scale = None if g_total is None else g_total.expand(weight.shape)
    if g_rows is not None:  # rows of weight 0 carry no gradient either way
        per_row = torch.where(weight != 0, g_rows / torch.where(weight != 0, weight, 1), 0)
        scale = per_row if scale is None else scale + per_row
    return scale.to(dtype).unsqueeze(-1)


def _backward(ctx, g_total, g_rows, g_gs, g_gt):
    out = [None] * 11
    if g_total is None and g_rows is None:
        return tuple(out)
    grad_s, grad_t, weight = ctx.saved_tensors
    scale = row_scale(weight, g_total, g_rows, grad_s.dtype)
    if ctx.needs_input_grad[0]:
        out[0] = (grad_s * scale).to(ctx.dtypes[0])
    if ctx.needs_input_grad[1] and grad_t.numel():
        out[1] = (grad_t * scale).to(ctx.dtypes[1])
    return tuple(out)


distillation_op.register_autograd(_backward, setup_context=_setup_context)
