"""The vocab-parallel log-probs (method: :mod:`pyalign.distributed`): each rank's shard through the
log-prob kernels in vocabulary-slice mode (:func:`pyalign.ops.logprob.forward_rows`) or the fused
head's chunk loops, one ``all_gather`` of per-token statistics in the forward, the exact global
combination, and the shard's gradient in the backward (plus one ``all_reduce`` of ``dhidden`` for
the linear variant).

Collectives take a process group, which no op schema can carry, so these are
``torch.autograd.Function``s (eager only, not traced by ``torch.compile``); they capture
:mod:`pyalign._overrides` at the forward like every other op.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from pyalign import _checks, _overrides
from pyalign._outputs import ENTROPY, LOG_SUM_SQ, MEAN_LOGIT, TOP1
from pyalign._tensors import LABEL_ELSEWHERE, LABEL_IGNORE, acc_dtype, dense_grad, empty_rows_like
from pyalign.ops.linear.chunks import NEED_BIAS, NEED_HIDDEN, NEED_WEIGHT, scatter_rows, select_rows, valid_rows
from pyalign.ops.linear.loops import chunked_backward, chunked_stats
from pyalign.ops.logprob import backward_rows, forward_rows, row_outputs


def _transform(x: Tensor, temperature: float, logit_scale: float, softcap: float) -> Tensor:
    z = x * logit_scale
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def _local_labels(labels: Tensor, ignore_index: int, start: int, v_local: int):
    lab = labels.long()
    valid = lab != ignore_index
    local = lab - start
    inside = valid & (local >= 0) & (local < v_local)
    code = torch.where(inside, local, torch.full_like(local, LABEL_ELSEWHERE))
    return torch.where(valid, code, torch.full_like(local, LABEL_IGNORE)), inside, valid


def _all_gather(out: Tensor, inp: Tensor, group) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    gather(out, inp, group=group)


def group_info(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("group: torch.distributed is not initialized (call init_process_group first)")
    return dist.get_world_size(group), dist.get_rank(group)


def resolve_start(vocab_start, v_local: int, group, device) -> int:
    """``vocab_start`` as given, or the sum of the shard sizes of lower ranks (one small all_gather)."""
    if vocab_start is not None:
        if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
            raise ValueError(f"vocab_start: expected None or an int >= 0, got {vocab_start!r}")
        return vocab_start
    world, rank = group_info(group)
    sizes = torch.empty(world, dtype=torch.int64, device=device)
    _all_gather(sizes, torch.tensor([v_local], dtype=torch.int64, device=device), group=group)
    return int(sizes[:rank].sum())


def _exchange(r: dict, inside: Tensor, start: int, v_local: int, flags: int, tf, group):
    """All-gathers the shards' statistics and combines them into the global per-token results."""
    world, _ = group_info(group)
    lse_k = r["lse"]
    acc, dev, n = lse_k.dtype, lse_k.device, lse_k.numel()
    zeros = torch.zeros(n, dtype=acc, device=dev)
    xmax = r["max"] if flags & TOP1 else zeros  # raw logits: the transform is increasing
    rows = [lse_k, r["entropy"] if flags & ENTROPY else zeros, r["label_logit"], inside.to(acc),
            r["log_sum_sq"] if flags & LOG_SUM_SQ else zeros,
            r["mean_logit"] * v_local if flags & MEAN_LOGIT else zeros, xmax]
    head = torch.tensor([start, v_local], dtype=torch.float64, device=dev)
    mine = torch.cat([head, torch.stack(rows).to(torch.float64).flatten()])
    every = torch.empty(world * mine.numel(), dtype=torch.float64, device=dev)
    _all_gather(every, mine, group)
    every = every.view(world, -1)
    layout = sorted((int(s), int(v), k) for k, (s, v) in enumerate(every[:, :2].tolist()))
    pos = 0
    for s, v, _ in layout:
        if s != pos:
            shards = ", ".join(f"rank {k}: [{s0}, {s0 + v0})" for s0, v0, k in sorted(layout, key=lambda t: t[2]))
            raise ValueError(f"vocab_start: the vocabulary shards do not tile [0, V) ({shards})")
        pos += v
    vocab = pos
    t = every[:, 2:].view(world, len(rows), n).to(acc)
    lse_all, ent_all, xlab, ins, lss_all, zsum, xmax_all = t.unbind(1)
    lse = torch.logsumexp(lse_all, 0)
    logw = lse_all - lse
    live = torch.isfinite(logw)  # a shard whose entries are all -inf has weight 0
    w = torch.where(live, logw.exp(), torch.zeros_like(logw))
    x_label = (xlab * ins).sum(0)
    z_label = _transform(x_label, *tf)
    out = {"lse": lse, "logp": z_label - lse, "vocab": vocab, "found": ins.sum(0) > 0}
    if flags & ENTROPY:
        out["entropy"] = torch.where(live, w * (ent_all - logw), torch.zeros_like(w)).sum(0)
    if flags & LOG_SUM_SQ:
        out["log_sum_sq"] = torch.logsumexp(torch.where(live, lss_all + 2 * logw,
                                                        torch.full_like(logw, -float("inf"))), 0)
    if flags & MEAN_LOGIT:
        out["mean_logit"] = zsum.sum(0) / vocab
    if flags & TOP1:
        out["top1"] = x_label >= xmax_all.amax(0)
    return out


