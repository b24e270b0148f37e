"""The fused linear head's two backward loop orders (pyalign.ops.linear.loops.chunked_backward):
token-outer (token chunks over the whole vocabulary) and vocab-blocked (vocabulary blocks
outermost, token chunks inside), forced with ``pyalign.overrides(backward_order=...,
vocab_blocks=...)`` (the ``force_path`` fixture) at several block shapes, against the materialized
float64 reference and each other; the automatic choices of pyalign.ops.linear.chunks (token chunk
size and its memory budget, loop order, vocabulary block sizes: arithmetic, checked for both
devices' budgets on any machine); the slice-mode backward kernel the vocab-blocked order runs on
each block."""
from __future__ import annotations

import itertools

import pytest
import torch

import pyalign.ops.linear.chunks as chunks
from linear_helpers import LOW_TOL, ce_case, ce_grads, class_weights, cpu64, make, max_err, ref_cross_entropy, ref_grads
from pyalign._ext import desc, kernels, stream_of
from pyalign.logprob import linear_cross_entropy, linear_token_logprobs
from pyalign.ops.linear.chunks import CHUNK_BYTES, MAX_ROWS, auto_chunk_size

# forced (token chunk, vocab block) sizes: several chunks and blocks with remainders; one block
BLOCKS = [(5, 7), (4, 64), (1000, 3), None]


def _ref_all(hidden, weight, bias, labels, *, dtype, ignore_index=-100, temperature=1.0, logit_scale=1.0,
             softcap=None, shift=False):
    """Materialized logp, entropy, lse, mean_logit in ``dtype`` (0 at ignored tokens)."""
    if shift:
        hidden, labels = hidden[..., :-1, :], labels[..., 1:]
    z = hidden.to(dtype) @ weight.to(dtype).t()
    if bias is not None:
        z = z + bias.to(dtype)
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    zf = z.to(torch.float64 if dtype == torch.float64 else torch.float32)
    valid = labels != ignore_index
    logsm = torch.log_softmax(zf, -1)
    lp = logsm.gather(-1, torch.where(valid, labels, 0).long().unsqueeze(-1)).squeeze(-1)
    ent = -(logsm.exp() * logsm).sum(-1)
    lse, mean = torch.logsumexp(zf, -1), zf.mean(-1)
    zero = torch.zeros_like(lp)
    return [torch.where(valid, t, zero) for t in (lp, ent, lse, mean)]


def _all_outputs_loss(outs, coeffs):
    lp, ent, lse, mean = outs
    c1, c2, c3, c4 = coeffs
    return (lp * c1).sum() + (ent * c2).sum() + (lse ** 2 * c3).sum() + (mean * c4).sum()


def _fused_grads(hidden, weight, bias, labels, needs, coeffs, **kw):
    leaves = [t.clone().requires_grad_(n) if t is not None else None for t, n in zip((hidden, weight, bias), needs)]
    o = linear_token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], outputs=("entropy", "lse", "mean_logit"),
                              chunk_size=3, **kw)
    outs = [o.logprobs, o.entropy, o.lse, o.mean_logit]
    present = [t for t in leaves if t is not None and t.requires_grad]
    it = iter(torch.autograd.grad(_all_outputs_loss(outs, coeffs), present))
    return [t.detach() for t in outs], [next(it) if (t is not None and t.requires_grad) else None for t in leaves]


