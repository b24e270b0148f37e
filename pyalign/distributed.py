"""Vocab-parallel log-probs: each rank holds the columns ``[vocab_start, vocab_start + V_local)``
of the logits (or the matching rows of the LM head weight), the results are exact over the whole
vocabulary.

Every rank computes, with the log-prob kernels in vocabulary-slice mode, its shard's statistics
per token: ``lse_k`` (log-sum-exp of the transformed logits), ``H_k`` (entropy of the softmax
restricted to the shard), the raw logit of the label when the label lies in the shard,
``log sum p_k^2``, the sum of the transformed logits, and (for ``is_top1``) the shard's largest
raw logit. One ``all_gather`` of these small ``[7, tokens]`` tables (plus each rank's
``(vocab_start, V_local)``, used to check that the shards tile the vocabulary) is the only
collective of the forward; every rank then combines them identically, with
``w_k = exp(lse_k - lse)``:

    lse = logsumexp_k lse_k,   H = sum_k w_k (H_k - log w_k),   log sum p^2 = logsumexp_k (lss_k + 2 log w_k).

These forms use only shard-level log-sum-exps, never raw logits, so they keep the precision of
the single-process kernel at large logits. The backward needs no collective for the logits: the
gradient of each shard is the single-process formula with the global ``lse`` and ``H``, plus
the upstream gradients of ``lse`` (``d lse/dz_v = p_v``) and ``mean_logit`` (``1 / V`` of the whole
vocabulary) folded into the same slice kernel. The fused linear variant all-reduces ``dhidden``
(a sum over the shards' partial products) once.

Labels must be the same on every rank. Collectives run outside custom ops, so these functions
use ``torch.autograd.Function`` and are not meant to be traced by ``torch.compile``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from pyalign import _checks
from pyalign._ext import kernels, desc, empty_rows_like, stream_of
from pyalign.linear import cast_head, check_head, check_options, package
from pyalign.logprob import check_labels
from pyalign.ops.linear import (NEED_BIAS, NEED_HIDDEN, NEED_WEIGHT, auto_chunk_size, chunked_backward,
                                chunked_stats, valid_rows)
from pyalign.ops.logprob import ENTROPY, LOG_SUM_SQ, MEAN_LOGIT, TOP1

# Local label codes handed to the slice kernels: ignored rows, and labels held by another rank.
_LOCAL_IGNORE = -(1 << 62)
_ELSEWHERE = -1


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
    code = torch.where(inside, local, torch.full_like(local, _ELSEWHERE))
    return torch.where(valid, code, torch.full_like(local, _LOCAL_IGNORE)), inside, valid


def _all_gather(out: Tensor, inp: Tensor, group) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    gather(out, inp, group=group)


def _group_info(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("group: torch.distributed is not initialized (call init_process_group first)")
    return dist.get_world_size(group), dist.get_rank(group)


def _resolve_start(vocab_start, v_local: int, group, device) -> int:
    """``vocab_start`` as given, or the sum of the shard sizes of lower ranks (one small all_gather)."""
    if vocab_start is not None:
        if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
            raise ValueError(f"vocab_start: expected None or an int >= 0, got {vocab_start!r}")
        return vocab_start
    world, rank = _group_info(group)
    sizes = torch.empty(world, dtype=torch.int64, device=device)
    _all_gather(sizes, torch.tensor([v_local], dtype=torch.int64, device=device), group=group)
    return int(sizes[:rank].sum())


def _exchange(r: dict, inside: Tensor, start: int, v_local: int, flags: int, tf, group):
    """All-gathers the shards' statistics and combines them into the global per-token results."""
    world, _ = _group_info(group)
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
        check_labels(labels, out["vocab"], ignore_index)
    zero = torch.zeros_like(out["logp"])
    fix = lambda key, flag: torch.where(valid, out[key], zero) if flags & flag else None
    top1 = (valid & out["top1"]) if flags & TOP1 else None
    # Unvalidated (no host sync), a label that no shard holds reads NaN, as in token_logprobs.
    logp = torch.where(out["found"], out["logp"], torch.full_like(zero, float("nan")))
    return (torch.where(valid, logp, zero), torch.where(valid, out["lse"], zero),
            fix("entropy", ENTROPY), fix("log_sum_sq", LOG_SUM_SQ), fix("mean_logit", MEAN_LOGIT), top1)


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, group, start, ignore_index, tf, shift, flags, validate):
        lg, lb = (logits[..., :-1, :], labels[..., 1:]) if shift else (logits, labels)
        v_local = logits.shape[-1]
        local, inside, valid = _local_labels(lb.reshape(-1), ignore_index, start, v_local)
        local = local.view(lb.shape)
        n = local.numel()
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        r = {k: torch.empty(n, dtype=acc, device=logits.device) for k in ("logp", "lse")}
        for key, flag in (("entropy", ENTROPY), ("log_sum_sq", LOG_SUM_SQ), ("mean_logit", MEAN_LOGIT)):
            r[key] = torch.empty(n if flags & flag else 0, dtype=acc, device=logits.device)
        opt = lambda key: desc(r[key], key) if r[key].numel() else None
        kernels.logprob_forward_slice(desc(lg, "logits_shard"), desc(local, "labels"), desc(r["logp"], "logp"),
                                 desc(r["lse"], "lse"), opt("entropy"), opt("log_sum_sq"), opt("mean_logit"),
                                 None, *tf, _LOCAL_IGNORE, stream_of(logits))
        idx = local.clamp(0, v_local - 1).unsqueeze(-1)
        x = lg.gather(-1, idx).squeeze(-1).reshape(-1).to(acc)
        r["label_logit"] = torch.where(inside, x, torch.zeros_like(x))
        if flags & TOP1:
            r["max"] = lg.amax(-1).reshape(-1).to(acc)
        out = _exchange(r, inside, start, v_local, flags, tf, group)
        res = _finish(out, valid, lb.reshape(-1), ignore_index, flags, validate)
        ctx.save_for_backward(logits, local, res[1], out.get("entropy"))
        ctx.params = (tf, shift, out["vocab"], bool(flags & MEAN_LOGIT))
        # lse, entropy and mean_logit are differentiable; log_sum_sq and is_top1 are not
        ctx.mark_non_differentiable(*[t for t in (res[3], res[5]) if t is not None])
        return res

    @staticmethod
    def backward(ctx, g_logp, g_lse, g_ent, g_lss, g_mean, g_top1):
        logits, local, lse, ent = ctx.saved_tensors
        tf, shift, vocab, has_mean = ctx.params
        grad = empty_rows_like(logits)
        lg, gl = (logits[..., :-1, :], grad[..., :-1, :]) if shift else (logits, grad)
        # Dense copies bound to names: a descriptor holds a raw pointer, not the tensor, so a
        # temporary made inside the call would be freed before the kernel reads it.
        prep = lambda g: None if g is None else g.to(lse.dtype).contiguous()
        g_logp, g_lse = prep(g_logp), prep(g_lse)
        g_ent = prep(g_ent) if ent is not None else None
        g_mean = prep(g_mean) if has_mean else None
        kernels.logprob_backward_slice(desc(lg, "logits_shard"), desc(local, "labels"), desc(lse, "lse"),
                                  desc(ent if g_ent is not None else None, "entropy"),
                                  desc(g_logp, "grad_logp"), desc(g_ent, "grad_entropy"),
                                  desc(gl, "grad_logits"), *tf, _LOCAL_IGNORE, stream_of(logits),
                                  desc(g_lse, "grad_lse"), desc(g_mean, "grad_mean"), None,
                                  mean_vocab=vocab if g_mean is not None else 0)
        if shift:
            grad[..., -1, :].zero_()
        return grad, None, None, None, None, None, None, None, None


