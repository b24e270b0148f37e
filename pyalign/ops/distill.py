"""The op of the distillation divergences: ``pyalign::distillation_loss`` over the kernels of
``csrc/{cpu,cuda}/distill`` (math: ``csrc/include/pyalign/distill.h``).

The forward computes each row's divergence, their weighted total and the weighted gradients
w.r.t. the student's (and, when asked, the teacher's) logits in one call; the backward only scales
the saved gradients by the incoming one (a scalar for the total, one value per row for the per-row
divergences).

In place (``inplace_backward=True``): ``pyalign::distillation_loss_`` writes the student's gradient
over the student's logits and ``pyalign::inplace_gradient`` makes the loss differentiable, its
backward scaling that storage in place and returning it as the gradient. The kernel may write over
its own input where every entry of a row is read before its gradient is written over it: the CPU
kernel (``csrc/cpu/distill.cpp``) reads a row whole for the two log-sum-exps, reads it again for the
row sums, and in its last sweep reads entry ``j`` of both rows and then writes gradient ``j``; the
CUDA kernel (``csrc/cuda/distill.cu``) has the same three sweeps, a thread writing only the entries it
has just read. The exception is the forward KL (the JSD at ``beta = 0``) with the teacher's gradient on
the CPU: the student's gradient is written in the second sweep and the student's logits are read again
in the third, for the teacher's; that case, and bf16/fp16 logits (whose fp32 gradient rows are twice
as wide as the logits' rows), go through an fp32 staging block of rows that is copied over the logits
after each kernel call."""
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
    _forward_into(student, teacher, labels, weight, rows, total, grad_s, grad_t if teacher_grad else None, divergence,
                  beta, temperature, student_softcap, teacher_softcap, ignore_index)
    return total, rows, grad_s, grad_t


def _forward_into(student, teacher, labels, weight, rows, total, grad_s, grad_t, divergence, beta, temperature,
                  student_softcap, teacher_softcap, ignore_index) -> None:
    """The kernel: per-row divergences into ``rows``, their weighted total into ``total``, the weighted
    gradients into ``grad_s`` (which may be ``student`` itself: see the module docstring) and ``grad_t``
    (None: not formed)."""
    kernels.distill_forward(desc(student, "student_logits"), desc(teacher, "teacher_logits"),
                            desc(labels, "labels"), desc(weight, "weight"), desc(rows, "loss"), desc(total, "total"),
                            desc(grad_s, "grad_student"), None if grad_t is None else desc(grad_t, "grad_teacher"),
                            divergence, beta, temperature, student_softcap, teacher_softcap, ignore_index,
                            stream_of(student))


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


# The in-place path's fp32 staging block (where the kernel cannot write over the logits directly):
# at most this many elements per kernel call. CUDA runs one block per row, so it gets more rows.
STAGE_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}


def writes_over_logits(dtype: torch.dtype, divergence: str, beta: float, teacher_grad: bool) -> bool:
    """Whether the kernel writes the student's gradient straight over the student's logits (else through
    the staging block): logits in the accumulation dtype (fp32, fp64), and not the forward KL with the
    teacher's gradient (see the module docstring)."""
    return dtype == acc_dtype(dtype) and not (divergence == "jsd" and beta == 0 and teacher_grad)


@kernel_op("distillation_loss_", mutates_args=("student",))
def distillation_inplace_op(student: Tensor, teacher: Tensor, labels: Optional[Tensor], weight: Tensor,
                            divergence: str, beta: float, temperature: float, student_softcap: float,
                            teacher_softcap: float, ignore_index: int, teacher_grad: bool
                            ) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`distillation_op` with the student's gradient written over ``student`` (contiguous ``[N, V]``,
    rounded to its dtype): ``(total, rows, grad_teacher or [0])``."""
    n, v = student.shape
    acc, dev = acc_dtype(student), student.device
    rows = torch.empty(n, dtype=acc, device=dev)
    grad_t = torch.empty((n, v) if teacher_grad else (0,), dtype=acc, device=dev)
    opts = (divergence, beta, temperature, student_softcap, teacher_softcap, ignore_index)
    if writes_over_logits(student.dtype, divergence, beta, teacher_grad):
        total = torch.empty((), dtype=acc, device=dev)
        _forward_into(student, teacher, labels, weight, rows, total, student, grad_t if teacher_grad else None, *opts)
        return total, rows, grad_t
    total = torch.zeros((), dtype=acc, device=dev)
    if n == 0:
        return total, rows, grad_t
    step = max(1, STAGE_ELEMENTS.get(dev.type, STAGE_ELEMENTS["cpu"]) // max(1, v))
    stage = torch.empty(min(step, n), v, dtype=acc, device=dev)
    part = torch.empty((), dtype=acc, device=dev)
    for r0 in range(0, n, step):
        s = slice(r0, min(n, r0 + step))
        g = stage[: s.stop - s.start]
        _forward_into(student[s], teacher[s], None if labels is None else labels[s], weight[s], rows[s], part, g,
                      grad_t[s] if teacher_grad else None, *opts)
        student[s].copy_(g)
        total += part  # block order: the same bits on every run
    return total, rows, grad_t


@distillation_inplace_op.register_fake
def _(student, teacher, labels, weight, divergence, beta, temperature, student_softcap, teacher_softcap, ignore_index,
      teacher_grad):
    acc = acc_dtype(student)
    n, v = student.shape
    return (student.new_empty((), dtype=acc), student.new_empty(n, dtype=acc),
            student.new_empty((n, v) if teacher_grad else (0,), dtype=acc))


@kernel_op("inplace_gradient")
def inplace_gradient_op(logits: Tensor, total: Tensor, rows: Tensor, weight: Tensor, other: Optional[Tensor],
                        other_grad: Tensor) -> tuple[Tensor, Tensor]:
    """``(total, rows)`` again (copies), differentiable: their gradient w.r.t. ``logits`` is held in
    ``logits``' own storage (written there by an in-place op: the gradient of ``sum weight * rows``), which
    the backward scales in place (by row factors in the logits' dtype: no temporary of their size) and
    returns; w.r.t. ``other`` (absent: none) it is ``other_grad`` scaled (``[0]``: none)."""
    return total.clone(), rows.clone()


@inplace_gradient_op.register_fake
def _(logits, total, rows, weight, other, other_grad):
    return torch.empty_like(total), torch.empty_like(rows)


def _inplace_setup_context(ctx, inputs, output):
    logits, _, _, weight, other, other_grad = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(logits, other_grad, weight)
    ctx.other_dtype = None if other is None else other.dtype


def _inplace_backward(ctx, g_total, g_rows):
    out = [None] * 6
    if g_total is None and g_rows is None:
        return tuple(out)
    logits, other_grad, weight = ctx.saved_tensors
    if ctx.needs_input_grad[0]:
        with torch.no_grad():  # the logits' storage is the gradient (not differentiable, as the saved one)
            out[0] = logits.mul_(row_scale(weight, g_total, g_rows, logits.dtype)).detach()
    if ctx.needs_input_grad[4] and other_grad.numel():
        out[4] = (other_grad * row_scale(weight, g_total, g_rows, other_grad.dtype)).to(ctx.other_dtype)
    return tuple(out)


inplace_gradient_op.register_autograd(_inplace_backward, setup_context=_inplace_setup_context)
