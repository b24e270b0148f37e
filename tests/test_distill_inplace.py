"""inplace_backward=True of pyalign.distill.distillation_loss and topk_distillation_loss: the gradient
written over the student's logits in the forward. Bitwise the same loss and gradients as without it
(every divergence, with and without the teacher's gradient, every reduction, an upstream gradient
other than 1, fp64/fp32 written straight over the logits, bf16/fp16 and the CPU's forward KL with the
teacher's gradient through the staging block, with several blocks), the gradient in the logits' own
storage, views (nn.Linear's output with a bias, a reshape, a slice: the gradient through as_strided),
memory from torch's allocator accounting, finite differences, opcheck, torch.compile, and the refusals:
logits that are not contiguous, a teacher sharing their memory, a second backward, another op that saved
them."""
from __future__ import annotations

import math

import pytest
import torch

import pyalign.ops.distill as distill_ops
from pyalign import distill
from pyalign.bench.memory import measure
from pyalign.ops.distill import distillation_inplace_op, inplace_gradient_op
from pyalign.ops.distill_topk import topk_distillation_inplace_op

CONFIGS = [dict(beta=0.0), dict(beta=0.3), dict(beta=1.0), dict(divergence="tvd"),
           dict(divergence="skew_kl", skew_alpha=0.2), dict(divergence="skew_reverse_kl", skew_alpha=0.3),
           dict(beta=0.5, student_softcap=8.0, teacher_softcap=6.0)]
TOPK = [(d, t) for d in ("forward_kl", "reverse_kl") for t in ("bucket", "renormalize")]


def batch(B=2, T=6, V=37, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3).to(device, dtype)
    t = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3).to(device, dtype)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, 1] = -100
    y[-1, 4:] = -100
    return s, t, y.to(device)


def topk_teacher(B=2, T=6, V=37, K=5, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    top = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2, -1).topk(K, -1)
    return top.values.to(device), top.indices.to(device)


def run(loss_fn, s, t, y, teacher_grad, upstream, **kw):
    """Loss, the gradient w.r.t. the logits (a non-leaf copy, as from an LM head), the teacher's, and
    whether the logits' gradient lies in their own storage."""
    a = s.clone().requires_grad_()
    b = t.clone().requires_grad_(teacher_grad)
    x = a * 1
    loss = loss_fn(x, b, y, **kw)
    up = upstream(loss)
    grads = torch.autograd.grad(loss, [x, b] if teacher_grad else [x], up)
    return loss.detach(), grads[0], grads[1] if teacher_grad else None, grads[0].data_ptr() == x.data_ptr()


def unit(loss):
    return torch.ones_like(loss)


def non_unit(loss):
    return torch.linspace(0.3, 1.7, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(loss.shape)


def assert_same(a, b):
    for x, y in zip(a[:3], b[:3]):
        assert (x is None) == (y is None)
        if x is not None:
            assert torch.equal(x, y), (x - y).abs().max()


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_distillation_same_bits_in_the_logits_storage(device, cfg, dtype):
    s, t, y = batch(dtype=dtype, device=device)
    for teacher_grad in (False, True):
        for reduction, upstream in (("batchmean", unit), ("sum", non_unit), ("none", non_unit)):
            kw = dict(cfg, temperature=0.8, reduction=reduction)
            want = run(distill.distillation_loss, s, t, y, teacher_grad, upstream, **kw)
            got = run(distill.distillation_loss, s, t, y, teacher_grad, upstream, inplace_backward=True, **kw)
            assert_same(got, want)
            assert got[3], "the gradient is not the logits' storage"
            assert not want[3]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_distillation_low_precision_staged(device, dtype):
    """bf16/fp16 logits hold the gradient rounded to their dtype: the same bits as without
    inplace_backward for an upstream gradient of 1, within one rounding of the dtype else."""
    s, t, y = batch(V=300, dtype=dtype, device=device)
    for cfg in CONFIGS[:3]:
        want = run(distill.distillation_loss, s, t, y, True, unit, **cfg)
        got = run(distill.distillation_loss, s, t, y, True, unit, inplace_backward=True, **cfg)
        assert_same(got, want)
        assert got[3] and got[1].dtype == dtype
        for c in (1 / 3, 4.0):
            up = lambda l: torch.full_like(l, c)
            want = run(distill.distillation_loss, s, t, y, False, up, **cfg)
            got = run(distill.distillation_loss, s, t, y, False, up, inplace_backward=True, **cfg)
            assert torch.equal(got[0], want[0])
            torch.testing.assert_close(got[1].float(), want[1].float(), rtol=1e-2, atol=1e-6)


def test_staging_in_several_blocks(monkeypatch):
    """The staging block of a few rows (forced): rows and gradients the same bits as the one-call
    kernel; the total is the sum of the blocks' totals (the same to rounding). The forward KL with the
    teacher's gradient, which the CPU kernel cannot write over its own input, goes this way too."""
    monkeypatch.setitem(distill_ops.STAGE_ELEMENTS, "cpu", 3 * 37)
    monkeypatch.setitem(distill_ops.STAGE_ELEMENTS, "cuda", 3 * 37)
    for dtype, beta in ((torch.float32, 0.0), (torch.bfloat16, 0.5), (torch.float64, 0.0)):
        s, t, y = batch(B=3, T=5, dtype=dtype)
        assert not distill_ops.writes_over_logits(dtype, "jsd", beta, True)
        for reduction in ("none", "sum"):
            want = run(distill.distillation_loss, s, t, y, True, unit, beta=beta, reduction=reduction)
            got = run(distill.distillation_loss, s, t, y, True, unit, beta=beta, reduction=reduction,
                      inplace_backward=True)
            assert got[3]
            if reduction == "none":
                assert_same(got, want)
            else:
                torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=0)
                assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


