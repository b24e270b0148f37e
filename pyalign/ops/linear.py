"""Fused linear head + log-probs: ``pyalign::linear_token_logprobs`` and its backward.

The logits ``hidden @ weight.T + bias`` are never held whole. Tokens are processed in chunks of
``chunk`` rows; each chunk's logits go into one reused ``[chunk, V]`` buffer (``torch.mm`` /
``torch.addmm``, i.e. the BLAS of the device; on CPU fp32 oneDNN's matmul, which returns a fresh
buffer per chunk: see ``_ONEDNN``), then through the log-prob kernels of
``csrc/cpu/logprob.cpp`` / ``csrc/cuda/logprob.cu``:

* forward: the softmax statistics of each row (``kernels.logprob_forward``); only per-token results
  survive the chunk;
* backward: the chunk's logits are recomputed, the gradient w.r.t. them is written **in place**
  into the same buffer (``kernels.logprob_backward`` with ``grad_logits`` aliasing the logits), and
  multiplied back: ``dhidden_chunk = g @ W``, ``dW += g.T @ hidden_chunk`` (accumulated in fp32,
  see :func:`accumulate_dw`), ``dbias += g.sum(0)`` (fp32). The upstream gradients of the
  log-probs, the entropy, the log-sum-exp and ``mean_logit`` all enter that one kernel call, so
  a z-loss (``lse^2``) or label smoothing (``lse - mean_logit``) costs no extra pass.

The backward has two loop orders (same results within rounding, both deterministic: fixed order,
no atomics), chosen by :func:`use_vocab_blocks`:

* token-outer (fp32/fp64 weights, or no weight gradient): as above, the chunk's logits over the
  whole vocabulary; ``dW`` accumulates in the result itself (fp32/fp64) or in an fp32 ``[V, H]``
  buffer;
* vocab-blocked (bf16/fp16 weights that need a gradient): vocabulary blocks outermost, token
  chunks inside (:func:`vocab_block_sizes`). For each (token chunk, vocab block) one GEMM makes the
  block's logits, the slice-mode kernel (``kernels.logprob_backward_slice``: the forward's global
  ``lse``/entropy, labels as block-local indices or -1 for "label in another block", ``mean_vocab``
  = V and the block's class weights for ``grad_mean``) writes the gradient in place, then
  ``dh[tok] += g @ W[vb]`` (fp32 ``dh`` accumulator for bf16/fp16) and ``dW[vb] += g.T @ h[tok]``.
  With all tokens in one chunk (the usual case) the block's ``dW`` is one GEMM written straight
  into the result; otherwise an fp32 ``[V_block, H]`` staging block is written once into ``dW``. No
  ``[V, H]`` fp32 accumulator exists.

Recomputing the logits in the backward costs one extra GEMM (4 instead of eager's 3). For
per-token outputs that is unavoidable: the upstream gradient is a per-token vector known only in
the backward, and ``dW = sum_t g_t (x) h_t`` cannot be rescaled per token after the sum. A
*reduced* cross-entropy ("mean"/"sum") is different: its per-token coefficients are known in the
forward up to the one scalar ``grad_output`` (the "mean" divisor comes from the labels, the
z-loss coefficient ``2 z lse_t / N`` from the chunk's own forward kernel), so
``pyalign::linear_cross_entropy_fwd_grad`` forms the gradient in the forward, 3 GEMMs per chunk
(:func:`chunked_forward_grad`), holds ``dh``/``dW``/``db`` until the backward and there only
multiplies them by ``grad_output`` (as Liger-Kernel does). Its separate z-loss output
(``return_z_loss``) has its own upstream gradient; when that is nonzero the backward adds its part
with the recompute loop (``pyalign::linear_cross_entropy_fwd_grad_backward``), so any combination
of the two is exact. Rows whose label is ``ignore_index`` are dropped before any GEMM.

The helpers :func:`chunked_stats` and :func:`chunked_backward` also serve the vocab-parallel
variant in :mod:`pyalign.distributed`, on a shard of the vocabulary (``vocab_slice=True``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pyalign._ext import kernels, desc, stream_of
from pyalign.ops.logprob import ENTROPY, LOG_SUM_SQ, MEAN_LOGIT, TOP1, dense_grad

# Bytes of the per-chunk working set (the logits buffer and the chunk's hidden-sized temporaries)
# when chunk_size is automatic. The GEMMs run at full speed from a few hundred rows on, so a
# larger buffer buys little time for a lot of memory.
CHUNK_BYTES = {"cpu": 64 << 20, "cuda": 512 << 20}
MIN_CHUNK = 16
# Rows from which a chunk's GEMMs are efficient (M of the logits/dhidden GEMMs, K of the dW GEMM):
# the automatic chunk is not made smaller than this for the hidden-size part of the budget.
GEMM_ROWS = {"cpu": 128, "cuda": 512}
# At most this many rows per automatic chunk: on the 2-core EPYC (32 MB L3) fp32 fwd+bwd at
# 8192 x 1024 x 32000 took 11.0 s with 256-row chunks (a 32 MB logits buffer, which the kernels
# and the two product GEMMs then find in cache), 11.3 s with 480 and 11.1 s with 192.
MAX_ROWS = {"cpu": 256}
# The fp32 staging block of the low-precision dW accumulation is at most this fraction of the
# logits buffer (see accumulate_dw).
DW_BLOCK_FRACTION = 8

NEED_HIDDEN, NEED_WEIGHT, NEED_BIAS = 1, 2, 4

# Vocab-blocked backward: the smallest vocabulary block worth a GEMM (N of the logits GEMM, K of
# the dhidden GEMM, M of the dW GEMM) before the token chunk is split instead.
MIN_VOCAB_BLOCK = {"cpu": 1024, "cuda": 4096}
# Label codes of the slice kernels in the vocab-blocked path: an ignored row, a label in another
# block (any negative value other than the ignore code means "elsewhere").
_BLOCK_IGNORE = -(1 << 62)
_ELSEWHERE = -1
# Private switches for tests: force the backward path (None: automatic, "token", "vocab") and the
# vocab-blocked path's (token chunk, vocab block) sizes.
_FORCE_BACKWARD: Optional[str] = None
_FORCE_BLOCKS: Optional[tuple] = None


def auto_chunk_size(rows: int, vocab: int, dtype: torch.dtype, device: torch.device | str,
                    hidden: int = 0) -> int:
    """Rows per chunk, from V, the hidden size H, the dtype and the device.

    Each chunk row costs ``V * itemsize`` bytes of logits buffer plus ``H * (itemsize + 4)`` bytes
    of hidden-sized temporaries (the chunk's ``dhidden`` rows, an fp32 copy of the chunk's hidden
    rows for low-precision ``dW`` accumulation or mixed dtypes). The chunk is the number of such
    rows that fits ``CHUNK_BYTES[device]``, but never fewer than the logits buffer alone allows
    capped at ``GEMM_ROWS[device]`` (so a large H does not shrink the chunk below the size at which
    the GEMMs stay efficient), at most ``MAX_ROWS[device]`` (CPU: 256), rounded down to a multiple
    of 16, at least 16, at most ``rows``.
    The peak extra memory of the fused head beyond its gradients is then about
    ``chunk * V * itemsize`` + O(tokens * H) (an fp32 ``[tokens, H]`` ``dhidden`` accumulator for
    bf16/fp16 weights, which take the vocab-blocked backward; see pyalign.linear)."""
    dev = torch.device(device).type
    item = torch.empty((), dtype=dtype).element_size()
    budget = CHUNK_BYTES.get(dev, CHUNK_BYTES["cpu"])
    by_logits = budget // (max(1, vocab) * item)
    with_hidden = budget // (max(1, vocab) * item + max(0, hidden) * (item + 4))
    chunk = max(with_hidden, min(by_logits, GEMM_ROWS.get(dev, GEMM_ROWS["cpu"])))
    chunk = min(chunk, MAX_ROWS.get(dev, chunk))
    chunk = max(MIN_CHUNK, chunk // 16 * 16)
    return int(max(1, min(chunk, rows)))


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_MM_OUT_DTYPE = {}  # device type -> whether torch.mm(..., out_dtype=float32) works there


def _mm_fp32(a: Tensor, b: Tensor) -> Optional[Tensor]:
    """``a @ b`` of bf16/fp16 operands produced directly in fp32 (no rounding of the product), where
    torch offers it for the device (``torch.mm(out_dtype=...)``, CUDA); None elsewhere."""
    dev = a.device.type
    if _MM_OUT_DTYPE.get(dev) is False:
        return None
    try:
        out = torch.mm(a, b, out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError):
        _MM_OUT_DTYPE[dev] = False
        return None
    _MM_OUT_DTYPE[dev] = True
    return out


def accumulate_dw(dw_acc: Tensor, g: Tensor, h: Tensor) -> None:
    """``dw_acc += g.T @ h`` for one chunk (``g [c, V]``, ``h [c, H]``).

    Same dtype (fp32/fp64): one in-place ``addmm_``. bf16/fp16 chunk into the fp32 accumulator: the
    product is formed in fp32 and never rounded to the low precision, block by block over V so the
    fp32 staging stays at most ``1/DW_BLOCK_FRACTION`` of the logits buffer (no ``[V, H]``
    temporary): with ``torch.mm(out_dtype=float32)`` where the device has it (a ``[Vb, H]`` fp32
    block, tensor-core speed), else ``addmm_`` on fp32 copies of the blocks (``[c, Vb]``).
    """
    if dw_acc.dtype == g.dtype:
        dw_acc.addmm_(g.t(), h)
        return
    c, V = g.shape
    H = h.shape[1]
    cap = max(1 << 20, c * V * g.element_size() // DW_BLOCK_FRACTION)
    vb = max(64, cap // (4 * max(H, c, 1)))
    h32 = None
    for v0 in range(0, V, vb):
        v1 = min(V, v0 + vb)
        part = _mm_fp32(g[:, v0:v1].t(), h) if g.device.type != "cpu" else None
        if part is not None:
            dw_acc[v0:v1] += part
            continue
        if h32 is None:
            h32 = h.to(dw_acc.dtype)
        dw_acc[v0:v1].addmm_(g[:, v0:v1].t().to(dw_acc.dtype), h32)


_ADDMM_FP32 = {}  # device -> whether torch.addmm(acc, a, b, out_dtype=float32, out=acc) accumulates correctly


def _addmm_fp32_ok(device: torch.device) -> bool:
    """Whether ``torch.addmm(acc, a, b, out_dtype=float32, out=acc)`` with bf16 ``a, b`` adds the
    fp32 product into ``acc`` in place here (checked once per device on a tiny exact case: the op
    exists on CUDA in recent torch only, and its dtype rules changed between releases)."""
    key = str(device)
    if key in _ADDMM_FP32:
        return _ADDMM_FP32[key]
    ok = False
    if device.type != "cpu" and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        try:
            a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], device=device).to(torch.bfloat16)
            acc = torch.full((2, 2), 0.5, device=device)
            r = torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
            want = torch.tensor([[7.5, 10.5], [15.5, 22.5]], device=device)
            ok = r.data_ptr() == acc.data_ptr() and bool(torch.equal(acc, want))
        except (RuntimeError, TypeError, NotImplementedError):
            ok = False
        _ADDMM_FP32[key] = ok
    return ok


def _acc_mm(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` with ``acc`` in the accumulation dtype. Same dtype: ``addmm_``. bf16/fp16
    operands into fp32: the product in fp32 in place (``addmm(out_dtype=float32)``) where the device
    has it, else an fp32 product (``mm(out_dtype=float32)``), else (CPU: torch has neither) the
    product in the operands' dtype (fp32-accumulated inside the GEMM, rounded once) added in fp32."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
        return
    if _addmm_fp32_ok(acc.device):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        return
    part = _mm_fp32(a, b) if a.device.type != "cpu" else None
    acc += torch.mm(a, b) if part is None else part


def use_vocab_blocks(weight: Tensor, needs: int) -> bool:
    """The backward loop order: vocab-blocked when the weight gradient would otherwise need a
    separate fp32 ``[V, H]`` accumulator (bf16/fp16 weights that require grad), token-outer else."""
    if _FORCE_BACKWARD is not None:
        return _FORCE_BACKWARD == "vocab"
    return bool(needs & NEED_WEIGHT) and _acc(weight.dtype) != weight.dtype


def vocab_block_sizes(rows: int, vocab: int, chunk: int, device: torch.device | str) -> tuple[int, int]:
    """``(token_chunk, vocab_block)`` of the vocab-blocked backward. The logits block gets the
    token-outer path's buffer, ``chunk * V`` elements. All rows go in one token chunk when that
    leaves a vocabulary block of at least ``MIN_VOCAB_BLOCK[device]`` (capped at V), the block then
    being as wide as the buffer allows, a multiple of 64; else the block is that minimum and the
    token chunk what fits (a multiple of 16, at least 16)."""
    if _FORCE_BLOCKS is not None:
        c, vb = _FORCE_BLOCKS
        return int(max(1, min(c, rows))), int(max(1, min(vb, vocab)))
    dev = torch.device(device).type
    rows, vocab, chunk = max(1, rows), max(1, vocab), max(1, chunk)
    elems = chunk * vocab
    floor = min(vocab, MIN_VOCAB_BLOCK.get(dev, MIN_VOCAB_BLOCK["cpu"]))
    if rows * floor <= elems:
        vb = min(vocab, elems // rows)
        if vb < vocab:
            vb = max(floor, vb // 64 * 64)
        return rows, int(vb)
    c = max(MIN_CHUNK, elems // floor // 16 * 16)
    return int(min(c, rows)), int(floor)


# CPU fp32: the GEMMs whose one side is the whole vocabulary (the chunk's logits ``h @ W.T`` and
# ``dh = g @ W``) run through oneDNN's matmul (``mkldnn::_linear_pointwise``, the op torch.compile's
# CPU backend emits for linear layers), not the BLAS behind ``torch.mm``: at chunk shapes (a few
# hundred rows against V = 32000, H = 1024) it measured 185-204 GFLOP/s against MKL sgemm's 135-166
# on the 2-core EPYC (fp32 arithmetic either way, bitwise the same for 1 and 2 threads). It returns
# a fresh tensor (no ``out=``), so the chunk's logits buffer is allocated per chunk there. ``dW``
# stays ``addmm_`` (it accumulates in place, and there BLAS was the faster). None: automatic;
# False: BLAS everywhere (tests, bench).
_ONEDNN: Optional[bool] = None
_ONEDNN_WORKS: Optional[bool] = None  # set by the first call: False if the op is missing or fails


def use_onednn(*tensors: Optional[Tensor]) -> bool:
    """Whether the vocabulary-sized GEMMs of these operands go through oneDNN (see ``_ONEDNN``):
    CPU, all fp32 and contiguous, oneDNN present and enabled (``torch.backends.mkldnn``)."""
    ts = [t for t in tensors if t is not None]
    return (_ONEDNN is not False and _ONEDNN_WORKS is not False and ts[0].device.type == "cpu"
            and all(t.dtype == torch.float32 and t.is_contiguous() for t in ts)
            and torch.backends.mkldnn.is_available() and torch._C._get_mkldnn_enabled())


def _onednn_linear(x: Tensor, w: Tensor, bias: Optional[Tensor]) -> Optional[Tensor]:
    """``x @ w.T + bias`` by oneDNN, or None (remembered) where the op is missing or refuses."""
    global _ONEDNN_WORKS
    try:
        out = torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")
    except (AttributeError, RuntimeError, NotImplementedError):
        _ONEDNN_WORKS = False
        return None
    _ONEDNN_WORKS = True
    return out


def logits_buffer(rows: int, hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Optional[Tensor]:
    """The reused ``[rows, V]`` logits buffer of a token-outer loop, or None where the chunk GEMM
    goes through oneDNN (which makes its own output)."""
    if use_onednn(hidden, weight, bias):
        return None
    return torch.empty(rows, weight.shape[0], dtype=hidden.dtype, device=hidden.device)


def _logits_into(buf: Optional[Tensor], h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The chunk's logits ``h @ weight.T + bias``: into ``buf``, or (``buf`` None, see
    :func:`logits_buffer`) a fresh tensor from oneDNN."""
    if buf is None:
        out = _onednn_linear(h, weight, bias) if use_onednn(h, weight, bias) else None
        if out is not None:
            return out
        buf = torch.empty(h.shape[0], weight.shape[0], dtype=h.dtype, device=h.device)
    if bias is None:
        return torch.mm(h, weight.t(), out=buf)
    return torch.addmm(bias, h, weight.t(), out=buf)