def _finish(out: dict, valid: Tensor, labels: Tensor, ignore_index: int, flags: int, validate: bool):
    """Zeroes ignored rows, checks the labels against the whole vocabulary, returns the tuple."""
    if validate:
        _checks.check_labels(labels, out["vocab"], ignore_index)
    zero = torch.zeros_like(out["logp"])
    fix = lambda key, flag: torch.where(valid, out[key], zero) if flags & flag else None
    top1 = (valid & out["top1"]) if flags & TOP1 else None
    # Unvalidated (no host sync), a label that no shard holds reads NaN, as in token_logprobs.
    logp = torch.where(out["found"], out["logp"], torch.full_like(zero, float("nan")))
    return (torch.where(valid, logp, zero), torch.where(valid, out["lse"], zero),
            fix("entropy", ENTROPY), fix("log_sum_sq", LOG_SUM_SQ), fix("mean_logit", MEAN_LOGIT), top1)


class VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, group, start, ignore_index, tf, shift, flags, validate):
        lg, lb = (logits[..., :-1, :], labels[..., 1:]) if shift else (logits, labels)
        v_local = logits.shape[-1]
        local, inside, valid = _local_labels(lb.reshape(-1), ignore_index, start, v_local)
        local = local.view(lb.shape)
        n = local.numel()
        acc = acc_dtype(logits)
        r = dict(zip(("logp", "lse", "entropy", "log_sum_sq", "mean_logit"),
                     row_outputs(n, flags & (ENTROPY | LOG_SUM_SQ | MEAN_LOGIT), acc, logits.device)))
        forward_rows(lg, local, r["logp"], r["lse"], r["entropy"], r["log_sum_sq"], r["mean_logit"], None, *tf,
                     LABEL_IGNORE, vocab_slice=True)
        idx = local.clamp(0, v_local - 1).unsqueeze(-1)
        x = lg.gather(-1, idx).squeeze(-1).reshape(-1).to(acc)
        r["label_logit"] = torch.where(inside, x, torch.zeros_like(x))
        if flags & TOP1:
            r["max"] = lg.amax(-1).reshape(-1).to(acc)
        out = _exchange(r, inside, start, v_local, flags, tf, group)
        res = _finish(out, valid, lb.reshape(-1), ignore_index, flags, validate)
        ctx.save_for_backward(logits, local, res[1], out.get("entropy"))
        ctx.params = (tf, shift, out["vocab"], bool(flags & MEAN_LOGIT))
        ctx.overrides = _overrides.current()
        # lse, entropy and mean_logit are differentiable; log_sum_sq and is_top1 are not
        ctx.mark_non_differentiable(*[t for t in (res[3], res[5]) if t is not None])
        return res

    @staticmethod
    def backward(ctx, g_logp, g_lse, g_ent, g_lss, g_mean, g_top1):
        logits, local, lse, ent = ctx.saved_tensors
        tf, shift, vocab, has_mean = ctx.params
        grad = empty_rows_like(logits)
        lg, gl = (logits[..., :-1, :], grad[..., :-1, :]) if shift else (logits, grad)
        dt = lse.dtype
        g_ent = dense_grad(g_ent, dt, ent is not None)
        g_mean = dense_grad(g_mean, dt, has_mean)
        backward_rows(lg, local, lse, ent if g_ent is not None else None, dense_grad(g_logp, dt), g_ent, gl, *tf,
                      LABEL_IGNORE, dense_grad(g_lse, dt), g_mean, None, vocab_slice=True,
                      mean_vocab=vocab if g_mean is not None else 0)
        if shift:
            grad[..., -1, :].zero_()
        return grad, None, None, None, None, None, None, None, None


class VocabParallelLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, group, start, ignore_index, tf, flags, chunk, validate):
        n_all = labels.numel()
        v_local = weight.shape[0]
        idx = valid_rows(labels, ignore_index)
        hv, lv = select_rows(hidden, idx), select_rows(labels, idx)
        local, inside, _ = _local_labels(lv, ignore_index, start, v_local)
        r = chunked_stats(hv, weight, bias, local, *tf, flags & (ENTROPY | LOG_SUM_SQ | MEAN_LOGIT), chunk,
                          vocab_slice=True, ignore_index=LABEL_IGNORE, label_logit=True,
                          extremes=bool(flags & TOP1))
        out = _exchange(r, inside, start, v_local, flags, tf, group)
        full = lambda t: None if t is None else scatter_rows(t, idx, n_all)
        valid = labels != ignore_index
        for key in ("logp", "lse", "entropy", "log_sum_sq", "mean_logit", "top1", "found"):
            if key in out:
                out[key] = full(out[key])
        res = _finish(out, valid, labels, ignore_index, flags, validate)
        ctx.save_for_backward(hidden, weight, bias, labels, res[1], out.get("entropy"))
        ctx.params = (group, start, ignore_index, tf, chunk, out["vocab"], bool(flags & MEAN_LOGIT))
        ctx.overrides = _overrides.current()
        ctx.mark_non_differentiable(*[t for t in (res[3], res[5]) if t is not None])
        return res

    @staticmethod
    def backward(ctx, g_logp, g_lse, g_ent, g_lss, g_mean, g_top1):
        hidden, weight, bias, labels, lse, ent = ctx.saved_tensors
        group, start, ignore_index, tf, chunk, vocab, has_mean = ctx.params
        needs = ((NEED_HIDDEN if ctx.needs_input_grad[0] else 0) | (NEED_WEIGHT if ctx.needs_input_grad[1] else 0)
                 | (NEED_BIAS if ctx.needs_input_grad[2] else 0))
        idx = valid_rows(labels, ignore_index)
        sel = lambda t: select_rows(t, idx)
        prep = lambda g: sel(dense_grad(g, lse.dtype))
        lv = sel(labels)
        local, _, _ = _local_labels(lv, ignore_index, start, weight.shape[0])
        g_ent = prep(g_ent) if ent is not None else None
        with _overrides.restored(ctx.overrides):  # autograd may run this on another thread
            dh, dw, db = chunked_backward(prep(g_logp), g_ent, sel(hidden), weight, bias, local, sel(lse),
                                          sel(ent) if g_ent is not None else None, *tf, chunk, needs,
                                          vocab_slice=True, ignore_index=LABEL_IGNORE, grad_lse=prep(g_lse),
                                          grad_mean=prep(g_mean) if has_mean else None, mean_vocab=vocab)
        if dh is not None:
            dh = scatter_rows(dh, idx, hidden.shape[0])
            dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=group)  # sum of the shards' parts
        return dh, dw, db, None, None, None, None, None, None, None, None