def vocab_parallel_token_logprobs(
    logits_shard: Tensor,
    labels: Tensor,
    *,
    group=None,
    vocab_start: Optional[int] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    shift: bool = False,
    return_entropy: bool = False,
    outputs: Optional[Sequence[str]] = None,
    validate: Optional[bool] = None,
):
    """:func:`pyalign.logprob.token_logprobs` over a vocabulary split across the ranks of ``group``.

    ``logits_shard`` is ``[..., V_local]``: this rank's columns ``[vocab_start, vocab_start +
    V_local)`` of the full logits; ``labels`` (``[...]``, the same on every rank) index the full
    vocabulary. ``vocab_start=None`` places the shards in rank order (one extra tiny
    ``all_gather`` of the shard sizes). Results and options are those of ``token_logprobs`` on the
    concatenated logits (``outputs`` may include ``"lse"``); the gradient flows to ``logits_shard``
    through the log-probs, the entropy, ``lse`` and ``mean_logit``.

    Raises ValueError (on every rank) when the shards do not tile ``[0, V)`` or a label lies
    outside ``[0, V)`` (checked on CPU always; on CUDA only with ``validate=True``, a host sync).
    """
    _checks.float_tensor(logits_shard, "logits_shard")
    _checks.index_tensor(labels, "labels")
    _checks.same_device(("logits_shard", logits_shard), ("labels", labels))
    if logits_shard.dim() < 1 or logits_shard.shape[-1] < 1:
        raise ValueError(f"logits_shard: expected shape [..., V_local] with V_local >= 1, got "
                         f"{tuple(logits_shard.shape)}")
    if tuple(labels.shape) != tuple(logits_shard.shape[:-1]):
        raise ValueError(f"labels: expected shape {tuple(logits_shard.shape[:-1])} (the leading shape of "
                         f"logits_shard), got {tuple(labels.shape)}")
    if shift and logits_shard.dim() < 2:
        raise ValueError(f"shift=True: logits_shard needs a sequence dimension, got {tuple(logits_shard.shape)}")
    temperature, logit_scale, softcap, flags, wanted = check_options(
        ignore_index, temperature, logit_scale, softcap, None, outputs, return_entropy, allow_lse=True)
    _group_info(group)
    if logits_shard.stride(-1) != 1 and logits_shard.shape[-1] > 1:
        logits_shard = logits_shard.contiguous()
    start = _resolve_start(vocab_start, logits_shard.shape[-1], group, logits_shard.device)
    if validate is None:
        validate = logits_shard.device.type == "cpu"
    out_shape = labels[..., 1:].shape if shift else labels.shape
    res = _VocabParallelLogprobs.apply(logits_shard, labels, group, start, ignore_index,
                                       (temperature, logit_scale, softcap), bool(shift), flags, bool(validate))
    logp, lse, ent, lss, mean, top1 = res
    return package((logp, ent, lss, mean, top1, lse), out_shape, wanted, outputs, return_entropy)