def _dhidden_into(out: Tensor, g: Tensor, weight: Tensor) -> None:
    """``out = g @ weight`` (the chunk's ``dhidden`` rows), by oneDNN where :func:`use_onednn`."""
    part = _onednn_linear(g, weight.t(), None) if use_onednn(g, weight) else None
    if part is None:
        torch.mm(g, weight, out=out)
    else:
        out.copy_(part)


def valid_rows(labels: Tensor, ignore_index: int) -> Optional[Tensor]:
    """Indices of the rows to compute, or None when every row counts (no gather needed)."""
    keep = labels != ignore_index
    if bool(keep.all()):
        return None
    return keep.nonzero().squeeze(1)


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
    :func:`linear_token_logprobs_basis_op`): the backward kernel with unit upstream gradient
    writes ``d logp / d logits`` over the chunk's logits in place, one GEMM multiplies it back.
    """
    n, V = hidden.shape[0], weight.shape[0]
    acc, dev = _acc(hidden.dtype), hidden.device
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
    forward = kernels.logprob_forward_slice if vocab_slice else kernels.logprob_forward
    buf = logits_buffer(min(chunk, n), hidden, weight, bias)
    stream = stream_of(hidden)
    opt = lambda key, s: desc(res[key][s], key) if res[key].numel() else None
    # the unit upstream gradient of the basis (held here: a descriptor does not keep its tensor alive)
    ones = torch.ones(min(chunk, n), dtype=acc, device=dev) if basis is not None else None
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        s = slice(c0, c1)
        b = None  # the previous chunk's oneDNN output is freed before the next is made
        b = _logits_into(None if buf is None else buf[: c1 - c0], hidden[s], weight, bias)
        forward(desc(b, "logits"), desc(labels[s], "labels"), desc(res["logp"][s], "logp"),
                desc(res["lse"][s], "lse"), opt("entropy", s), opt("log_sum_sq", s),
                opt("mean_logit", s), opt("top1", s), temperature, logit_scale, softcap,
                ignore_index, stream, desc(mean_weights, "mean_weights"))
        if label_logit:
            lab = labels[s].long()
            inside = (lab >= 0) & (lab < V)
            x = b.gather(1, lab.clamp(0, V - 1).unsqueeze(1)).squeeze(1).to(acc)
            res["label_logit"][s] = torch.where(inside, x, torch.zeros_like(x))
        if extremes:
            res["max"][s] = b.amax(1).to(acc)
        if basis is not None:
            kernels.logprob_backward(desc(b, "logits"), desc(labels[s], "labels"), desc(res["lse"][s], "lse"),
                                None, desc(ones[: c1 - c0], "grad_logp"), None, desc(b, "grad_logits"),
                                temperature, logit_scale, softcap, ignore_index, stream, None, None, None)
            if basis.dtype == b.dtype:
                _dhidden_into(basis[s], b, weight)
            else:
                basis[s].zero_()
                _acc_mm(basis[s], b, weight)
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
    acc = _acc(dt)
    grads = (grad_logp, grad_entropy, grad_lse, grad_mean)
    if n > 0 and any(g is not None for g in grads) and use_vocab_blocks(weight, needs):
        return _vocab_blocked_backward(grad_logp, grad_entropy, hidden, weight, bias, labels, lse, entropy,
                                       temperature, logit_scale, softcap, chunk, needs, vocab_slice,
                                       ignore_index, grad_lse, grad_mean, mean_weights, mean_vocab)
    dh = torch.zeros(n, H, dtype=dt, device=dev) if needs & NEED_HIDDEN else None
    # dW is accumulated in fp32: directly in the result for fp32/fp64 weights, else in a buffer.
    dw_acc = torch.zeros(V, H, dtype=_acc(weight.dtype), device=dev) if needs & NEED_WEIGHT else None
    db_acc = torch.zeros(V, dtype=acc, device=dev) if (needs & NEED_BIAS and bias is not None) else None
    if n > 0 and any(g is not None for g in (grad_logp, grad_entropy, grad_lse, grad_mean)):
        backward = kernels.logprob_backward_slice if vocab_slice else kernels.logprob_backward
        buf = logits_buffer(min(chunk, n), hidden, weight, bias)
        stream = stream_of(hidden)
        part = lambda t, s: None if t is None else t[s]
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            s = slice(c0, c1)
            h = hidden[s]
            b = None  # the previous chunk's oneDNN output is freed before the next is made
            b = _logits_into(None if buf is None else buf[: c1 - c0], h, weight, bias)
            backward(desc(b, "logits"), desc(labels[s], "labels"), desc(lse[s], "lse"),
                     desc(part(entropy, s), "entropy"), desc(part(grad_logp, s), "grad_logp"),
                     desc(part(grad_entropy, s), "grad_entropy"), desc(b, "grad_logits"),
                     temperature, logit_scale, softcap, ignore_index, stream,
                     desc(part(grad_lse, s), "grad_lse"), desc(part(grad_mean, s), "grad_mean"),
                     desc(mean_weights, "mean_weights"), mean_vocab=mean_vocab)
            if dh is not None:
                _dhidden_into(dh[s], b, weight)
            if dw_acc is not None:
                accumulate_dw(dw_acc, b, h)
            if db_acc is not None:
                db_acc += b.sum(0, dtype=acc)
        del buf, b  # the logits buffer and the low-precision dW result never coexist
    dw = None if dw_acc is None else dw_acc.to(weight.dtype)
    db = None if db_acc is None else db_acc.to(bias.dtype)
    return dh, dw, db


def _vocab_blocked_backward(grad_logp, grad_entropy, hidden, weight, bias, labels, lse, entropy,
                            temperature, logit_scale, softcap, chunk, needs, vocab_slice, ignore_index,
                            grad_lse, grad_mean, mean_weights, mean_vocab):
    """:func:`chunked_backward` with vocabulary blocks outermost and token chunks inside (see the
    module docstring). Extra memory: the ``[c, V_block]`` logits block (at most ``chunk * V``
    elements), an fp32 ``[n, H]`` ``dhidden`` accumulator for bf16/fp16, and an fp32 ``[V_block, H]``
    staging block for bf16/fp16 ``dW`` only when the rows take more than one token chunk."""
    n, H, V = hidden.shape[0], hidden.shape[1], weight.shape[0]
    dev, dt = hidden.device, hidden.dtype
    acc = _acc(dt)
    c, vb = vocab_block_sizes(n, V, chunk, dev)
    dh_acc = torch.zeros(n, H, dtype=acc, device=dev) if needs & NEED_HIDDEN else None
    dw = torch.empty(V, H, dtype=weight.dtype, device=dev) if needs & NEED_WEIGHT else None
    db_acc = torch.zeros(V, dtype=acc, device=dev) if (needs & NEED_BIAS and bias is not None) else None
    # Row codes: the global label, _ELSEWHERE for a label on another rank's slice (vocab_slice),
    # _BLOCK_IGNORE for ignored rows and (off a slice) labels outside [0, V), which the
    # token-outer kernel also leaves with a zero gradient.
    lab = labels.long()
    inside = (lab >= 0) & (lab < V)
    code = torch.where(inside, lab, torch.full_like(lab, _ELSEWHERE if vocab_slice else _BLOCK_IGNORE))
    code = torch.where(lab == ignore_index, torch.full_like(lab, _BLOCK_IGNORE), code)
    skip = code == _BLOCK_IGNORE
    mv = mean_vocab if (vocab_slice and mean_vocab > 0) else V
    flat = torch.empty(min(c, n) * vb, dtype=dt, device=dev)
    stage = None
    if dw is not None and c < n and weight.dtype != acc:
        stage = torch.empty(vb, H, dtype=acc, device=dev)
    stream = stream_of(hidden)
    part = lambda t, s: None if t is None else t[s]
    backward = kernels.logprob_backward_slice
    for v0 in range(0, V, vb):
        v1 = min(V, v0 + vb)
        w_blk = weight[v0:v1]
        b_blk = None if bias is None else bias[v0:v1]
        local = code - v0
        local = torch.where((local >= 0) & (local < v1 - v0), local, torch.full_like(local, _ELSEWHERE))
        local = torch.where(skip, torch.full_like(local, _BLOCK_IGNORE), local)
        mw = None if mean_weights is None else mean_weights[v0:v1]
        dw_blk = None
        if dw is not None:
            dw_blk = dw[v0:v1] if (stage is None) else stage[: v1 - v0]
        for c0 in range(0, n, c):
            c1 = min(n, c0 + c)
            s = slice(c0, c1)
            h = hidden[s]
            b = _logits_into(flat[: (c1 - c0) * (v1 - v0)].view(c1 - c0, v1 - v0), h, w_blk, b_blk)
            backward(desc(b, "logits"), desc(local[s], "labels"), desc(lse[s], "lse"),
                     desc(part(entropy, s), "entropy"), desc(part(grad_logp, s), "grad_logp"),
                     desc(part(grad_entropy, s), "grad_entropy"), desc(b, "grad_logits"),
                     temperature, logit_scale, softcap, _BLOCK_IGNORE, stream,
                     desc(part(grad_lse, s), "grad_lse"), desc(part(grad_mean, s), "grad_mean"),
                     desc(mw, "mean_weights"), mean_vocab=mv)
            if dh_acc is not None:
                _acc_mm(dh_acc[s], b, w_blk)
            if dw_blk is not None:
                if c0 == 0 and (c1 == n or dw_blk.dtype == dt):
                    # the first (with one token chunk: the only) product, straight into its block;
                    # bf16/fp16 then rounds once, from the GEMM's fp32 accumulation
                    torch.mm(b.t(), h, out=dw_blk)
                else:
                    if c0 == 0:
                        dw_blk.zero_()
                    _acc_mm(dw_blk, b.t(), h)
            if db_acc is not None:
                db_acc[v0:v1] += b.sum(0, dtype=acc)
        if stage is not None:
            dw[v0:v1].copy_(dw_blk)
    del flat, stage
    dh = None if dh_acc is None else dh_acc.to(dt)
    db = None if db_acc is None else db_acc.to(bias.dtype)
    return dh, dw, db


def _scatter_rows(values: Tensor, idx: Optional[Tensor], n: int) -> Tensor:
    """Rows of ``values`` (computed for the valid rows only) placed at ``idx`` of ``n`` zeros."""
    if idx is None:
        return values
    out = values.new_zeros((n,) + tuple(values.shape[1:]))
    return out.index_copy_(0, idx, values)


def _select(t: Optional[Tensor], idx: Optional[Tensor]) -> Optional[Tensor]:
    if t is None or idx is None:
        return t
    return t.index_select(0, idx)


@torch.library.custom_op("pyalign::linear_token_logprobs", mutates_args=())
def linear_token_logprobs_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, ignore_index: int,
    temperature: float, logit_scale: float, softcap: float, outputs: int, chunk_size: int,
    mean_weights: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    n = labels.shape[0]
    idx = valid_rows(labels, ignore_index)
    hv, lv = _select(hidden, idx), _select(labels, idx)
    r = chunked_stats(hv, weight, bias, lv, temperature, logit_scale, softcap, outputs, chunk_size,
                      ignore_index=ignore_index, mean_weights=mean_weights)
    flags = {"logp": -1, "lse": -1, "entropy": ENTROPY, "log_sum_sq": LOG_SUM_SQ, "mean_logit": MEAN_LOGIT,
             "top1": TOP1}
    # Absent optional outputs stay empty [0] tensors (the schema is fixed).
    return tuple(_scatter_rows(r[k], idx, n) if (f < 0 or outputs & f) else r[k] for k, f in flags.items())


@linear_token_logprobs_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, temperature, logit_scale, softcap, outputs,
      chunk_size, mean_weights=None):
    n = labels.shape[0]
    acc = _acc(hidden.dtype)
    new = lambda flag, dt=acc: hidden.new_empty(n if outputs & flag else 0, dtype=dt)
    return (hidden.new_empty(n, dtype=acc), hidden.new_empty(n, dtype=acc), new(ENTROPY),
            new(LOG_SUM_SQ), new(MEAN_LOGIT), new(TOP1, torch.bool))


@torch.library.custom_op("pyalign::linear_token_logprobs_backward", mutates_args=())
def linear_token_logprobs_backward_op(
    grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor], hidden: Tensor, weight: Tensor,
    bias: Optional[Tensor], labels: Tensor, lse: Tensor, entropy: Optional[Tensor],
    ignore_index: int, temperature: float, logit_scale: float, softcap: float, chunk_size: int,
    needs: int, grad_lse: Optional[Tensor] = None, grad_mean: Optional[Tensor] = None,
    mean_weights: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    n = labels.shape[0]
    idx = valid_rows(labels, ignore_index)
    sel = lambda t: None if t is None else _select(t, idx)
    dh, dw, db = chunked_backward(sel(grad_logp), sel(grad_entropy), sel(hidden), weight, bias,
                                  sel(labels), sel(lse), sel(entropy), temperature, logit_scale,
                                  softcap, chunk_size, needs, ignore_index=ignore_index,
                                  grad_lse=sel(grad_lse), grad_mean=sel(grad_mean),
                                  mean_weights=mean_weights)
    empty = lambda: hidden.new_empty(0)  # distinct tensors: outputs may not alias each other
    return (empty() if dh is None else _scatter_rows(dh, idx, n), empty() if dw is None else dw,
            empty() if db is None else db)


@linear_token_logprobs_backward_op.register_fake
def _(grad_logp, grad_entropy, hidden, weight, bias, labels, lse, entropy, ignore_index,
      temperature, logit_scale, softcap, chunk_size, needs, grad_lse=None, grad_mean=None,
      mean_weights=None):
    return (torch.empty_like(hidden) if needs & NEED_HIDDEN else hidden.new_empty(0),
            torch.empty_like(weight) if needs & NEED_WEIGHT else hidden.new_empty(0),
            torch.empty_like(bias) if (needs & NEED_BIAS and bias is not None) else hidden.new_empty(0))


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, labels, ignore_index, temperature, logit_scale, softcap, outputs,
     chunk_size, *rest) = inputs
    mean_weights = rest[0] if rest else None
    logp, lse, ent, lss, mean, top1 = output
    ctx.mark_non_differentiable(lss, top1)
    ctx.has_ent, ctx.has_mean = bool(outputs & ENTROPY), bool(outputs & MEAN_LOGIT)
    ctx.save_for_backward(hidden, weight, bias, labels, lse, ent if ctx.has_ent else None,
                          mean_weights if ctx.has_mean else None)
    ctx.params = (ignore_index, temperature, logit_scale, softcap, chunk_size)


def _backward(ctx, g_logp, g_lse, g_ent, g_lss, g_mean, g_top1):
    hidden, weight, bias, labels, lse, ent, mw = ctx.saved_tensors
    needs = ((NEED_HIDDEN if ctx.needs_input_grad[0] else 0) | (NEED_WEIGHT if ctx.needs_input_grad[1] else 0)
             | (NEED_BIAS if ctx.needs_input_grad[2] else 0))
    dt = lse.dtype
    dh, dw, db = linear_token_logprobs_backward_op(
        dense_grad(g_logp, dt), dense_grad(g_ent, dt, ent is not None), hidden, weight, bias, labels, lse,
        ent, *ctx.params, needs, dense_grad(g_lse, dt), dense_grad(g_mean, dt, ctx.has_mean), mw)
    return (dh if needs & NEED_HIDDEN else None, dw if needs & NEED_WEIGHT else None,
            db if needs & NEED_BIAS else None, None, None, None, None, None, None, None, None)


linear_token_logprobs_op.register_autograd(_backward, setup_context=_setup_context)


# ---- frozen head: the hidden gradient's basis formed in the forward -------------------------------
#
# With only ``hidden`` requiring grad (a frozen LM head or tied embedding, as in LoRA), the
# log-prob part of the hidden gradient is ``dh_t = g_t * B_t`` with ``B_t = (d logp_t / d z_t) @ W``
# (temperature, logit scale and softcap included), a per-token vector that does not depend on the
# upstream gradient ``g``. The forward has each chunk's logits at hand, so it forms ``B`` there
# (the backward kernel with ``g = 1`` in place, one GEMM): 2 GEMMs per chunk in all, eager's
# count, instead of 3 (forward, recompute, dhidden); the backward only scales ``B``. A gradient
# reaching ``lse``, the entropy or ``mean_logit`` adds its part through the recompute loop, so any
# combination stays exact (the public functions take this path only when no such output is
# requested, apart from ``lse``). ``dW`` needs the recompute whatever the forward keeps
# (``dW = sum_t g_t dz_t (x) h_t`` cannot be rescaled per token after the sum), so a head that
# requires grad takes the ordinary op.


@torch.library.custom_op("pyalign::linear_token_logprobs_basis", mutates_args=())
def linear_token_logprobs_basis_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, ignore_index: int,
    temperature: float, logit_scale: float, softcap: float, outputs: int, chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`linear_token_logprobs_op`'s six outputs and the basis ``B [n, H]`` (accumulation
    dtype; zero rows at ignored tokens) of the hidden gradient of the log-probs."""
    n, H = labels.shape[0], hidden.shape[1]
    idx = valid_rows(labels, ignore_index)
    hv, lv = _select(hidden, idx), _select(labels, idx)
    basis = torch.empty(hv.shape[0], H, dtype=_acc(hidden.dtype), device=hidden.device)
    r = chunked_stats(hv, weight, bias, lv, temperature, logit_scale, softcap, outputs, chunk_size,
                      ignore_index=ignore_index, basis=basis)
    flags = {"logp": -1, "lse": -1, "entropy": ENTROPY, "log_sum_sq": LOG_SUM_SQ, "mean_logit": MEAN_LOGIT,
             "top1": TOP1}
    res = tuple(_scatter_rows(r[k], idx, n) if (f < 0 or outputs & f) else r[k] for k, f in flags.items())
    return res + (_scatter_rows(basis, idx, n),)