def _ref_grads(hidden, weight, bias, labels, needs, coeffs, dtype, **kw):
    """Like :func:`_fused_grads` through materialized logits in ``dtype``: float64 on the CPU (the
    oracle), another dtype on the inputs' device (eager PyTorch at that precision)."""
    dev = "cpu" if dtype == torch.float64 else hidden.device
    leaves = [t.detach().to(dev, dtype).requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    outs = _ref_all(*leaves[:2], leaves[2], labels.to(dev), dtype=dtype, **kw)
    present = [t for t in leaves if t is not None]
    it = iter(torch.autograd.grad(_all_outputs_loss(outs, [c.to(dev) for c in coeffs]), present))
    grads = [next(it) if t is not None else None for t in leaves]
    return [t.detach() for t in outs], [g if n else None for g, n in zip(grads, needs)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("opts", [{}, {"shift": True}, {"softcap": 3.0, "logit_scale": 1.7, "temperature": 0.8}],
                         ids=["plain", "shift", "transform"])
def test_vocab_blocked_matches_reference_and_token_outer(force_path, device, dtype, bias, opts):
    """Each forced loop order (and several block shapes) against the materialized fp64 reference,
    through log-probs, entropy, lse and mean_logit, for subsets of inputs requiring grad, with
    ignored tokens; and the two loop orders against each other within rounding."""
    hidden, weight, b, labels = make((3, 7), 16, 53, dtype, device, bias=bias, ignore=0.25, seed=7)
    g = torch.Generator().manual_seed(2)
    n_out = labels[..., 1:].shape if opts.get("shift") else labels.shape
    coeffs = [torch.randn(n_out, generator=g).to(device) for _ in range(4)]
    for needs in ((True, True, True), (False, True, False), (True, False, True), (False, True, True)):
        if not any(n and t is not None for n, t in zip(needs, (hidden, weight, b))):
            continue
        ref_out, ref_g = _ref_grads(hidden, weight, b, labels, needs, coeffs, torch.float64, **opts)
        force_path("token")
        tok_out, tok_g = _fused_grads(hidden, weight, b, labels, needs, coeffs, **opts)
        if dtype in LOW_TOL:
            eager_out, eager_g = _ref_grads(hidden, weight, b, labels, needs, coeffs, dtype, **opts)
        for blocks in BLOCKS:
            force_path("vocab", blocks)
            got_out, got_g = _fused_grads(hidden, weight, b, labels, needs, coeffs, **opts)
            what = f"needs={needs} blocks={blocks}"
            for k, (go, to, ro) in enumerate(zip(got_out, tok_out, ref_out)):
                assert torch.equal(go, to), f"forward output {k} ({what})"  # the forward is shared
            for k, (gg, tg, rg) in enumerate(zip(got_g, tok_g, ref_g)):
                if rg is None:
                    assert gg is None and tg is None
                    continue
                assert gg.dtype == (b if k == 2 else (hidden, weight)[k]).dtype
                scale = 1 + rg.abs().max().item()
                if dtype in (torch.float64, torch.float32):
                    tol = {torch.float64: 1e-9, torch.float32: 1e-4}[dtype]
                    assert max_err(gg, rg) <= tol * scale, f"grad {k} vs reference ({what})"
                    assert max_err(gg, tg) <= tol * scale, f"grad {k} vs token-outer ({what})"
                else:
                    e_err = max_err(eager_g[k], rg)
                    assert max_err(gg, rg) <= 2 * e_err + 0.02 * scale, f"grad {k} vs reference ({what})"
                    assert max_err(gg, tg) <= LOW_TOL[dtype] * scale, f"grad {k} vs token-outer ({what})"


@pytest.mark.parametrize("path", ["token", "vocab"])
@pytest.mark.parametrize("needs", [n for n in itertools.product([False, True], repeat=3) if any(n)])
def test_backward_paths_requires_grad_subsets(force_path, device, path, needs):
    hidden, weight, b, labels = make((2, 5), 8, 13, torch.float64, device, ignore=0.3)
    force_path(path, (3, 4) if path == "vocab" else None)
    leaves = [t.clone().requires_grad_(n) for t, n in zip((hidden, weight, b), needs)]
    lp, ent = linear_token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], return_entropy=True)
    (lp.sum() + 0.5 * ent.sum()).backward()
    _, rgrads = ref_grads(hidden, weight, b, labels, torch.ones_like(lp), 0.5 * torch.ones_like(lp))
    for leaf, need, rg in zip(leaves, needs, rgrads):
        assert (leaf.grad is None) == (not need)
        if need:
            assert max_err(leaf.grad, rg) < 1e-9


