"""The vocab-parallel distillation divergence (method: :mod:`pyalign.distributed`): each rank holds
the same columns of the student's and the teacher's logits; one ``all_gather`` of the rows' local
log-sum-exps gives both global softmax normalizers, one ``all_reduce`` of the rows' local parts gives
the divergence (the math of ``csrc/include/pyalign/distill.h``, here in torch over row chunks of the
shards), and each rank forms its shard's gradients in the forward; the backward scales them.

The top-k variant (:class:`VocabParallelTopkDistillation`) needs the student's lse and its logits at
the teacher's ids: one all_gather and one ``[N, K]`` all_reduce.

Collectives take a process group, which no op schema can carry, so this is a
``torch.autograd.Function`` (eager only, not traced by ``torch.compile``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from pyalign._tensors import acc_dtype
from pyalign.ops.distill import row_scale
from pyalign.ops.distill_topk import reduced_divergence
from pyalign.ops.vocab_parallel import _all_gather

# Rows per chunk: chunk * V_local entries of each temporary.
CHUNK_ENTRIES = 1 << 22


def _transform(x: Tensor, temperature: float, softcap: float):
    """``(z, dz/dx)`` of the logits transform (softcap, then the temperature)."""
    if softcap > 0:
        t = torch.tanh(x / softcap)
        return softcap * t / temperature, (1 - t * t) / temperature
    return x / temperature, None


def _xlogy(p: Tensor, lp: Tensor, lq: Tensor) -> Tensor:
    return torch.where(p > 0, p * (lp - lq), torch.zeros_like(p))


def divergence_passes(n: int, chunk: int, logits, acc, device, group, beta: float, temperature: float, caps: tuple,
                      weight: Tensor, kept: Tensor, teacher_grad: bool, on_grad) -> tuple[Tensor, Tensor]:
    """The vocab-parallel generalized JSD over row chunks of this rank's columns: ``logits(c0, c1)``
    gives a chunk's raw student and teacher logits (acc dtype); three sweeps (the local lse, gathered;
    the local parts of the divergence, reduced; the gradients). ``on_grad(c0, c1, gs, gt)`` receives each
    chunk's gradient w.r.t. the raw logits of the total (``gt`` None unless ``teacher_grad``).
    Returns ``(total, rows, weights)`` (the weights zeroed at ignored rows)."""
    world = dist.get_world_size(group)
    mode = "forward_kl" if beta == 0 else "reverse_kl" if beta == 1 else "jsd"

    def z(c0, c1):
        s_raw, t_raw = logits(c0, c1)
        zs, ds = _transform(s_raw, temperature, caps[0])
        zt, dt = _transform(t_raw, temperature, caps[1])
        return zs, ds, zt, dt

    lse_local = torch.empty(2, n, dtype=acc, device=device)
    for c0 in range(0, n, chunk):
        zs, _, zt, _ = z(c0, c0 + chunk)
        lse_local[0, c0:c0 + chunk], lse_local[1, c0:c0 + chunk] = zs.logsumexp(-1), zt.logsumexp(-1)
    gathered = torch.empty(world * 2, n, dtype=acc, device=device)
    _all_gather(gathered, lse_local, group)
    lse = gathered.view(world, 2, n).logsumexp(0)  # [2, n]: the student's and the teacher's global lse
    log1mb, logb = (math.log1p(-beta), math.log(beta)) if mode == "jsd" else (0.0, 0.0)

    def entries(c0, c1):
        zs, ds, zt, dt = z(c0, c1)
        ls, lt = zs - lse[0, c0:c1, None], zt - lse[1, c0:c1, None]
        lm = torch.logaddexp(ls + log1mb, lt + logb) if mode == "jsd" else None
        return ls, lt, lm, ds, dt

    parts = torch.zeros(2, n, dtype=acc, device=device)  # the student's and the teacher's
    for c0 in range(0, n, chunk):
        ls, lt, lm, _, _ = entries(c0, c0 + chunk)
        ps, pt = ls.exp(), lt.exp()
        if mode == "forward_kl":
            parts[1, c0:c0 + chunk] = _xlogy(pt, lt, ls).sum(-1)
        elif mode == "reverse_kl":
            parts[0, c0:c0 + chunk] = _xlogy(ps, ls, lt).sum(-1)
        else:
            parts[0, c0:c0 + chunk] = _xlogy(ps, ls, lm).sum(-1)
            parts[1, c0:c0 + chunk] = _xlogy(pt, lt, lm).sum(-1)
    dist.all_reduce(parts, group=group)
    ks, kt = parts[0], parts[1]
    rows = {"forward_kl": kt, "reverse_kl": ks, "jsd": beta * kt + (1 - beta) * ks}[mode]
    rows = torch.where(kept, rows, torch.zeros_like(rows))
    w = torch.where(kept, weight, torch.zeros_like(weight))
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        ls, lt, lm, ds, dt = entries(c0, c1)
        ps, pt = ls.exp(), lt.exp()
        L, a, b = rows[c0:c1, None], ks[c0:c1, None], kt[c0:c1, None]
        zero = torch.zeros_like(ps)
        if mode == "forward_kl":
            gs, gt = ps - pt, torch.where(pt > 0, pt * (lt - ls - L), zero)
        elif mode == "reverse_kl":
            gs, gt = torch.where(ps > 0, ps * (ls - lt - L), zero), pt - ps
        else:
            gs = torch.where(ps > 0, (1 - beta) * ps * (ls - lm - a), zero)
            gt = torch.where(pt > 0, beta * pt * (lt - lm - b), zero)
        scale = w[c0:c1, None]
        gs = gs * scale * (ds if ds is not None else 1 / temperature)
        gt = gt * scale * (dt if dt is not None else 1 / temperature) if teacher_grad else None
        on_grad(c0, c1, gs, gt)
    return (w * rows).sum(), rows, w


class VocabParallelDistillation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, weight: Tensor, kept: Tensor, group, beta: float,
                temperature: float, caps: tuple, teacher_grad: bool):
        acc = acc_dtype(student)
        n, v = student.shape
        grad_s = torch.empty(n, v, dtype=acc, device=student.device)
        grad_t = torch.empty(n, v, dtype=acc, device=student.device) if teacher_grad else None

        def store(c0, c1, gs, gt):
            grad_s[c0:c1] = gs
            if gt is not None:
                grad_t[c0:c1] = gt

        total, rows, w = divergence_passes(
            n, max(1, CHUNK_ENTRIES // max(1, v)), lambda c0, c1: (student[c0:c1].to(acc), teacher[c0:c1].to(acc)),
            acc, student.device, group, beta, temperature, caps, weight, kept, teacher_grad, store)
        ctx.save_for_backward(grad_s, grad_t, w)
        ctx.dtypes = (student.dtype, teacher.dtype)
        ctx.mark_non_differentiable(rows)
        return total, rows

    @staticmethod
    def backward(ctx, g_total, g_rows):
        grad_s, grad_t, w = ctx.saved_tensors
        scale = row_scale(w, g_total, None, grad_s.dtype)
        gs = (grad_s * scale).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        gt = (grad_t * scale).to(ctx.dtypes[1]) if (grad_t is not None and ctx.needs_input_grad[1]) else None
        return gs, gt, None, None, None, None, None, None, None


class VocabParallelLinearDistillation(torch.autograd.Function):
    """The same divergence from both models' hidden states and their LM heads split by vocabulary
    rows (each rank the same rows of both heads): each chunk's logits are recomputed in each of the
    three sweeps (two GEMMs per sweep, four more per head with gradients in the last), so no
    ``[N, V_local]`` logits are held; ``dhidden`` (a sum over the shards) is all-reduced once."""

    @staticmethod
    def forward(ctx, hs: Tensor, ws: Tensor, bs: Optional[Tensor], ht: Tensor, wt: Tensor, bt: Optional[Tensor],
                weight: Tensor, kept: Tensor, group, beta: float, temperature: float, caps: tuple, chunk: int,
                needs_s: tuple, needs_t: tuple):
        acc = acc_dtype(hs)
        n, v = hs.shape[0], ws.shape[0]
        heads = [tuple(None if x is None else x.to(acc) for x in side) for side in ((hs, ws, bs), (ht, wt, bt))]

        def logits(c0, c1):
            return tuple(torch.addmm(b, h[c0:c1], w.t()) if b is not None else h[c0:c1] @ w.t()
                         for h, w, b in heads)

        grads = [[torch.zeros_like(x) if (x is not None and need) else None for x, need in zip(side, needs)]
                 for side, needs in zip(heads, (needs_s, needs_t))]

        def accumulate(c0, c1, gs, gt):
            for (h, w, _), (dh, dw, db), g in zip(heads, grads, (gs, gt)):
                if g is None:
                    continue
                if dh is not None:
                    dh[c0:c1] = g @ w
                if dw is not None:
                    dw.addmm_(g.t(), h[c0:c1])
                if db is not None:
                    db += g.sum(0)

        teacher_grad = any(needs_t)
        total, rows, w = divergence_passes(n, chunk, logits, acc, hs.device, group, beta, temperature, caps, weight,
                                           kept, teacher_grad, accumulate)
        for dh in (grads[0][0], grads[1][0]):
            if dh is not None:
                dist.all_reduce(dh, group=group)  # each shard's partial product
        flat = [g for side in grads for g in side]
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in flat))
        ctx.present = [g is not None for g in flat]
        ctx.dtypes = [x.dtype if x is not None else None for x in (hs, ws, bs, ht, wt, bt)]
        ctx.mark_non_differentiable(rows)
        return total, rows

    @staticmethod
    def backward(ctx, g_total, g_rows):
        out = []
        for g, present, dtype in zip(ctx.saved_tensors, ctx.present, ctx.dtypes):
            out.append((g * g_total).to(dtype) if present and g_total is not None else None)
        return (*out,) + (None,) * 9


def shard_layout(start: int, v_local: int, group, device) -> int:
    """The whole vocabulary's size, after checking (on every rank alike) that the ranks' column ranges
    ``[start, start + v_local)`` tile ``[0, V)``; one small all_gather."""
    world = dist.get_world_size(group)
    every = torch.empty(world * 2, dtype=torch.int64, device=device)
    _all_gather(every, torch.tensor([start, v_local], dtype=torch.int64, device=device), group)
    spans = sorted(tuple(int(x) for x in pair) for pair in every.view(world, 2).tolist())
    end = 0
    for s0, n in spans:
        if s0 != end:
            raise ValueError(f"vocab_start: the ranks' shards [start, start + V_local) = {spans} do not tile "
                             "[0, V) (a gap or an overlap)")
        end = s0 + n
    return end


class VocabParallelTopkDistillation(torch.autograd.Function):
    """The divergence to a top-k teacher (:mod:`pyalign.ops.distill_topk`) over the student's logits
    split by vocabulary columns: one all_gather of the rows' local log-sum-exps, one all_reduce of the
    student's raw logits at the teacher's ids (each rank contributes the ids in its columns), the
    ``[N, K]`` reduced divergence on every rank alike, and each rank's shard gradient (the dense
    ``c p_j`` part plus the corrections at its ids) formed in the forward."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher_logprobs: Tensor, ids: Tensor, weight: Tensor, kept: Tensor, group,
                start: int, vocab: int, divergence: str, tail: str, temperature: float):
        acc = acc_dtype(student)
        n, v = student.shape
        world = dist.get_world_size(group)
        chunk = max(1, CHUNK_ENTRIES // max(1, v))
        lse_local = torch.empty(n, dtype=acc, device=student.device)
        for c0 in range(0, n, chunk):
            lse_local[c0:c0 + chunk] = (student[c0:c0 + chunk].to(acc) / temperature).logsumexp(-1)
        gathered = torch.empty(world * n, dtype=acc, device=student.device)
        _all_gather(gathered, lse_local, group)
        lse = gathered.view(world, n).logsumexp(0)
        local = ids - start
        inside = (local >= 0) & (local < v)
        local = torch.where(inside, local, torch.zeros_like(local))
        z_ids = torch.where(inside, student.gather(1, local).to(acc), torch.zeros((), dtype=acc, device=student.device))
        dist.all_reduce(z_ids, group=group)  # each id lies in exactly one rank's columns
        a = z_ids / temperature - lse.unsqueeze(-1)
        rows, g_ids, c = reduced_divergence(a, teacher_logprobs.to(acc), divergence, tail, vocab)
        zero = torch.zeros_like(rows)
        rows = torch.where(kept, rows, zero)
        w = torch.where(kept, weight, zero)
        grad = torch.empty(n, v, dtype=acc, device=student.device)
        dense = w * c / temperature
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            p = (student[c0:c1].to(acc) / temperature - lse[c0:c1, None]).exp()
            grad[c0:c1] = p * dense[c0:c1, None]
        corr = (g_ids - c.unsqueeze(-1) * a.exp()) * (w / temperature).unsqueeze(-1)
        corr = torch.where(inside & kept.unsqueeze(-1), corr, torch.zeros_like(corr))
        grad.scatter_add_(1, local, corr)
        ctx.save_for_backward(grad, w)
        ctx.dtype = student.dtype
        ctx.mark_non_differentiable(rows)
        return (w * rows).sum(), rows

    @staticmethod
    def backward(ctx, g_total, g_rows):
        grad, w = ctx.saved_tensors
        gs = (grad * row_scale(w, g_total, None, grad.dtype)).to(ctx.dtype) if ctx.needs_input_grad[0] else None
        return (gs,) + (None,) * 10