def test_the_forward_kl_with_teacher_gradient_needs_the_staging():
    """Why the staging: the CPU kernel writes the forward KL's student gradient in its second sweep and
    reads the student's logits again in its third, for the teacher's gradient; written over its own input
    the teacher's gradient is wrong. Every other mode reads each entry before writing over it."""
    s, t, y = batch(V=300, dtype=torch.float32)
    a, b = s.reshape(-1, 300).clone(), t.reshape(-1, 300)
    w = torch.ones(a.shape[0])
    args = (y.reshape(-1), w, "jsd", 0.0, 1.0, 0.0, 0.0, -100, True)
    want = distill_ops.distillation_op(a.clone(), b, *args)
    total, rows, grad_t = torch.empty(()), torch.empty(a.shape[0]), torch.empty_like(a)
    distill_ops._forward_into(a, b, *args[:2], rows, total, a, grad_t, *args[2:8])  # the student's gradient over a
    assert torch.equal(a, want[2])
    assert not torch.allclose(grad_t, want[3])  # the third sweep read gradients as logits
    for beta in (0.3, 1.0):
        a = s.reshape(-1, 300).clone()
        want = distill_ops.distillation_op(a.clone(), b, y.reshape(-1), w, "jsd", beta, 1.0, 0.0, 0.0, -100, True)
        distill_ops._forward_into(a, b, y.reshape(-1), w, rows, total, a, grad_t, "jsd", beta, 1.0, 0.0, 0.0, -100)
        assert torch.equal(a, want[2]) and torch.equal(grad_t, want[3])


@pytest.mark.parametrize("divergence,tail", TOPK)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_topk_same_bits_in_the_logits_storage(device, divergence, tail, dtype):
    s, _, y = batch(dtype=dtype, device=device)
    lp, ids = topk_teacher(device=device)
    fn = lambda x, b, yy, **kw: distill.topk_distillation_loss(x, lp, ids, yy, **kw)
    for reduction, upstream in (("batchmean", unit), ("sum", non_unit), ("none", non_unit)):
        kw = dict(divergence=divergence, tail=tail, temperature=0.9, reduction=reduction)
        want = run(fn, s, s, y, False, upstream, **kw)
        got = run(fn, s, s, y, False, upstream, inplace_backward=True, **kw)
        assert_same(got, want)
        assert got[3] and got[1].dtype == dtype


def test_leaf_logits_and_no_gradient():
    """A leaf's .grad is its own storage; without a gradient to form the logits are left alone."""
    s, t, y = batch()
    lp, ids = topk_teacher()
    for fn in (lambda x: distill.distillation_loss(x, t, y, inplace_backward=True),
               lambda x: distill.topk_distillation_loss(x, lp, ids, y, inplace_backward=True)):
        a = s.clone().requires_grad_()
        fn(a).backward()
        assert a.grad.data_ptr() == a.data_ptr()
        x, z = s.clone(), s.clone().requires_grad_()
        fn(x)
        with torch.no_grad():
            fn(z)
        assert torch.equal(x, s) and torch.equal(z.detach(), s)
    a = s.clone().requires_grad_()
    with torch.no_grad():
        loss = distill.distillation_loss(a, t, y, inplace_backward=True)
    assert torch.equal(a.detach(), s) and loss == distill.distillation_loss(s, t, y)


