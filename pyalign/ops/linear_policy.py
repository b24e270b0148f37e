"""The policy-gradient loss straight from the LM head with its gradient formed in the forward:
``pyalign::linear_policy_loss_fwd_grad``.

For a *token-local* configuration of the policy loss (the per-token gradient w.r.t. a token's
log-prob and entropy depends on that token's values and on the mask alone: no sequence-level ratio,
no high-entropy quantile, no off-policy sequence mask, not VESPO) the coefficients each chunk's
backward kernel needs exist as soon as the chunk's own log-probs do. So each token chunk costs one
logits GEMM, the log-prob forward kernel, the policy kernel, the log-prob backward kernel in place on
the same logits buffer and the two product GEMMs (``dh = g @ W``, ``dW += g.T @ h``): 3 GEMMs per
chunk instead of the composite's 4 (1 forward + 3 in the backward, which recomputes the logits).

The policy kernel runs once per chunk over the whole batch's tokens (``O(B T)`` each, small next to
the chunk's GEMMs): the log-probs of the chunks not yet reached hold 0, which a token-local
configuration never lets reach the chunk's own gradients, and after the last chunk the same call has
every log-prob and gives the loss and metrics. The backward only scales the saved ``dh``/``dW``/
``db`` by the loss's upstream gradient (as Liger-Kernel's fused losses do).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pyalign._tensors import acc_dtype
from pyalign.ops._op import kernel_op
from pyalign.ops.linear.chunks import NEED_BIAS, NEED_HIDDEN, NEED_WEIGHT, scatter_rows, select_rows, valid_rows
from pyalign.ops.linear.loops import chunked_forward_grad
from pyalign.ops.rl import METRIC_NAMES, policy_loss_op

IGNORE = -100  # the label of a masked token: no GEMM work


@kernel_op("linear_policy_loss_fwd_grad")
def linear_policy_loss_fwd_grad_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, temperature: float,
    logit_scale: float, softcap: float, chunk_size: int, needs: int, with_entropy: bool,
    old_logps: Tensor, ref_logps: Optional[Tensor], sampling_logps: Optional[Tensor], mask: Optional[Tensor],
    advantages: Tensor, segments: Optional[Tensor], num_segments: int, row_len: int, loss_type: str, level: str,
    kl_estimator: str, is_mode: str, agg: str, bias_correction_kl: bool, adv_per_token: bool,
    params: list[float],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, metrics, dh [n, H], dW [V, H], db [V])`` (``[0]`` for the gradients not in ``needs``) of
    :func:`pyalign.ops.rl.policy_loss_op` on the log-probs (and, with ``with_entropy``, the entropy)
    of the head ``hidden [n, H] @ weight.T + bias`` at ``labels [n]`` (``IGNORE`` at masked tokens),
    for a token-local configuration (the caller's check: see the module docstring)."""
    n = labels.shape[0]
    acc, dev = acc_dtype(hidden), hidden.device
    idx = valid_rows(labels, IGNORE)
    logps = torch.zeros(n, dtype=acc, device=dev)
    entropy = torch.zeros(n, dtype=acc, device=dev) if with_entropy else None
    last = []

    def policy(rows=None, logp=None, ent=None):
        if rows is not None:
            logps[rows] = logp
            if with_entropy:
                entropy[rows] = ent
        out = policy_loss_op(logps, old_logps, ref_logps, sampling_logps, entropy, mask, advantages, segments,
                             num_segments, row_len, loss_type, level, kl_estimator, is_mode, agg,
                             bias_correction_kl, adv_per_token, params)
        last[:] = out
        return out

    def row_grads(s, logp, lse, ent):
        rows = s if idx is None else idx[s]
        _, _, g_logp, g_ent = policy(rows, logp, ent)
        return g_logp[rows], g_ent[rows] if with_entropy else None, None

    _, _, _, _, dh, dw, db = chunked_forward_grad(
        select_rows(hidden, idx), weight, bias, select_rows(labels, idx), temperature, logit_scale, softcap,
        chunk_size, needs, row_grads, entropy=with_entropy, ignore_index=IGNORE)
    loss, metrics = (last if last else policy())[:2]  # no kept token: one call for the loss alone
    empty = lambda: hidden.new_empty(0)
    return (loss, metrics, empty() if dh is None else scatter_rows(dh, idx, n),
            empty() if dw is None else dw, empty() if db is None else db)


@linear_policy_loss_fwd_grad_op.register_fake
def _(hidden, weight, bias, labels, temperature, logit_scale, softcap, chunk_size, needs, with_entropy,
      old_logps, ref_logps, sampling_logps, mask, advantages, segments, num_segments, row_len, loss_type, level,
      kl_estimator, is_mode, agg, bias_correction_kl, adv_per_token, params):
    acc = acc_dtype(hidden)
    grad = lambda bit, like: torch.empty_like(like) if (needs & bit and like is not None) else hidden.new_empty(0)
    return (hidden.new_empty((), dtype=acc), hidden.new_empty(len(METRIC_NAMES), dtype=acc),
            grad(NEED_HIDDEN, hidden), grad(NEED_WEIGHT, weight), grad(NEED_BIAS, bias))


_GRADS = ((0, NEED_HIDDEN, "hidden"), (1, NEED_WEIGHT, "weight"), (2, NEED_BIAS, "bias"))


def _setup_context(ctx, inputs, output):
    _, metrics, dh, dw, db = output
    ctx.mark_non_differentiable(metrics, dh, dw, db)
    ctx.set_materialize_grads(False)  # no [V, H] zeros for the dW output nobody differentiates
    ctx.needs = inputs[8]
    ctx.save_for_backward(dh, dw, db)


def _backward(ctx, g_loss, g_metrics, g_dh, g_dw, g_db):
    out = [None] * 26
    if g_loss is None:
        return tuple(out)
    saved = ctx.saved_tensors
    for (i, bit, name), grad in zip(_GRADS, saved):
        if ctx.needs_input_grad[i]:
            if not ctx.needs & bit:
                raise RuntimeError(f"pyalign::linear_policy_loss_fwd_grad: {name} requires grad but the forward "
                                   f"was called with needs={ctx.needs}, which does not include it")
            out[i] = grad * g_loss.to(grad.dtype)
    return tuple(out)


linear_policy_loss_fwd_grad_op.register_autograd(_backward, setup_context=_setup_context)