@linear_token_logprobs_basis_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, temperature, logit_scale, softcap, outputs, chunk_size):
    n = labels.shape[0]
    acc = _acc(hidden.dtype)
    new = lambda flag, dt=acc: hidden.new_empty(n if outputs & flag else 0, dtype=dt)
    return (hidden.new_empty(n, dtype=acc), hidden.new_empty(n, dtype=acc), new(ENTROPY),
            new(LOG_SUM_SQ), new(MEAN_LOGIT), new(TOP1, torch.bool), hidden.new_empty(n, hidden.shape[1], dtype=acc))


def _basis_setup_context(ctx, inputs, output):
    (hidden, weight, bias, labels, ignore_index, temperature, logit_scale, softcap, outputs, chunk_size) = inputs
    logp, lse, ent, lss, mean, top1, basis = output
    ctx.mark_non_differentiable(lss, top1, basis)
    ctx.set_materialize_grads(False)
    ctx.has_ent, ctx.has_mean = bool(outputs & ENTROPY), bool(outputs & MEAN_LOGIT)
    ctx.save_for_backward(hidden, weight, bias, labels, lse, ent if ctx.has_ent else None, basis)
    ctx.params = (ignore_index, temperature, logit_scale, softcap, chunk_size)


def _basis_backward(ctx, g_logp, g_lse, g_ent, g_lss, g_mean, g_top1, g_basis):
    for i, name in ((1, "weight"), (2, "bias")):
        if ctx.needs_input_grad[i]:
            raise RuntimeError(f"pyalign::linear_token_logprobs_basis: {name} requires grad; this op "
                               "forms the hidden gradient only (use pyalign::linear_token_logprobs)")
    hidden, weight, bias, labels, lse, ent, basis = ctx.saved_tensors
    dh = None
    if g_logp is not None:
        dh = basis * g_logp.to(basis.dtype).unsqueeze(1)
    rest = (g_lse, g_ent if ctx.has_ent else None, g_mean if ctx.has_mean else None)
    if any(g is not None and bool((g != 0).any()) for g in rest):
        dt = lse.dtype
        part, _, _ = linear_token_logprobs_backward_op(
            None, dense_grad(g_ent, dt, ctx.has_ent), hidden, weight, bias, labels, lse, ent, *ctx.params,
            NEED_HIDDEN, dense_grad(g_lse, dt), dense_grad(g_mean, dt, ctx.has_mean), None)
        dh = part.to(basis.dtype) if dh is None else dh + part
    if dh is None or not ctx.needs_input_grad[0]:
        return (None,) * 10
    return (dh.to(hidden.dtype),) + (None,) * 9