def numerical_grad(f, x, eps=1e-6):
    """Central differences of the scalar ``f`` at every entry of ``x`` (float64)."""
    g = torch.zeros_like(x)
    flat, gf = x.view(-1), g.view(-1)
    for i in range(flat.numel()):
        old = flat[i].item()
        flat[i] = old + eps
        hi = f(x).item()
        flat[i] = old - eps
        lo = f(x).item()
        flat[i] = old
        gf[i] = (hi - lo) / (2 * eps)
    return g


def test_views():
    """Logits that are a view of a tensor requiring grad (nn.Linear's 3-d output with a bias, a reshape of
    a matmul, a slice of the batch): the same bits as without inplace_backward, the gradient sent through
    as_strided (autograd's treatment of an in-place write to a view): torch's allocator accounting sees
    one buffer of the base's size in the backward, no held gradient and no product."""
    B, T, H, V = 2, 64, 16, 3000
    g = torch.Generator().manual_seed(3)
    h, w, bias = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g) * 0.2, torch.randn(V, generator=g)
    t = torch.randn(B, T, V, generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    lp, ids = topk_teacher(B=B, T=T, V=V, K=4)
    makers = {"linear with bias": lambda a, c, d: torch.nn.functional.linear(a, c, d),
              "reshape": lambda a, c, d: (a.reshape(-1, H) @ c.T).view(B, T, V),
              "slice": lambda a, c, d: (a @ c.T)[:1]}
    losses = {"distill": lambda z, n, i: distill.distillation_loss(z, t[:n], y[:n], beta=0.4, inplace_backward=i),
              "topk": lambda z, n, i: distill.topk_distillation_loss(z, lp[:n], ids[:n], y[:n], inplace_backward=i)}
    for (mk_name, mk), (loss_name, loss_fn) in ((m, l) for m in makers.items() for l in losses.items()):
        out = []
        for inplace in (False, True):
            a, c, d = (x.clone().requires_grad_() for x in (h, w, bias))

            def call():
                z = mk(a, c, d)
                assert z._is_view()
                loss = loss_fn(z, z.shape[0], inplace)
                return (loss.detach(), *torch.autograd.grad(loss, (a, c, d), allow_unused=True))
            out.append(measure(call))
        (want, normal), (got, inplace) = out
        for x, y_ in zip(got, want):
            assert (x is None) == (y_ is None)
            assert x is None or torch.equal(x, y_), (mk_name, loss_name)
        logits = B * T * V * 4  # the base, in either case
        assert normal.peak >= logits + 2 * (logits if mk_name != "slice" else logits // 2), (mk_name, normal)
        returned = sum(x.numel() * x.element_size() for x in got[1:] if x is not None)
        assert inplace.peak <= 2 * logits + returned + 2 ** 16, (mk_name, loss_name, inplace)


def test_against_finite_differences():
    """The gradient each in-place call leaves in the logits' storage (and the teacher's) against central
    differences of the loss in float64 (gradcheck itself needs a backward it can repeat)."""
    s, t, y = batch(B=1, T=3, V=6)
    y[0, 2] = 4
    lp, ids = topk_teacher(B=1, T=3, V=6, K=2)
    for kw in (dict(beta=0.0), dict(beta=0.4), dict(divergence="skew_kl")):
        a, b = s.clone().requires_grad_(), t.clone().requires_grad_()
        x = a * 1
        ga, gb = torch.autograd.grad(distill.distillation_loss(x, b, y, inplace_backward=True, **kw), (x, b))
        with torch.no_grad():
            want_a = numerical_grad(lambda z: distill.distillation_loss(z, t, y, **kw), s.clone())
            want_b = numerical_grad(lambda z: distill.distillation_loss(s, z, y, **kw), t.clone())
        torch.testing.assert_close(ga, want_a, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(gb, want_b, rtol=1e-5, atol=1e-7)
    for divergence, tail in TOPK:
        kw = dict(divergence=divergence, tail=tail)
        x = s.clone().requires_grad_()
        distill.topk_distillation_loss(x, lp, ids, y, inplace_backward=True, **kw).backward()
        with torch.no_grad():
            want = numerical_grad(lambda z: distill.topk_distillation_loss(z, lp, ids, y, **kw), s.clone())
        torch.testing.assert_close(x.grad, want, rtol=1e-5, atol=1e-7)


def test_memory(monkeypatch):
    """torch's allocator accounting: without inplace_backward the call holds a [N, V] gradient from the
    forward to the backward and makes the returned one; with it, neither (the gradient is the logits'
    storage; what remains is O(N K)). bf16 through the staging block: one block of rows at most (beside
    the teacher's cast to the student's dtype)."""
    N, V, K = 256, 4000, 8
    g = torch.Generator().manual_seed(0)
    s = torch.randn(N, V, generator=g)
    t = torch.randn(N, V, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    lp, ids = topk_teacher(B=1, T=N, V=V, K=K)
    lp, ids = lp[0], ids[0]
    full = N * V * 4
    small = 8 * N * (K + 1) * 8  # the O(N K) rows, weights and [N, K] work

    def call(fn, x, inplace):
        return lambda: torch.autograd.grad(fn(x, inplace), x)

    dist = lambda x, inplace: distill.distillation_loss(x, t.to(x.dtype), y, beta=0.5, inplace_backward=inplace)
    topk = lambda x, inplace: distill.topk_distillation_loss(x, lp, ids, y, inplace_backward=inplace)
    for fn in (dist, topk):
        x = s.clone().requires_grad_()
        _, normal = measure(call(fn, x, False))
        assert normal.peak >= 2 * full, normal
        x = s.clone().requires_grad_()
        (grad,), use = measure(call(fn, x, True))
        assert grad.data_ptr() == x.data_ptr()
        assert use.peak <= small, use
    block = 32
    monkeypatch.setitem(distill_ops.STAGE_ELEMENTS, "cpu", block * V)
    x = s.to(torch.bfloat16).requires_grad_()
    (grad,), use = measure(call(dist, x, True))
    assert grad.data_ptr() == x.data_ptr()
    assert use.peak <= N * V * 2 + block * V * 4 + small, use


def test_opcheck_and_compile():
    s, t, y = batch(dtype=torch.float32)
    s2, t2, y2 = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]), y.reshape(-1)
    w = torch.rand(s2.shape[0])
    for dtype, beta, teacher_grad in ((torch.float32, 0.5, True), (torch.float32, 0.0, True),
                                      (torch.bfloat16, 0.3, False)):
        torch.library.opcheck(distillation_inplace_op.op, (s2.to(dtype).clone(), t2.to(dtype), y2, w, "jsd", beta, 1.0,
                                                           0.0, 0.0, -100, teacher_grad))
    lp, ids = topk_teacher()
    torch.library.opcheck(topk_distillation_inplace_op.op, (s2.clone(), lp.reshape(-1, 5).float(), ids.reshape(-1, 5),
                                                            y2, w, "reverse_kl", "bucket", 0.8))
    torch.library.opcheck(inplace_gradient_op.op, (torch.randn_like(s2).requires_grad_(), torch.tensor(1.0),
                                                   torch.rand(s2.shape[0]), w, t2.clone().requires_grad_(),
                                                   torch.randn_like(t2)))
    fns = [lambda a, b: distill.distillation_loss(a, b, y, beta=0.3, inplace_backward=True),
           lambda a, b: distill.distillation_loss(a * 2, b, y, divergence="tvd", reduction="none",
                                                  inplace_backward=True),
           lambda a, b: distill.topk_distillation_loss(a, lp, ids, y, divergence="reverse_kl",
                                                       inplace_backward=True)]
    for fn in fns:
        outs = []
        for f in (fn, torch.compile(fn, fullgraph=True)):
            a, b = s.clone().requires_grad_(), t.clone().requires_grad_()
            loss = f(a, b)
            ga, *gb = torch.autograd.grad(loss.sum(), [a, b], allow_unused=True)
            outs.append((loss.detach(), ga))
        for e, c in zip(*outs):
            assert torch.equal(e, c)


def test_refusals():
    s, t, y = batch()
    lp, ids = topk_teacher()
    base = s.clone().requires_grad_()
    x = base * 1
    cases = [(x[:, :3], "contiguous"), (x.transpose(0, 1), "contiguous")]
    k = 4
    for logits, match in cases:
        lead = logits.shape[:-1]
        with pytest.raises(ValueError, match=f"student_logits: .*{match}"):
            distill.distillation_loss(logits, torch.zeros(logits.shape, dtype=logits.dtype), None,
                                      inplace_backward=True)
        topk_lp = torch.full(lead + (k,), -math.log(k) - 1.0, dtype=torch.float64)
        with pytest.raises(ValueError, match=f"student_logits: .*{match}"):
            distill.topk_distillation_loss(logits, topk_lp, torch.arange(k).expand(lead + (k,)).contiguous(),
                                           inplace_backward=True)
    with pytest.raises(ValueError, match="teacher_logits: shares memory with student_logits"):
        distill.distillation_loss(x, x, y, inplace_backward=True)
    # another op saved the logits: autograd's in-place check refuses the backward
    x = base * 1
    saved = x.sin().sum()
    loss = distill.distillation_loss(x, t, y, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + saved).backward()
    # a second backward through the call
    x = base * 1
    loss = distill.topk_distillation_loss(x, lp, ids, y, inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
