"""The op of the preference losses: ``pyalign::preference_loss``.

One op serves every loss family (see ``csrc/include/pyalign/losses.h``). Its forward computes the
(per-element or reduced) loss, the gradient of that loss w.r.t. each log-prob input and the
per-pair weights that ``grad_rows`` asks for, the metrics and (BCO) the updated running state; the backward only scales those
gradients by the incoming gradient (:func:`pyalign.ops._op.hold_gradients`), so it needs no second
kernel. Families, loss types, f-divergences, reductions, parameter order and metric slots all come
from the kernels' contract (``csrc/include/pyalign/contract.h``) by name. One reduction is a second
kernel's: ``"dro"``, the KL-DRO reduction of Dr. DPO (Wu et al. 2024, arXiv:2407.07880), reduces
the loss kernel's per-pair output and folds its softmax weights into the gradients (``loss_kl_dro``
in ``losses.h``), so that it costs no second autograd node.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pyalign._ext import CONTRACT, desc, kernels, stream_of
from pyalign._tensors import acc_dtype
from pyalign.ops._op import hold_gradients, is_one, kernel_op, ordered_params, scale_gradient, take_gradients

FAMILIES = tuple(CONTRACT["loss_families"])
DPO_TYPES = tuple(CONTRACT["dpo_types"])
CPO_TYPES = tuple(CONTRACT["cpo_types"])
KTO_TYPES = tuple(CONTRACT["kto_types"])
F_DIVERGENCES = tuple(CONTRACT["f_divergences"])
KERNEL_REDUCTIONS = tuple(CONTRACT["reductions"])
REDUCTIONS = KERNEL_REDUCTIONS + ("dro",)
MAX_LOSS_TYPES = CONTRACT["max_loss_types"]
PARAM_NAMES = tuple(CONTRACT["loss_params"])
METRICS = CONTRACT["loss_metrics"]  # family -> {metric name: slot}
_SLOTS = CONTRACT["metric_slots"]
_STATE = CONTRACT["bco_state_size"]
_AOT = (DPO_TYPES.index("aot"), DPO_TYPES.index("aot_unpaired"))
GRAD_INPUTS = CONTRACT["loss_grad_inputs"]  # a, b, c, d, w: the inputs the loss has gradients for
ALL_GRAD_ROWS = (1 << GRAD_INPUTS) - 1
_GRAD_INPUT_POSITIONS = (0, 1, 2, 3, 6)  # their positions among the op's tensor inputs

# Names of the eleven tensor inputs per family, for the kernels' error messages.
_INPUTS = {
    "dpo": ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
            "chosen_lengths", "rejected_lengths"),
    "kto": ("policy_logps", "", "ref_logps", "", "", ""),
    "bco": ("policy_logps", "", "ref_logps", "", "", ""),
    "orpo": ("policy_chosen_logps", "policy_rejected_logps", "", "", "chosen_lengths", "rejected_lengths"),
    "cpo": ("policy_chosen_logps", "policy_rejected_logps", "", "", "chosen_lengths", "rejected_lengths"),
    "rm": ("rewards_chosen", "rewards_rejected", "margin", "", "", ""),
}
_COMMON_INPUTS = ("weights", "desirable", "policy_kl_logps", "ref_kl_logps", "state")


def params_list(**values: float) -> list[float]:
    """The scalar parameters in the kernels' order; each name must be one of ``PARAM_NAMES``."""
    return ordered_params(values, PARAM_NAMES, "loss parameters")


def needed_grad_rows(a, b, c, d, w) -> int:
    """The op's ``grad_rows`` for a call on these inputs: the bits of those that require grad (none
    with grad disabled). A gradient that nothing will ask for is then neither formed nor written."""
    if not torch.is_grad_enabled():
        return 0
    return sum(1 << k for k, t in enumerate((a, b, c, d, w)) if t is not None and t.requires_grad)


def _n_rows(grad_rows: int) -> int:
    if not 0 <= grad_rows <= ALL_GRAD_ROWS:
        raise ValueError(f"grad_rows: expected a bit mask of the {GRAD_INPUTS} gradient inputs "
                         f"(0 to {ALL_GRAD_ROWS}), got {grad_rows}")
    return bin(grad_rows).count("1")


def _row_of(grad_rows: int, k: int) -> int:
    """The row of the op's ``grads`` that holds input k's gradient, or -1 (the kernels' grad_row)."""
    return bin(grad_rows & ((1 << k) - 1)).count("1") if grad_rows >> k & 1 else -1