linear_token_logprobs_basis_op.register_autograd(_basis_backward, setup_context=_basis_setup_context)


# ---- reduced cross-entropy: the gradient computed in the forward ---------------------------------
#
# For reduction "mean"/"sum" the loss is L = sum_t (a_t logp_t + b_t lse_t + c_t mean_t) with
# coefficients known in the forward up to lse_t itself (the z-loss term), which the chunk's forward
# kernel produces just before the gradient is needed. So each token chunk costs one logits GEMM,
# the forward kernel, the backward kernel in place on the same buffer, and the two product GEMMs:
# 3 GEMMs in all (eager's count). The backward only scales the saved dh/dW/db by grad_output.

# Private switch for tests and benches: None = automatic (reduced losses that need a gradient take
# the forward-gradient path, per-token log-probs of a frozen head the basis path above), False =
# always the recompute path.
_FORWARD_GRAD: Optional[bool] = None


def ce_coefficients(labels: Tensor, ignore_index: int, label_smoothing: float, z_loss_scale: float,
                    class_weights: Optional[Tensor], vocab: int, reduction_sum: bool, acc: torch.dtype):
    """Upstream-gradient coefficients of the reduced loss of
    :func:`pyalign.logprob.assemble_cross_entropy` per unit ``grad_output``, over all ``n`` rows:
    ``(grad_logp [n], grad_lse_const (0-dim), lse_coef (0-dim), grad_mean [n] or None)`` with
    ``d loss/d lse_t = grad_lse_const + lse_coef * lse_t`` (``lse_coef`` = ``2 z / N`` of the
    z-loss, the ``lse_coef`` of the separate z-loss output too). "mean" divides the cross-entropy
    terms by ``sum w_y`` of the kept tokens and the z-loss by their count, both from the labels."""
    valid = labels != ignore_index
    dev = labels.device
    if class_weights is None:
        wy = valid.to(acc)
        total_w = torch.tensor(float(vocab), dtype=acc, device=dev)
    else:
        wy = class_weights.gather(0, labels.long().clamp(0, vocab - 1))
        wy = torch.where(valid, wy, torch.zeros_like(wy))
        total_w = class_weights.sum()
    if reduction_sum:
        d_ce = torch.ones((), dtype=acc, device=dev)
        d_z = torch.ones((), dtype=acc, device=dev)
    else:
        d_ce, d_z = wy.sum(), valid.sum().to(acc)
    eps = float(label_smoothing)
    grad_logp = wy * (-(1.0 - eps)) / d_ce
    grad_lse_const = (eps / vocab) * total_w / d_ce
    lse_coef = (2.0 * float(z_loss_scale)) / d_z
    grad_mean = None
    if eps > 0:
        grad_mean = torch.where(valid, -eps / d_ce, torch.zeros((), dtype=acc, device=dev))
    return grad_logp, grad_lse_const, lse_coef, grad_mean