def test_vocab_blocked_all_ignored_and_gradcheck(force_path, device):
    force_path("vocab", (3, 4))
    hidden, weight, b, labels = make((2, 4), 5, 11, torch.float64, device, ignore=0.25)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    cw = class_weights(11, device, seed=3)
    assert torch.autograd.gradcheck(
        lambda h, w, bb: linear_cross_entropy(h, w, labels, bias=bb, label_smoothing=0.2, z_loss_scale=0.05,
                                              class_weights=cw, softcap=2.5, reduction="none"), leaves)
    none = torch.full_like(labels, -100)
    lp = linear_token_logprobs(leaves[0], leaves[1], none, bias=leaves[2])
    grads = torch.autograd.grad(lp.sum(), leaves)
    assert all(torch.equal(gr, torch.zeros_like(gr)) for gr in grads)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_vocab_blocked_cross_entropy(force_path, device, dtype, reduction):
    """linear_cross_entropy with label smoothing, class weights and z-loss: both loop orders against
    F.cross_entropy on materialized logits (fp64), and against each other."""
    opts = dict(reduction=reduction, label_smoothing=0.2, z_loss_scale=0.01, weighted=True)
    hidden, weight, b, labels, cw, kw = ce_case(dtype, opts, device, shape=(4, 9), H=16, V=61, seed=4)
    tf = {"softcap": 4.0, "temperature": 0.7}
    up = lambda out: (torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).view(out.shape)
                      .to(out.device, out.dtype))
    lab, cw64 = labels.cpu(), cw.cpu()
    want, rgrads = ce_grads(lambda h, w, bb: ref_cross_entropy(h @ w.t() + bb, lab, class_weights=cw64, **kw, **tf)[0],
                            cpu64(hidden, weight, b), up)
    results = {}
    for path, blocks in (("token", None), ("vocab", (5, 7)), ("vocab", (100, 16)), ("vocab", None)):
        force_path(path, blocks)
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
        results[(path, blocks)] = ce_grads(
            lambda h, w, bb: linear_cross_entropy(h, w, labels, bias=bb, class_weights=cw, chunk_size=6, **kw, **tf),
            leaves, up)
    tok_loss, tok_grads = results[("token", None)]
    for key, (loss, grads) in results.items():
        if dtype == torch.bfloat16:
            tol_ref, tol_tok = 0.03, LOW_TOL[dtype]
        else:
            tol_ref = tol_tok = 1e-10 if dtype == torch.float64 else 2e-5
        assert max_err(loss, want) <= tol_ref * (1 + want.abs().max().item()), key
        assert torch.equal(loss, tok_loss), key
        for gg, tg, rg in zip(grads, tok_grads, rgrads):
            assert max_err(gg, rg) <= tol_ref * (1 + rg.abs().max().item()), key
            assert max_err(gg, tg) <= tol_tok * (1 + rg.abs().max().item()), key


def test_auto_chunk_size_bound():
    for V, dt in [(32000, torch.float32), (128256, torch.bfloat16), (7, torch.float16)]:
        for dev in ("cpu", "cuda"):
            c = auto_chunk_size(1 << 20, V, dt, dev)
            assert c >= 16
            assert c * V * torch.empty((), dtype=dt).element_size() <= max(CHUNK_BYTES[dev], 16 * V * 4)
    assert auto_chunk_size(5, 32000, torch.float32, "cpu") == 5


