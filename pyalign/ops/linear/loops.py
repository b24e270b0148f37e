"""The chunk loops of the fused linear head (see :mod:`pyalign.ops.linear` for the method):

* :func:`chunked_stats` — the forward: per-row softmax statistics, one logits GEMM per chunk (and,
  for a frozen head, the hidden gradient's basis: one more GEMM);
* :func:`chunked_backward` — the recompute backward, token-outer or vocab-blocked;
* :func:`chunked_forward_grad` — a forward that forms the gradient on the way, for losses whose
  per-token coefficients each chunk can produce from its own statistics (3 GEMMs per chunk).

Each works on the rows that need work (the ignored ones were dropped by the caller) and, with
``vocab_slice``, on one slice of the vocabulary (the vocab-parallel variant).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from pyalign._outputs import ENTROPY, LOG_SUM_SQ, MEAN_LOGIT, TOP1
from pyalign._tensors import LABEL_ELSEWHERE, LABEL_IGNORE, acc_dtype
from pyalign.ops.linear.chunks import NEED_BIAS, NEED_HIDDEN, NEED_WEIGHT, use_vocab_blocks, vocab_block_sizes
from pyalign.ops.linear.gemm import accumulate_dw, acc_mm, dhidden_into, logits_buffer, logits_into
from pyalign.ops.logprob import backward_rows, forward_rows


def _part(t: Optional[Tensor], s: slice) -> Optional[Tensor]:
    return None if t is None else t[s]


def chunked_stats(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                  temperature: float, logit_scale: float, softcap: float, outputs: int, chunk: int,
                  *, vocab_slice: bool = False, ignore_index: int = -100, label_logit: bool = False,
                  extremes: bool = False, mean_weights: Optional[Tensor] = None,
                  basis: Optional[Tensor] = None) -> dict:
    """Per-row softmax statistics of ``hidden @ weight.T + bias`` (``[n]`` each), chunk by chunk.

    Keys: ``logp, lse`` and, by ``outputs`` flags, ``entropy, log_sum_sq, mean_logit, top1``.
    With ``vocab_slice`` the weight is one slice of the vocabulary and labels outside it are
    allowed (see ``LogprobForwardArgs::vocab_slice``). ``label_logit``: also the raw logit at
    each row's label (0 where the label is outside the slice); ``extremes``: the raw max of each
    row (for the argmax test across slices). ``mean_weights``: ``[V]`` class weights of
    ``mean_logit`` (see ``LogprobForwardArgs::mean_weights``). ``basis``: an ``[n, H]`` tensor in
    the accumulation dtype filled with ``(d logp / d logits) @ W`` per row (see
    ``pyalign::linear_token_logprobs_basis``): the backward kernel with unit upstream gradient
    writes ``d logp / d logits`` over the chunk's logits in place, one GEMM multiplies it back.
    """
    n, V = hidden.shape[0], weight.shape[0]
    acc, dev = acc_dtype(hidden), hidden.device
    new = lambda flag, dt=acc: torch.empty(n if outputs & flag else 0, dtype=dt, device=dev)
    res = {"logp": torch.empty(n, dtype=acc, device=dev), "lse": torch.empty(n, dtype=acc, device=dev),
           "entropy": new(ENTROPY), "log_sum_sq": new(LOG_SUM_SQ), "mean_logit": new(MEAN_LOGIT),
           "top1": new(TOP1, torch.bool)}
    if label_logit:
        res["label_logit"] = torch.zeros(n, dtype=acc, device=dev)
    if extremes:
        res["max"] = torch.empty(n, dtype=acc, device=dev)
    if n == 0:
        return res
    tf = (temperature, logit_scale, softcap)
    buf = logits_buffer(min(chunk, n), hidden, weight, bias)
    ones = torch.ones(min(chunk, n), dtype=acc, device=dev) if basis is not None else None  # unit upstream gradient
    opt = lambda key, s: res[key][s] if res[key].numel() else None
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        s = slice(c0, c1)
        b = None  # the previous chunk's oneDNN output is freed before the next is made
        b = logits_into(None if buf is None else buf[: c1 - c0], hidden[s], weight, bias)
        forward_rows(b, labels[s], res["logp"][s], res["lse"][s], opt("entropy", s), opt("log_sum_sq", s),
                     opt("mean_logit", s), opt("top1", s), *tf, ignore_index, mean_weights, vocab_slice=vocab_slice)
        if label_logit:
            lab = labels[s].long()
            inside = (lab >= 0) & (lab < V)
            x = b.gather(1, lab.clamp(0, V - 1).unsqueeze(1)).squeeze(1).to(acc)
            res["label_logit"][s] = torch.where(inside, x, torch.zeros_like(x))
        if extremes:
            res["max"][s] = b.amax(1).to(acc)
        if basis is not None:
            backward_rows(b, labels[s], res["lse"][s], None, ones[: c1 - c0], None, b, *tf, ignore_index)
            if basis.dtype == b.dtype:
                dhidden_into(basis[s], b, weight)
            else:
                basis[s].zero_()
                acc_mm(basis[s], b, weight)
    return res


def chunked_backward(grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor], hidden: Tensor,
                     weight: Tensor, bias: Optional[Tensor], labels: Tensor, lse: Tensor,
                     entropy: Optional[Tensor], temperature: float, logit_scale: float,
                     softcap: float, chunk: int, needs: int, *, vocab_slice: bool = False,
                     ignore_index: int = -100, grad_lse: Optional[Tensor] = None,
                     grad_mean: Optional[Tensor] = None, mean_weights: Optional[Tensor] = None,
                     mean_vocab: int = 0):
    """Gradients ``(dhidden [n, H], dweight [V, H], dbias [V])`` (None where not needed) of
    ``sum(grad_logp * logp + grad_entropy * entropy + grad_lse * lse + grad_mean * mean_logit)``
    over ``n`` rows, given the forward's ``lse`` and ``entropy`` (of the whole vocabulary when
    ``vocab_slice``; ``mean_vocab`` is then the whole vocabulary's size, which divides
    ``mean_logit``). Token-outer or vocab-blocked loop order by :func:`use_vocab_blocks`."""
    n, H, V = hidden.shape[0], hidden.shape[1], weight.shape[0]
    dev, dt = hidden.device, hidden.dtype
    acc = acc_dtype(dt)
    grads = (grad_logp, grad_entropy, grad_lse, grad_mean)
    tf = (temperature, logit_scale, softcap)
    if n > 0 and any(g is not None for g in grads) and use_vocab_blocks(weight, needs):
        return _vocab_blocked_backward(grad_logp, grad_entropy, hidden, weight, bias, labels, lse, entropy, tf,
                                       chunk, needs, vocab_slice, ignore_index, grad_lse, grad_mean, mean_weights,
                                       mean_vocab)
    dh = torch.zeros(n, H, dtype=dt, device=dev) if needs & NEED_HIDDEN else None
    # dW is accumulated in fp32: directly in the result for fp32/fp64 weights, else in a buffer.
    dw_acc = torch.zeros(V, H, dtype=acc_dtype(weight), device=dev) if needs & NEED_WEIGHT else None
    db_acc = torch.zeros(V, dtype=acc, device=dev) if (needs & NEED_BIAS and bias is not None) else None
    if n > 0 and any(g is not None for g in grads):
        buf = logits_buffer(min(chunk, n), hidden, weight, bias)
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            s = slice(c0, c1)
            h = hidden[s]
            b = None  # the previous chunk's oneDNN output is freed before the next is made
            b = logits_into(None if buf is None else buf[: c1 - c0], h, weight, bias)
            backward_rows(b, labels[s], lse[s], _part(entropy, s), _part(grad_logp, s), _part(grad_entropy, s), b,
                          *tf, ignore_index, _part(grad_lse, s), _part(grad_mean, s), mean_weights,
                          vocab_slice=vocab_slice, mean_vocab=mean_vocab)
            if dh is not None:
                dhidden_into(dh[s], b, weight)
            if dw_acc is not None:
                accumulate_dw(dw_acc, b, h)
            if db_acc is not None:
                db_acc += b.sum(0, dtype=acc)
        del buf, b  # the logits buffer and the low-precision dW result never coexist
    dw = None if dw_acc is None else dw_acc.to(weight.dtype)
    db = None if db_acc is None else db_acc.to(bias.dtype)
    return dh, dw, db


def _vocab_blocked_backward(grad_logp, grad_entropy, hidden, weight, bias, labels, lse, entropy, tf, chunk,
                            needs, vocab_slice, ignore_index, grad_lse, grad_mean, mean_weights, mean_vocab):
    """:func:`chunked_backward` with vocabulary blocks outermost and token chunks inside (see
    :mod:`pyalign.ops.linear`). Extra memory: the ``[c, V_block]`` logits block (at most
    ``chunk * V`` elements), an fp32 ``[n, H]`` ``dhidden`` accumulator for bf16/fp16, and an fp32
    ``[V_block, H]`` staging block for bf16/fp16 ``dW`` only when the rows take more than one token
    chunk."""
    n, H, V = hidden.shape[0], hidden.shape[1], weight.shape[0]
    dev, dt = hidden.device, hidden.dtype
    acc = acc_dtype(dt)
    c, vb = vocab_block_sizes(n, V, chunk, dev)
    dh_acc = torch.zeros(n, H, dtype=acc, device=dev) if needs & NEED_HIDDEN else None
    dw = torch.empty(V, H, dtype=weight.dtype, device=dev) if needs & NEED_WEIGHT else None
    db_acc = torch.zeros(V, dtype=acc, device=dev) if (needs & NEED_BIAS and bias is not None) else None
    # Row codes: the global label, LABEL_ELSEWHERE for a label on another rank's slice
    # (vocab_slice), LABEL_IGNORE for ignored rows and (off a slice) labels outside [0, V), which
    # the token-outer kernel also leaves with a zero gradient.
    lab = labels.long()
    inside = (lab >= 0) & (lab < V)
    code = torch.where(inside, lab, torch.full_like(lab, LABEL_ELSEWHERE if vocab_slice else LABEL_IGNORE))
    code = torch.where(lab == ignore_index, torch.full_like(lab, LABEL_IGNORE), code)
    skip = code == LABEL_IGNORE
    mv = mean_vocab if (vocab_slice and mean_vocab > 0) else V
    flat = torch.empty(min(c, n) * vb, dtype=dt, device=dev)
    stage = None
    if dw is not None and c < n and weight.dtype != acc:
        stage = torch.empty(vb, H, dtype=acc, device=dev)
    for v0 in range(0, V, vb):
        v1 = min(V, v0 + vb)
        w_blk = weight[v0:v1]
        b_blk = None if bias is None else bias[v0:v1]
        local = code - v0
        local = torch.where((local >= 0) & (local < v1 - v0), local, torch.full_like(local, LABEL_ELSEWHERE))
        local = torch.where(skip, torch.full_like(local, LABEL_IGNORE), local)
        mw = None if mean_weights is None else mean_weights[v0:v1]
        dw_blk = None
        if dw is not None:
            dw_blk = dw[v0:v1] if (stage is None) else stage[: v1 - v0]
        for c0 in range(0, n, c):
            c1 = min(n, c0 + c)
            s = slice(c0, c1)
            h = hidden[s]
            b = logits_into(flat[: (c1 - c0) * (v1 - v0)].view(c1 - c0, v1 - v0), h, w_blk, b_blk)
            backward_rows(b, local[s], lse[s], _part(entropy, s), _part(grad_logp, s), _part(grad_entropy, s), b,
                          *tf, LABEL_IGNORE, _part(grad_lse, s), _part(grad_mean, s), mw, vocab_slice=True,
                          mean_vocab=mv)
            if dh_acc is not None:
                acc_mm(dh_acc[s], b, w_blk)
            if dw_blk is not None:
                if c0 == 0 and (c1 == n or dw_blk.dtype == dt):
                    # the first (with one token chunk: the only) product, straight into its block;
                    # bf16/fp16 then rounds once, from the GEMM's fp32 accumulation
                    torch.mm(b.t(), h, out=dw_blk)
                else:
                    if c0 == 0:
                        dw_blk.zero_()
                    acc_mm(dw_blk, b.t(), h)
            if db_acc is not None:
                db_acc[v0:v1] += b.sum(0, dtype=acc)
        if stage is not None:
            dw[v0:v1].copy_(dw_blk)
    del flat, stage
    dh = None if dh_acc is None else dh_acc.to(dt)
    db = None if db_acc is None else db_acc.to(bias.dtype)
    return dh, dw, db


def chunked_forward_grad(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                         temperature: float, logit_scale: float, softcap: float, chunk: int, needs: int,
                         row_grads: Callable, *, entropy: bool = False, grad_mean: Optional[Tensor] = None,
                         mean_weights: Optional[Tensor] = None, ignore_index: int = -100):
    """Per-row ``(logp, lse, entropy, mean_logit)`` (``entropy`` empty unless asked for, ``mean_logit``
    empty without ``grad_mean``) and the gradients ``(dh [n, H], dW [V, H], db [V])`` (None where
    ``needs`` has no bit) of ``sum_t grad_logp_t logp_t + grad_entropy_t entropy_t + grad_lse_t lse_t
    + grad_mean_t mean_t``, where the per-row coefficients of each chunk come from
    ``row_grads(rows, logp, lse, entropy) -> (grad_logp, grad_entropy or None, grad_lse or None)``,
    called with the chunk's own statistics as the forward kernel produced them (``rows``: the
    chunk's slice of the ``n`` rows). One logits GEMM per chunk, the forward kernel, the backward
    kernel in place, ``dh = g @ W`` and ``dW += g.T @ h``: 3 GEMMs.

    ``dW``: fp32/fp64 weights accumulate in the result itself; bf16/fp16 weights with all rows in
    one chunk take one GEMM straight into the result (fp32 inside the GEMM, rounded once), else an
    fp32 ``[V, H]`` accumulator filled by :func:`accumulate_dw` (vocabulary slices, no low-precision
    ``[V, H]`` temporary), rounded once at the end."""
    n, H, V = hidden.shape[0], hidden.shape[1], weight.shape[0]
    dt, dev = hidden.dtype, hidden.device
    acc = acc_dtype(dt)
    tf = (temperature, logit_scale, softcap)
    logp = torch.empty(n, dtype=acc, device=dev)
    lse = torch.empty(n, dtype=acc, device=dev)
    ent = torch.empty(n if entropy else 0, dtype=acc, device=dev)
    mean = torch.empty(n if grad_mean is not None else 0, dtype=acc, device=dev)
    dh = torch.empty(n, H, dtype=dt, device=dev) if needs & NEED_HIDDEN else None
    db_acc = torch.zeros(V, dtype=acc, device=dev) if (needs & NEED_BIAS and bias is not None) else None
    dw = dw_acc = None
    if needs & NEED_WEIGHT:
        if n == 0:
            dw = torch.zeros(V, H, dtype=weight.dtype, device=dev)
        elif acc_dtype(weight) != weight.dtype and n > chunk:
            dw_acc = torch.zeros(V, H, dtype=torch.float32, device=dev)
        else:
            dw = torch.empty(V, H, dtype=weight.dtype, device=dev)
    if n > 0:
        buf = logits_buffer(min(chunk, n), hidden, weight, bias)
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            s = slice(c0, c1)
            h = hidden[s]
            b = None  # the previous chunk's oneDNN output is freed before the next is made
            b = logits_into(None if buf is None else buf[: c1 - c0], h, weight, bias)
            e = ent[s] if entropy else None
            forward_rows(b, labels[s], logp[s], lse[s], e, None, mean[s] if grad_mean is not None else None, None,
                         *tf, ignore_index, mean_weights)
            g_logp, g_ent, g_lse = row_grads(s, logp[s], lse[s], e)
            backward_rows(b, labels[s], lse[s], e, g_logp, g_ent, b, *tf, ignore_index, g_lse,
                          _part(grad_mean, s), mean_weights)
            if dh is not None:
                dhidden_into(dh[s], b, weight)
            if dw_acc is not None:
                accumulate_dw(dw_acc, b, h)
            elif dw is not None:
                if c0 == 0:
                    torch.mm(b.t(), h, out=dw)
                else:
                    dw.addmm_(b.t(), h)
            if db_acc is not None:
                db_acc += b.sum(0, dtype=acc)
        del buf, b  # the logits buffer and the rounded dW never coexist
    if dw_acc is not None:
        dw = dw_acc.to(weight.dtype)
        del dw_acc
    db = None if db_acc is None else db_acc.to(bias.dtype)
    return logp, lse, ent, mean, dh, dw, db