def chunked_forward_grad(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                         temperature: float, logit_scale: float, softcap: float, chunk: int, needs: int,
                         grad_logp: Tensor, grad_lse_const: Tensor, lse_coef: Optional[Tensor],
                         grad_mean: Optional[Tensor], mean_weights: Optional[Tensor],
                         ignore_index: int = -100):
    """Per-row ``(logp, lse, mean_logit)`` (``mean_logit`` empty without ``grad_mean``) and the
    gradients ``(dh [n, H], dW [V, H], db [V])`` (None where ``needs`` has no bit) of
    ``sum_t grad_logp_t logp_t + (grad_lse_const + lse_coef lse_t) lse_t + grad_mean_t mean_t``,
    where ``lse_coef`` multiplies the chunk's own ``lse`` as the forward kernel produced it (the
    gradient of ``lse_coef/2 * lse^2``). One logits GEMM per chunk, the forward kernel, the backward
    kernel in place, ``dh = g @ W`` and ``dW += g.T @ h``: 3 GEMMs.

    ``dW``: fp32/fp64 weights accumulate in the result itself; bf16/fp16 weights with all rows in
    one chunk take one GEMM straight into the result (fp32 inside the GEMM, rounded once), else an
    fp32 ``[V, H]`` accumulator filled by :func:`accumulate_dw` (vocabulary slices, no low-precision
    ``[V, H]`` temporary), rounded once at the end."""
    n, H, V = hidden.shape[0], hidden.shape[1], weight.shape[0]
    dt, dev = hidden.dtype, hidden.device
    acc = _acc(dt)
    logp = torch.empty(n, dtype=acc, device=dev)
    lse = torch.empty(n, dtype=acc, device=dev)
    mean = torch.empty(n if grad_mean is not None else 0, dtype=acc, device=dev)
    dh = torch.empty(n, H, dtype=dt, device=dev) if needs & NEED_HIDDEN else None
    db_acc = torch.zeros(V, dtype=acc, device=dev) if (needs & NEED_BIAS and bias is not None) else None
    dw = dw_acc = None
    if needs & NEED_WEIGHT:
        if n == 0:
            dw = torch.zeros(V, H, dtype=weight.dtype, device=dev)
        elif _acc(weight.dtype) != weight.dtype and n > chunk:
            dw_acc = torch.zeros(V, H, dtype=torch.float32, device=dev)
        else:
            dw = torch.empty(V, H, dtype=weight.dtype, device=dev)
    if n > 0:
        buf = logits_buffer(min(chunk, n), hidden, weight, bias)
        stream = stream_of(hidden)
        part = lambda t, s: None if t is None else t[s]
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            s = slice(c0, c1)
            h = hidden[s]
            b = None  # the previous chunk's oneDNN output is freed before the next is made
            b = _logits_into(None if buf is None else buf[: c1 - c0], h, weight, bias)
            kernels.logprob_forward(desc(b, "logits"), desc(labels[s], "labels"), desc(logp[s], "logp"),
                               desc(lse[s], "lse"), None, None,
                               desc(mean[s], "mean_logit") if grad_mean is not None else None, None,
                               temperature, logit_scale, softcap, ignore_index, stream,
                               desc(mean_weights, "mean_weights"))
            g_lse = grad_lse_const.expand(c1 - c0)
            if lse_coef is not None:
                g_lse = g_lse + lse_coef * lse[s]
            g_lse = g_lse.contiguous()
            kernels.logprob_backward(desc(b, "logits"), desc(labels[s], "labels"), desc(lse[s], "lse"), None,
                                desc(grad_logp[s], "grad_logp"), None, desc(b, "grad_logits"),
                                temperature, logit_scale, softcap, ignore_index, stream,
                                desc(g_lse, "grad_lse"), desc(part(grad_mean, s), "grad_mean"),
                                desc(mean_weights, "mean_weights"))
            if dh is not None:
                _dhidden_into(dh[s], b, weight)
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
    return logp, lse, mean, dh, dw, db