class _VocabParallelLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, group, start, ignore_index, tf, flags, chunk, validate):
        n_all = labels.numel()
        v_local = weight.shape[0]
        idx = valid_rows(labels, ignore_index)
        hv = hidden if idx is None else hidden.index_select(0, idx)
        lv = labels if idx is None else labels.index_select(0, idx)
        local, inside, _ = _local_labels(lv, ignore_index, start, v_local)
        r = chunked_stats(hv, weight, bias, local, *tf, flags & (ENTROPY | LOG_SUM_SQ | MEAN_LOGIT), chunk,
                          vocab_slice=True, ignore_index=_LOCAL_IGNORE, label_logit=True,
                          extremes=bool(flags & TOP1))
        out = _exchange(r, inside, start, v_local, flags, tf, group)
        full = lambda t: t if (idx is None or t is None) else t.new_zeros(n_all).index_copy_(0, idx, t)
        valid = labels != ignore_index
        for key in ("logp", "lse", "entropy", "log_sum_sq", "mean_logit", "top1", "found"):
            if key in out:
                out[key] = full(out[key])
        res = _finish(out, valid, labels, ignore_index, flags, validate)
        ctx.save_for_backward(hidden, weight, bias, labels, res[1], out.get("entropy"))
        ctx.params = (group, start, ignore_index, tf, chunk, out["vocab"], bool(flags & MEAN_LOGIT))
        ctx.mark_non_differentiable(*[t for t in (res[3], res[5]) if t is not None])
        return res

    @staticmethod
    def backward(ctx, g_logp, g_lse, g_ent, g_lss, g_mean, g_top1):
        hidden, weight, bias, labels, lse, ent = ctx.saved_tensors
        group, start, ignore_index, tf, chunk, vocab, has_mean = ctx.params
        needs = ((NEED_HIDDEN if ctx.needs_input_grad[0] else 0) | (NEED_WEIGHT if ctx.needs_input_grad[1] else 0)
                 | (NEED_BIAS if ctx.needs_input_grad[2] else 0))
        idx = valid_rows(labels, ignore_index)
        sel = lambda t: None if t is None else (t if idx is None else t.index_select(0, idx))
        prep = lambda g: None if g is None else sel(g.to(lse.dtype).contiguous())
        lv = sel(labels)
        local, _, _ = _local_labels(lv, ignore_index, start, weight.shape[0])
        g_ent = prep(g_ent) if ent is not None else None
        dh, dw, db = chunked_backward(prep(g_logp), g_ent, sel(hidden), weight, bias, local, sel(lse),
                                      sel(ent) if g_ent is not None else None, *tf, chunk, needs,
                                      vocab_slice=True, ignore_index=_LOCAL_IGNORE, grad_lse=prep(g_lse),
                                      grad_mean=prep(g_mean) if has_mean else None, mean_vocab=vocab)
        if dh is not None:
            if idx is not None:
                dh = hidden.new_zeros(hidden.shape).index_copy_(0, idx, dh)
            dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=group)  # sum of the shards' parts
        return dh, dw, db, None, None, None, None, None, None, None, None