@kernel_op("preference_loss")
def preference_loss_op(
    a: Tensor, b: Optional[Tensor], c: Optional[Tensor], d: Optional[Tensor], la: Optional[Tensor],
    lb: Optional[Tensor], w: Optional[Tensor], label: Optional[Tensor], kla: Optional[Tensor],
    klb: Optional[Tensor], state: Optional[Tensor], family: str, types: list[int],
    type_weights: list[float], params: list[float], fdiv: str, reduction: str, dro_temperature: float = 1.0,
    grad_rows: int = ALL_GRAD_ROWS,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(loss, grads [R, N], metrics [slots], state_out)``: the loss ([N] for reduction "none", else
    0-d), its gradients w.r.t. those of a, b, c, d and w that the bit mask ``grad_rows`` names (bit k:
    the k-th of them; R rows in that order; :func:`needed_grad_rows`), the metrics (named by
    ``METRICS[family]``) and BCO's updated ``[mean, count]`` state (an empty tensor for the other
    families). ``"dro"`` runs the kernel with ``"none"`` and reduces its output with ``dro_temperature``."""
    n = a.shape[0]
    acc = acc_dtype(a)
    dev = a.device
    dro = reduction == "dro"
    reduction = "none" if dro else reduction
    loss = torch.empty(n if reduction == "none" else (), dtype=acc, device=dev)
    grads = torch.empty(_n_rows(grad_rows), n, dtype=acc, device=dev)
    metrics = torch.empty(_SLOTS, dtype=acc, device=dev)
    state_out = torch.empty(_STATE if family == "bco" else 0, dtype=acc, device=dev)
    naot = sum(1 for t in types if t in _AOT) if family == "dpo" else 0
    work = torch.empty(4 * naot, n, dtype=torch.int32, device=dev) if naot else None
    names = _INPUTS.get(family, ("a", "b", "c", "d", "la", "lb")) + _COMMON_INPUTS
    inputs = [None if t is None else desc(t, name or "input")
              for t, name in zip((a, b, c, d, la, lb, w, label, kla, klb, state), names)]
    kernels.loss_forward(
        *inputs, desc(loss, "loss"), desc(grads, "grads"), desc(metrics, "metrics"),
        desc(state_out, "state_out") if family == "bco" else None, desc(work, "work"),
        family, types, type_weights, params, fdiv, reduction, grad_rows, stream_of(a),
    )
    if dro:  # the per-pair losses become the reduction's workspace
        value = torch.empty((), dtype=acc, device=dev)
        kernels.loss_kl_dro(desc(loss, "loss"), desc(grads, "grads"), desc(value, "value"), dro_temperature,
                            stream_of(a))
        loss = value
    return loss, grads, metrics, state_out


@preference_loss_op.register_fake
def _(a, b, c, d, la, lb, w, label, kla, klb, state, family, types, type_weights, params, fdiv, reduction,
      dro_temperature=1.0, grad_rows=ALL_GRAD_ROWS):
    n = a.shape[0]
    acc = acc_dtype(a)
    loss = a.new_empty(n if reduction == "none" else (), dtype=acc)
    return (loss, a.new_empty(_n_rows(grad_rows), n, dtype=acc), a.new_empty(_SLOTS, dtype=acc),
            a.new_empty(_STATE if family == "bco" else 0, dtype=acc))


_N_TENSOR_INPUTS = max(preference_loss_op._tensor_positions) + 1  # a .. state; then the options


def _setup_context(ctx, inputs, output):
    _, grads, metrics, state_out = output
    ctx.mark_non_differentiable(grads, metrics, state_out)
    # The gradients and metrics outputs never receive a gradient: without this, autograd would
    # allocate and zero-fill an [R, N] tensor for them on every backward (as costly as the kernel).
    ctx.set_materialize_grads(False)
    ctx.dtypes = [None if t is None else t.dtype for t in inputs[:11]]
    ctx.grad_rows = inputs[18]
    hold_gradients(ctx, inputs, _N_TENSOR_INPUTS, (grads,))


def _backward(ctx, g_loss, g_grads, g_metrics, g_state):
    out = [None] * 19
    if g_loss is None:  # no gradient reached the loss (grads are not materialized as zeros)
        return tuple(out)
    (grads,), owned = take_gradients(ctx, lambda *args: preference_loss_op.impl(*args)[1:2])
    one = owned and is_one(g_loss)
    for k, idx in enumerate(_GRAD_INPUT_POSITIONS):
        if ctx.dtypes[idx] is not None and ctx.needs_input_grad[idx]:
            row = _row_of(ctx.grad_rows, k)
            if row < 0:
                raise RuntimeError(f"pyalign::preference_loss: input {idx} needs a gradient, but the forward "
                                   f"was called with grad_rows={ctx.grad_rows}, which does not form it")
            out[idx] = scale_gradient(grads[row], g_loss, owned, one, ctx.dtypes[idx])
    return tuple(out)


preference_loss_op.register_autograd(_backward, setup_context=_setup_context)