@torch.library.custom_op("pyalign::linear_cross_entropy_fwd_grad", mutates_args=())
def linear_cross_entropy_fwd_grad_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, ignore_index: int,
    temperature: float, logit_scale: float, softcap: float, chunk_size: int, label_smoothing: float,
    z_loss_scale: float, class_weights: Optional[Tensor], reduction_sum: bool, needs: int,
    z_output: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, z_loss, lse [n], dh, dW, db)`` of the reduced linear cross-entropy (the loss as
    :func:`pyalign.logprob.assemble_cross_entropy` forms it, z-loss included; ``z_loss`` its
    z-loss part) with the gradients of ``loss`` w.r.t. the inputs whose bit is in ``needs`` (empty
    ``[0]`` tensors for the others), computed in the forward. ``z_output``: the z-loss output is
    returned to the caller (its gradient is then honoured in the backward)."""
    from pyalign.logprob import assemble_cross_entropy  # pyalign.logprob imports this module's users

    n, V = labels.shape[0], weight.shape[0]
    acc = _acc(hidden.dtype)
    eps, zs = float(label_smoothing), float(z_loss_scale)
    w = class_weights
    grad_logp, glc, lse_coef, grad_mean = ce_coefficients(labels, ignore_index, eps, zs, w, V,
                                                          reduction_sum, acc)
    idx = valid_rows(labels, ignore_index)
    sel = lambda t: None if t is None else _select(t, idx)
    logp, lse, mean, dh, dw, db = chunked_forward_grad(
        sel(hidden), weight, bias, sel(labels), temperature, logit_scale, softcap, chunk_size, needs,
        sel(grad_logp), glc, lse_coef if zs > 0 else None, sel(grad_mean), w if eps > 0 else None,
        ignore_index)
    logp, lse = _scatter_rows(logp, idx, n), _scatter_rows(lse, idx, n)
    mean = _scatter_rows(mean, idx, n) if eps > 0 else None
    loss, zl = assemble_cross_entropy(
        logp, lse, mean, labels, ignore_index=ignore_index, reduction="sum" if reduction_sum else "mean",
        label_smoothing=eps, z_loss_scale=zs, class_weights=w, vocab_size=V, return_z_loss=True)
    empty = lambda: hidden.new_empty(0)
    return (loss, zl, lse, empty() if dh is None else _scatter_rows(dh, idx, n),
            empty() if dw is None else dw, empty() if db is None else db)


def _fwd_grad_fake_grads(hidden, weight, bias, needs):
    return (torch.empty_like(hidden) if needs & NEED_HIDDEN else hidden.new_empty(0),
            torch.empty_like(weight) if needs & NEED_WEIGHT else hidden.new_empty(0),
            torch.empty_like(bias) if (needs & NEED_BIAS and bias is not None) else hidden.new_empty(0))


@linear_cross_entropy_fwd_grad_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, temperature, logit_scale, softcap, chunk_size,
      label_smoothing, z_loss_scale, class_weights, reduction_sum, needs, z_output):
    acc = _acc(hidden.dtype)
    return (hidden.new_empty((), dtype=acc), hidden.new_empty((), dtype=acc),
            hidden.new_empty(labels.shape[0], dtype=acc), *_fwd_grad_fake_grads(hidden, weight, bias, needs))


@torch.library.custom_op("pyalign::linear_cross_entropy_fwd_grad_backward", mutates_args=())
def linear_cross_entropy_fwd_grad_backward_op(
    grad_loss: Tensor, grad_z: Tensor, dh: Tensor, dw: Tensor, db: Tensor, hidden: Tensor, weight: Tensor,
    bias: Optional[Tensor], labels: Tensor, lse: Tensor, ignore_index: int, temperature: float,
    logit_scale: float, softcap: float, chunk_size: int, z_loss_scale: float, reduction_sum: bool,
    needs: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """The backward of :func:`linear_cross_entropy_fwd_grad_op` when its z-loss output is returned
    too: ``grad_loss`` times the saved gradients plus, only when ``grad_z`` is nonzero, the z-loss
    output's own gradient (``grad_lse = grad_z * 2 z lse / N``), recomputed chunk by chunk
    (:func:`chunked_backward`, 3 more GEMMs). Exact for any combination of the two."""
    outs = [t * grad_loss for t in (dh, dw, db)]  # [0] stays [0] (absent gradients)
    if z_loss_scale > 0 and bool(grad_z != 0):
        acc = lse.dtype
        valid = labels != ignore_index
        d_z = torch.ones((), dtype=acc, device=lse.device) if reduction_sum else valid.sum().to(acc)
        grad_lse = (lse * ((2.0 * z_loss_scale) / d_z) * grad_z.to(acc)).contiguous()
        parts = linear_token_logprobs_backward_op(None, None, hidden, weight, bias, labels, lse, None,
                                                  ignore_index, temperature, logit_scale, softcap,
                                                  chunk_size, needs, grad_lse)
        outs = [o + p if o.numel() else o for o, p in zip(outs, parts)]
    return tuple(outs)


@linear_cross_entropy_fwd_grad_backward_op.register_fake
def _(grad_loss, grad_z, dh, dw, db, hidden, weight, bias, labels, lse, ignore_index, temperature,
      logit_scale, softcap, chunk_size, z_loss_scale, reduction_sum, needs):
    return _fwd_grad_fake_grads(hidden, weight, bias, needs)


_GRAD_NAMES = ((0, NEED_HIDDEN, "hidden"), (1, NEED_WEIGHT, "weight"), (2, NEED_BIAS, "bias"))


def _fwd_grad_setup_context(ctx, inputs, output):
    (hidden, weight, bias, labels, ignore_index, temperature, logit_scale, softcap, chunk_size,
     label_smoothing, z_loss_scale, class_weights, reduction_sum, needs, z_output) = inputs
    loss, zl, lse, dh, dw, db = output
    ctx.mark_non_differentiable(lse, dh, dw, db)
    # No zero-filled upstream gradients for the outputs nobody differentiates: the default would
    # allocate a [V, H] zero tensor for the dW output in every backward.
    ctx.set_materialize_grads(False)
    ctx.needs = needs
    ctx.z_active = bool(z_output) and z_loss_scale > 0
    if ctx.z_active:  # the z-loss output's gradient may need the inputs again
        ctx.save_for_backward(dh, dw, db, hidden, weight, bias, labels, lse)
    else:
        ctx.save_for_backward(dh, dw, db)
    ctx.params = (ignore_index, temperature, logit_scale, softcap, chunk_size, z_loss_scale, reduction_sum)


def _fwd_grad_backward(ctx, g_loss, g_z, g_lse, g_dh, g_dw, g_db):
    for i, bit, name in _GRAD_NAMES:
        if ctx.needs_input_grad[i] and not ctx.needs & bit:
            raise RuntimeError(f"pyalign::linear_cross_entropy_fwd_grad: {name} requires grad but the forward "
                               f"was called with needs={ctx.needs}, which does not include it")
    saved = ctx.saved_tensors
    dh, dw, db = saved[:3]
    if ctx.z_active and g_z is not None:
        hidden, weight, bias, labels, lse = saved[3:]
        if g_loss is None:
            g_loss = torch.zeros_like(g_z)
        ignore_index, temperature, logit_scale, softcap, chunk_size, zs, rsum = ctx.params
        gh, gw, gb = linear_cross_entropy_fwd_grad_backward_op(
            g_loss, g_z, dh, dw, db, hidden, weight, bias, labels, lse, ignore_index, temperature,
            logit_scale, softcap, chunk_size, zs, rsum, ctx.needs)
    elif g_loss is not None:
        gh, gw, gb = dh * g_loss, dw * g_loss, db * g_loss
    else:  # neither output reached the loss being differentiated
        return (None,) * 15
    keep = lambda g, i: g if ctx.needs_input_grad[i] else None
    return (keep(gh, 0), keep(gw, 1), keep(gb, 2)) + (None,) * 12


linear_cross_entropy_fwd_grad_op.register_autograd(_fwd_grad_backward, setup_context=_fwd_grad_setup_context)
