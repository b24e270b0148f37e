"""The op of the preference losses: ``pyalign::preference_loss``.

One op serves every loss family (see ``csrc/include/pyalign/losses.h``). Its forward computes the
(per-element or reduced) loss, the gradient of that loss w.r.t. each log-prob input and the
per-pair weights, the metrics and (BCO) the updated running state; the backward only scales those
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


@kernel_op("preference_loss")
def preference_loss_op(
    a: Tensor, b: Optional[Tensor], c: Optional[Tensor], d: Optional[Tensor], la: Optional[Tensor],
    lb: Optional[Tensor], w: Optional[Tensor], label: Optional[Tensor], kla: Optional[Tensor],
    klb: Optional[Tensor], state: Optional[Tensor], family: str, types: list[int],
    type_weights: list[float], params: list[float], fdiv: str, reduction: str, dro_temperature: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(loss, grads [5, N], metrics [slots], state_out)``: the loss ([N] for reduction "none", else
    0-d), its gradient w.r.t. a, b, c, d and w, the metrics (named by ``METRICS[family]``) and BCO's
    updated ``[mean, count]`` state (an empty tensor for the other families). ``"dro"`` runs the
    kernel with ``"none"`` and reduces its output with ``dro_temperature``."""
    n = a.shape[0]
    acc = acc_dtype(a)
    dev = a.device
    dro = reduction == "dro"
    reduction = "none" if dro else reduction
    loss = torch.empty(n if reduction == "none" else (), dtype=acc, device=dev)
    grads = torch.empty(5, n, dtype=acc, device=dev)
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
        family, types, type_weights, params, fdiv, reduction, stream_of(a),
    )
    if dro:  # the per-pair losses become the reduction's workspace
        value = torch.empty((), dtype=acc, device=dev)
        kernels.loss_kl_dro(desc(loss, "loss"), desc(grads, "grads"), desc(value, "value"), dro_temperature,
                            stream_of(a))
        loss = value
    return loss, grads, metrics, state_out


@preference_loss_op.register_fake
def _(a, b, c, d, la, lb, w, label, kla, klb, state, family, types, type_weights, params, fdiv, reduction,
      dro_temperature=1.0):
    n = a.shape[0]
    acc = acc_dtype(a)
    loss = a.new_empty(n if reduction == "none" else (), dtype=acc)
    return (loss, a.new_empty(5, n, dtype=acc), a.new_empty(_SLOTS, dtype=acc),
            a.new_empty(_STATE if family == "bco" else 0, dtype=acc))


_GRAD_ROW = {0: 0, 1: 1, 2: 2, 3: 3, 6: 4}  # input index (a, b, c, d, w) -> row of grads
_N_TENSOR_INPUTS = max(preference_loss_op._tensor_positions) + 1  # a .. state; then the options


def _setup_context(ctx, inputs, output):
    _, grads, metrics, state_out = output
    ctx.mark_non_differentiable(grads, metrics, state_out)
    # The gradients and metrics outputs never receive a gradient: without this, autograd would
    # allocate and zero-fill a [5, N] tensor for them on every backward (as costly as the kernel).
    ctx.set_materialize_grads(False)
    ctx.dtypes = [None if t is None else t.dtype for t in inputs[:11]]
    hold_gradients(ctx, inputs, _N_TENSOR_INPUTS, (grads,))


def _backward(ctx, g_loss, g_grads, g_metrics, g_state):
    out = [None] * 18
    if g_loss is None:  # no gradient reached the loss (grads are not materialized as zeros)
        return tuple(out)
    (grads,), owned = take_gradients(ctx, lambda *args: preference_loss_op.impl(*args)[1:2])
    one = owned and is_one(g_loss)
    for idx, row in _GRAD_ROW.items():
        if ctx.dtypes[idx] is not None and ctx.needs_input_grad[idx]:
            out[idx] = scale_gradient(grads[row], g_loss, owned, one, ctx.dtypes[idx])
    return tuple(out)


preference_loss_op.register_autograd(_backward, setup_context=_setup_context)