def vocab_parallel_linear_token_logprobs(
    hidden: Tensor,
    weight_shard: Tensor,
    labels: Tensor,
    *,
    bias_shard: Optional[Tensor] = None,
    group=None,
    vocab_start: Optional[int] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    shift: bool = False,
    return_entropy: bool = False,
    outputs: Optional[Sequence[str]] = None,
    chunk_size: Optional[int] = None,
    validate: Optional[bool] = None,
):
    """:func:`pyalign.linear.linear_token_logprobs` with the LM head split by vocabulary rows.

    ``hidden`` (``[..., H]``) and ``labels`` are the same on every rank; ``weight_shard`` is
    ``[V_local, H]``, rows ``[vocab_start, vocab_start + V_local)`` of the full head, and
    ``bias_shard`` the matching ``[V_local]``. Each rank computes its shard chunk by chunk (no
    ``[tokens, V_local]`` logits are held); the forward makes one ``all_gather`` of per-token
    statistics, the backward one ``all_reduce`` of ``dhidden`` (so ``hidden.grad`` is the full
    gradient on every rank), while ``weight_shard`` and ``bias_shard`` get their shard's gradient.
    ``outputs`` may include ``"lse"``; gradients flow through the log-probs, the entropy, ``lse`` and
    ``mean_logit``. Dtypes as in :func:`pyalign.linear.linear_token_logprobs`: fp32/bf16/fp16 tensors
    of different dtypes run in the promoted dtype (or autocast's), each gradient in its input's
    dtype; the backward's loop order (token-outer or vocab-blocked) is chosen as there.
    """
    check_head(hidden, weight_shard, bias_shard, labels, shift=shift, weight_name="weight_shard",
               bias_name="bias_shard", mixed_dtypes=True)
    temperature, logit_scale, softcap, flags, wanted = check_options(
        ignore_index, temperature, logit_scale, softcap, chunk_size, outputs, return_entropy, allow_lse=True)
    _group_info(group)
    hidden, weight_shard, bias_shard = cast_head(hidden, weight_shard, bias_shard)
    if shift:
        hidden, labels = hidden[..., :-1, :], labels[..., 1:]
    out_shape = labels.shape
    v_local, H = weight_shard.shape
    start = _resolve_start(vocab_start, v_local, group, hidden.device)
    if validate is None:
        validate = hidden.device.type == "cpu"
    h2, l1 = hidden.reshape(-1, H), labels.reshape(-1)
    if chunk_size is None:
        chunk_size = auto_chunk_size(max(1, l1.numel()), v_local, hidden.dtype, hidden.device, H)
    res = _VocabParallelLinear.apply(h2, weight_shard, bias_shard, l1, group, start, ignore_index,
                                     (temperature, logit_scale, softcap), flags, int(chunk_size), bool(validate))
    logp, lse, ent, lss, mean, top1 = res
    return package((logp, ent, lss, mean, top1, lse), out_shape, wanted, outputs, return_entropy)