def test_auto_chunk_size_depends_on_hidden():
    item = 4
    small = auto_chunk_size(1 << 20, 1000, torch.float32, "cuda", 64)
    large = auto_chunk_size(1 << 20, 1000, torch.float32, "cuda", 16384)
    assert small > large >= 16
    # the whole per-row working set fits the budget while that leaves GEMM-efficient chunks
    assert small * (1000 * item + 64 * (item + 4)) <= CHUNK_BYTES["cuda"]
    # CPU: at most MAX_ROWS rows; below that cap a large H still shrinks the chunk
    assert auto_chunk_size(1 << 20, 1000, torch.float32, "cpu", 64) == MAX_ROWS["cpu"]
    assert auto_chunk_size(1 << 20, 128256, torch.float32, "cpu", 64) < MAX_ROWS["cpu"]
    # a large H never pushes the chunk below the GEMM floor that the logits budget alone allows
    assert auto_chunk_size(1 << 20, 32000, torch.float32, "cpu", 65536) >= 128
    assert auto_chunk_size(1 << 20, 128256, torch.bfloat16, "cuda", 8192) >= 512
    # without H: the previous behaviour (logits buffer only)
    assert auto_chunk_size(1 << 20, 32000, torch.float32, "cuda") == (CHUNK_BYTES["cuda"] // (32000 * 4)) // 16 * 16


def test_backward_path_choice():
    """The automatic loop order and block sizes (pure arithmetic on shapes and dtypes; the CUDA
    sizes are checked by name, on any machine)."""
    w32, w16 = torch.zeros(4, 2), torch.zeros(4, 2, dtype=torch.bfloat16)
    N = chunks
    assert N.use_vocab_blocks(w16, N.NEED_WEIGHT) and N.use_vocab_blocks(w16, N.NEED_WEIGHT | N.NEED_HIDDEN)
    assert not N.use_vocab_blocks(w16, N.NEED_HIDDEN)  # no dW: no accumulator to avoid
    assert not N.use_vocab_blocks(w32, N.NEED_WEIGHT)  # fp32 dW accumulates in the result itself
    # GPU size of the issue: all 16384 rows in one token chunk, wide vocabulary blocks, within the
    # token-outer path's logits buffer
    chunk = auto_chunk_size(16384, 128256, torch.bfloat16, "cuda", 4096)
    c, vb = N.vocab_block_sizes(16384, 128256, chunk, "cuda")
    assert c == 16384 and vb % 64 == 0 and vb >= N.MIN_VOCAB_BLOCK["cuda"] and c * vb <= chunk * 128256
    # many rows: the block stays at the GEMM floor and the token chunk shrinks instead
    c, vb = N.vocab_block_sizes(1 << 20, 32000, 64, "cpu")
    assert vb == N.MIN_VOCAB_BLOCK["cpu"] and c % 16 == 0 and c * vb <= 64 * 32000
    assert N.vocab_block_sizes(10, 5, 1, "cpu") == (10, 5)  # small V: one block (token chunk >= 16 rows)


def test_slice_kernel_grad_mean_with_global_vocab(device):
    """The slice backward with grad_mean, the whole vocabulary's size and the slice's class weights
    gives, slice by slice, the full-vocabulary gradient."""
    g = torch.Generator().manual_seed(0)
    n, V = 6, 10
    logits = torch.randn(n, V, generator=g, dtype=torch.float64).to(device)
    labels = torch.randint(0, V, (n,), generator=g).to(device)
    mw = (torch.rand(V, generator=g, dtype=torch.float64) + 0.5).to(device)
    lse = torch.logsumexp(logits, -1)
    gr = [torch.randn(n, generator=g, dtype=torch.float64).to(device) for _ in range(3)]  # logp, lse, mean
    full = torch.empty_like(logits)
    tf = (1.0, 1.0, 0.0)
    stream = stream_of(logits)
    kernels.logprob_backward(desc(logits, "logits"), desc(labels, "labels"), desc(lse, "lse"), None,
                             desc(gr[0], "grad_logp"), None, desc(full, "grad_logits"), *tf, -100, stream,
                             desc(gr[1], "grad_lse"), desc(gr[2], "grad_mean"), desc(mw, "mean_weights"))
    parts = []
    for v0, v1 in ((0, 4), (4, 10)):
        local = torch.where((labels >= v0) & (labels < v1), labels - v0, -1)
        out = torch.empty(n, v1 - v0, dtype=torch.float64, device=device)
        kernels.logprob_backward_slice(desc(logits[:, v0:v1], "logits"), desc(local, "labels"), desc(lse, "lse"), None,
                                       desc(gr[0], "grad_logp"), None, desc(out, "grad_logits"), *tf, -(1 << 62),
                                       stream, desc(gr[1], "grad_lse"), desc(gr[2], "grad_mean"),
                                       desc(mw[v0:v1].contiguous(), "mean_weights"), mean_vocab=V)
        parts.append(out)
    assert max_err(torch.cat(parts, 1), full) < 1e-14
    out = torch.empty(n, 4, dtype=torch.float64, device=device)
    with pytest.raises(Exception, match="mean_vocab"):  # the slice's own V is not the vocabulary size
        kernels.logprob_backward_slice(desc(logits[:, :4], "logits"), desc(labels, "labels"), desc(lse, "lse"), None,
                                       None, None, desc(out, "grad_logits"), *tf, -100, stream, None,
                                       desc(gr[2], "grad_mean"), None, mean_vocab=2)
    with pytest.raises(Exception, match="mean_vocab"):
        kernels.logprob_backward(desc(logits, "logits"), desc(labels, "labels"), desc(lse, "lse"), None, None, None,
                                 desc(full, "grad_logits"), *tf, -100, stream, None, desc(gr[2], "grad_mean"), None,
                                 mean_vocab=7)
    with pytest.raises(Exception, match="mean_weights"):
        kernels.logprob_backward_slice(desc(logits[:, :4], "logits"), desc(labels, "labels"), desc(lse, "lse"), None,
                                       None, None, desc(out, "grad_logits"), *tf, -100, stream, None,
                                       desc(gr[2], "grad_mean"), desc(mw, "mean_weights"), mean_vocab=V)
