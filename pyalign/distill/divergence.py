"""The generalized Jensen-Shannon divergence between student and teacher logits, in one fused
kernel (``pyalign::distillation_loss``), with the conventions of TRL's
``GKDTrainer.generalized_jsd_loss``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pyalign import _checks
from pyalign._tensors import acc_dtype
from pyalign.ops.distill import distillation_inplace_op, distillation_op, inplace_gradient_op

__all__ = ["distillation_loss", "REDUCTIONS", "DIVERGENCES"]

REDUCTIONS = ("batchmean", "sum", "mean", "none")
DIVERGENCES = ("jsd", "tvd", "skew_kl", "skew_reverse_kl")


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None, *,
                      beta: float = 0.5, temperature: float = 1.0, reduction: str = "batchmean",
                      ignore_index: int = -100, num_items_in_batch=None, student_softcap: Optional[float] = None,
                      teacher_softcap: Optional[float] = None, divergence: str = "jsd",
                      skew_alpha: float = 0.1, inplace_backward: bool = False) -> Tensor:
    """The generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, "On-Policy Distillation of
    Language Models: Learning from Self-Generated Mistakes", arXiv:2306.13649, Eq. 1) between the
    softmax of ``student_logits / temperature`` and of ``teacher_logits / temperature``, per position:

    - ``beta = 0``: forward KL, KL(teacher || student);
    - ``beta = 1``: reverse KL, KL(student || teacher);
    - otherwise ``beta KL(teacher || m) + (1 - beta) KL(student || m)`` with the mixture
      ``m = (1 - beta) student + beta teacher``.

    ``student_logits`` and ``teacher_logits``: ``[..., V]`` (at least 2-d), one vocabulary; the teacher
    is cast to the student's dtype if it differs. ``labels`` ``[...]``: a position whose label is
    ``ignore_index`` is left out. Reductions as TRL's: ``batchmean`` divides the sum over positions by
    the number of kept positions (without ``labels``: by the size of the first dimension), ``sum``,
    ``mean`` (by kept positions times ``V``), ``none`` (the per-position divergence ``[...]``, 0 where
    ignored; TRL returns per-entry terms there). ``num_items_in_batch`` (a number or a tensor): the sum
    divided by it, for gradient accumulation, in place of the reduction. ``student_softcap``,
    ``teacher_softcap``: logit softcapping ``c tanh(x / c)`` applied to that side's logits before the
    temperature (as Gemma-style models cap their final logits), inside the kernel.

    ``divergence``: ``"jsd"`` (the above), ``"tvd"`` (the total variation ``0.5 sum |student - teacher|``),
    ``"skew_kl"`` (``KL(teacher || a teacher + (1 - a) student)``) or ``"skew_reverse_kl"``
    (``KL(student || a student + (1 - a) teacher)``), the skew KL divergences of DistiLLM (Ko et al.
    2024, arXiv:2402.03898) with ``a = skew_alpha``; ``beta`` belongs to ``"jsd"`` alone.

    One fused pass per row forms the divergence and its gradient w.r.t. the student's logits (and the
    teacher's, when they require grad); the backward scales it. An entry of probability 0 (a logit of
    ``-inf``) contributes 0, where the eager formula gives NaN. A row without any finite logit, or with a
    NaN, gives NaN.

    ``inplace_backward``: that gradient is written over the student's logits, in this call, and the
    backward scales it there and returns that storage as their gradient: no ``[..., V]`` gradient is
    held besides the logits themselves. The logits are consumed: once the call returns they hold the
    gradient (do not read them; a second backward through the call raises, as does a backward through
    any other op that saved them, autograd's in-place check). Refused for logits that are not
    contiguous or that share memory with the teacher's. For logits that are a view of another tensor
    requiring grad (``nn.Linear``'s output for 3-d input with a bias is one) autograd sends the gradient
    through ``as_strided``, as for any in-place op on a view: in the backward, one fresh buffer of the
    base's size in the logits' dtype holds it instead of their storage. bf16/fp16 logits hold
    the gradient rounded to their dtype (the out-of-place result's bits for an incoming gradient of 1,
    within one rounding of that dtype else); where nothing requires the student's gradient the logits
    are left as they are.
    """
    _checks.float_tensor(student_logits, "student_logits")
    _checks.float_tensor(teacher_logits, "teacher_logits")
    _checks.same_device(("student_logits", student_logits), ("teacher_logits", teacher_logits), ("labels", labels))
    if student_logits.dim() < 2:
        raise ValueError(f"student_logits: expected [..., V] with at least 2 dimensions, got shape "
                         f"{tuple(student_logits.shape)}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits: expected the shape of student_logits {tuple(student_logits.shape)} "
                         f"(one vocabulary), got {tuple(teacher_logits.shape)}")
    (divergence, mix), temperature, caps, ignore_index = checked_options(
        beta, temperature, reduction, ignore_index, student_softcap, teacher_softcap, divergence, skew_alpha)
    lead, V = student_logits.shape[:-1], student_logits.shape[-1]
    checked_labels(labels, lead)
    if teacher_logits.dtype != student_logits.dtype:
        teacher_logits = teacher_logits.to(student_logits.dtype)
    s2, t2 = student_logits.reshape(-1, V), teacher_logits.reshape(-1, V)
    flat_labels = None if labels is None else labels.reshape(-1)
    weight = row_weights(flat_labels, s2.shape[0], V, student_logits.shape[0], reduction, ignore_index,
                          num_items_in_batch, acc_dtype(student_logits), student_logits.device)
    teacher_grad = teacher_logits.requires_grad and torch.is_grad_enabled()
    args = (flat_labels, weight, divergence, mix, temperature, *caps, ignore_index, teacher_grad)
    if inplace_backward and student_logits.requires_grad and torch.is_grad_enabled():
        checked_inplace(student_logits, "student_logits", ("teacher_logits", teacher_logits))
        with torch.no_grad():
            total, rows, grad_t = distillation_inplace_op(student_logits.detach().view(-1, V), t2.detach(), *args)
        bump_version(student_logits)
        total, rows = inplace_gradient_op(student_logits.view(-1, V), total, rows, weight,
                                          t2 if teacher_grad else None, grad_t)
    else:
        total, rows, _, _ = distillation_op(s2, t2, *args)
    if reduction == "none" and num_items_in_batch is None:
        return rows.reshape(lead)
    return total


def checked_options(beta, temperature, reduction, ignore_index, student_softcap, teacher_softcap, divergence="jsd",
                    skew_alpha=0.1):
    """``((divergence, its mixture weight), temperature, (student_softcap, teacher_softcap) with 0 for none,
    ignore_index)``, checked. The mixture weight is the teacher's in ``(1 - w) student + w teacher``:
    ``beta`` for the JSD, ``skew_alpha`` for the skew KL, ``1 - skew_alpha`` for the skew reverse KL."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta <= 1:
        raise ValueError(f"beta: expected a number in [0, 1], got {beta!r}")
    _checks.choice(divergence, "divergence", DIVERGENCES)
    if isinstance(skew_alpha, bool) or not isinstance(skew_alpha, (int, float)) or not 0 <= skew_alpha < 1:
        raise ValueError(f"skew_alpha: expected a number in [0, 1), got {skew_alpha!r}")
    mix = {"jsd": float(beta), "tvd": 0.0, "skew_kl": float(skew_alpha), "skew_reverse_kl": 1.0 - skew_alpha}
    temperature = _checks.positive(temperature, "temperature")
    _checks.choice(reduction, "reduction", REDUCTIONS)
    caps = tuple(0.0 if c is None else _checks.positive(c, name)
                 for c, name in ((student_softcap, "student_softcap"), (teacher_softcap, "teacher_softcap")))
    return (divergence, mix[divergence]), temperature, caps, _checks.integer(ignore_index, "ignore_index")


def checked_labels(labels: Optional[Tensor], lead) -> None:
    """``labels``, when given, must be integers of the logits' leading shape ``lead``."""
    if labels is not None:
        _checks.index_tensor(labels, "labels")
        if labels.shape != lead:
            raise ValueError(f"labels: expected shape {tuple(lead)} (the logits' leading dimensions), got "
                             f"{tuple(labels.shape)}")


def row_weights(labels, n, V, first_dim, reduction, ignore_index, num_items_in_batch, dtype, device) -> Tensor:
    """Each row's weight in the reduced loss (its d loss / d row divergence), as TRL reduces."""
    kept = torch.ones(n, dtype=dtype, device=device) if labels is None else (labels != ignore_index).to(dtype)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            return kept / num_items_in_batch.to(device=device, dtype=dtype)
        return kept / _checks.positive(num_items_in_batch, "num_items_in_batch")
    if reduction in ("sum", "none"):
        return kept
    count = kept.sum().clamp_min(1) if labels is not None else torch.tensor(float(max(first_dim, 1)), dtype=dtype,
                                                                            device=device)
    if reduction == "mean":
        count = (kept.sum() * V).clamp_min(1)
    return kept / count


def checked_inplace(logits: Tensor, name: str, *others: tuple[str, Tensor]) -> None:
    """Refuses logits that an in-place gradient cannot be written over (see ``inplace_backward``)."""
    if not logits.is_contiguous():
        raise ValueError(f"{name}: inplace_backward=True writes the gradient over the logits, which needs them "
                         f"contiguous (got shape {tuple(logits.shape)} with strides {tuple(logits.stride())}); pass "
                         f"{name}.contiguous() (a copy, then overwritten) or inplace_backward=False")
    if torch.compiler.is_compiling():  # the compiled graph is functional: aliasing is its own
        return
    lo = logits.data_ptr()
    hi = lo + logits.numel() * logits.element_size()
    for other_name, t in others:
        if t is None or t.numel() == 0 or t.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr():
            continue
        t_lo = t.data_ptr()
        t_hi = t_lo + (sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * t.element_size()
        if t_lo < hi and lo < t_hi:
            raise ValueError(f"{other_name}: shares memory with {name}, which inplace_backward=True overwrites; "
                             f"pass a copy or inplace_backward=False")


def bump_version(t: Tensor) -> None:
    """Marks ``t`` as modified in place for autograd (the eager path writes through a raw pointer) so that
    an op that saved it refuses to run its backward; the dispatcher does this on the op path."""
    if not torch.compiler.is_compiling():
        torch.autograd.graph.increment_version(t)
