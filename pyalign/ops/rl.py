"""The op of the policy-gradient losses: ``pyalign::policy_loss`` over the kernels of
``csrc/{cpu,cuda}/rl`` (math: ``csrc/include/pyalign/rl.h``).

Tokens arrive flat (``[N]``) with segment offsets (``[S + 1]``, one segment per sequence). The forward
computes the loss, its gradient w.r.t. the log-probs and the entropy, and the metrics in one call;
eager calls hand the gradients over to the backward, which scales them in place by the incoming
gradient (not at all for a CPU scalar 1). Loss types, KL estimators, importance-sampling modes,
aggregation modes, parameter order and metric names come from the kernels' contract by name.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pyalign._ext import CONTRACT, desc, kernels, stream_of
from pyalign._tensors import acc_dtype
from pyalign.ops._op import hold_gradients, is_one, kernel_op, ordered_params, scale_gradient, take_gradients

LOSS_TYPES = tuple(CONTRACT["pg_loss_types"])
KL_ESTIMATORS = tuple(CONTRACT["kl_estimators"])
IS_MODES = tuple(CONTRACT["is_modes"])
AGG_MODES = tuple(CONTRACT["pg_agg_modes"])
PARAM_NAMES = tuple(CONTRACT["pg_params"])
METRIC_NAMES = tuple(CONTRACT["pg_metrics"])
LOG_RATIO_CLAMP = CONTRACT["pg_log_ratio_clamp"]
K3_CLAMP = CONTRACT["pg_k3_clamp"]
_SLOTS = CONTRACT["pg_seg_slots"]


def params_list(**values: float) -> list[float]:
    """The scalar parameters in the kernels' order; each name must be one of ``PARAM_NAMES``."""
    return ordered_params(values, PARAM_NAMES, "policy-loss parameters")


@kernel_op("policy_loss")
def policy_loss_op(
    logps: Tensor, old_logps: Tensor, ref_logps: Optional[Tensor], sampling_logps: Optional[Tensor],
    entropy: Optional[Tensor], mask: Optional[Tensor], advantages: Tensor, segments: Optional[Tensor],
    num_segments: int, row_len: int, loss_type: str, level: str, kl_estimator: str, is_mode: str, agg: str,
    bias_correction_kl: bool, adv_per_token: bool, params: list[float],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(loss, metrics [len(METRIC_NAMES)], grad_logps [N], grad_entropy [N] or [0])`` of flat tokens cut
    into ``num_segments`` sequences: by the offsets ``segments`` ``[S + 1]``, or (``segments`` None) into
    rows of ``row_len`` tokens."""
    n, S = logps.shape[0], num_segments
    acc, dev = acc_dtype(logps), logps.device
    loss = torch.empty((), dtype=acc, device=dev)
    metrics = torch.empty(len(METRIC_NAMES), dtype=acc, device=dev)
    grad_logp = torch.empty(n, dtype=acc, device=dev)
    grad_ent = torch.empty(n if entropy is not None else 0, dtype=acc, device=dev)
    work = torch.empty(S + 1, _SLOTS, dtype=acc, device=dev)
    kernels.policy_loss_forward(
        desc(logps, "logps"), desc(old_logps, "old_logps"), desc(ref_logps, "ref_logps"),
        desc(sampling_logps, "sampling_logps"), desc(entropy, "entropy"), desc(mask, "mask"),
        desc(advantages, "advantages"), desc(segments, "cu_seqlens"), num_segments, row_len, desc(loss, "loss"), desc(grad_logp, "grad_logps"),
        desc(grad_ent, "grad_entropy") if entropy is not None else None, desc(metrics, "metrics"), desc(work, "work"),
        loss_type, level, kl_estimator, is_mode, agg, bias_correction_kl, adv_per_token, params, stream_of(logps))
    return loss, metrics, grad_logp, grad_ent


@policy_loss_op.register_fake
def _(logps, old_logps, ref_logps, sampling_logps, entropy, mask, advantages, segments, num_segments, row_len,
      loss_type, level, kl_estimator, is_mode, agg, bias_correction_kl, adv_per_token, params):
    acc = acc_dtype(logps)
    n = logps.shape[0]
    return (logps.new_empty((), dtype=acc), logps.new_empty(len(METRIC_NAMES), dtype=acc),
            logps.new_empty(n, dtype=acc), logps.new_empty(n if entropy is not None else 0, dtype=acc))


_N_TENSOR_INPUTS = max(policy_loss_op._tensor_positions) + 1  # logps .. segments; then the options


def _setup_context(ctx, inputs, output):
    _, metrics, grad_logp, grad_ent = output
    ctx.mark_non_differentiable(metrics, grad_logp, grad_ent)
    ctx.set_materialize_grads(False)  # no zero-filled [N] upstream gradients for the saved gradients
    ctx.dtypes = (inputs[0].dtype, None if inputs[4] is None else inputs[4].dtype)
    hold_gradients(ctx, inputs, _N_TENSOR_INPUTS, (grad_logp, grad_ent))


def _backward(ctx, g_loss, g_metrics, g_glp, g_gent):
    out = [None] * 18
    if g_loss is None:
        return tuple(out)
    want = (ctx.needs_input_grad[0], ctx.needs_input_grad[4] and ctx.dtypes[1] is not None)
    held, owned = take_gradients(ctx, lambda *args: policy_loss_op.impl(*args)[2:])
    one = owned and is_one(g_loss)
    for (pos, dtype), grad, w in zip(((0, ctx.dtypes[0]), (4, ctx.dtypes[1])), held, want):
        if w:
            out[pos] = scale_gradient(grad, g_loss, owned, one, dtype)
    return tuple(out)


policy_loss_op.register_autograd(_backward, setup_context=_setup_context)
