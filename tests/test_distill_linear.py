"""pyalign.distill.linear_distillation_loss: against the eager composition (both heads' full logits,
then the float64 reference divergence) for every beta and reduction, with and without labels, biases
and teacher gradients, hidden sizes that differ, one or several chunks; fp32/bf16; all-ignored
batches; no-grad calls; opcheck; torch.compile; memory from torch's allocator accounting; bad input."""
from __future__ import annotations

import pytest
import torch

from pyalign import distill
from pyalign.bench.memory import measure
from pyalign.ops.linear import NEED_BIAS, NEED_HIDDEN, NEED_WEIGHT
from pyalign.ops.linear_distill import linear_distillation_op
from pyalign.reference import distill as R

NAMES = ("student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight", "teacher_bias")


def heads(B=2, T=7, Hs=16, Ht=24, V=50, dtype=torch.float64, device="cpu", seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(device, dtype)
    hs, ws, ht, wt = mk(B, T, Hs), mk(V, Hs, scale=0.4), mk(B, T, Ht), mk(V, Ht, scale=0.4)
    bs, bt = (mk(V), mk(V)) if bias else (None, None)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, :2] = -100
    return [hs, ws, bs, ht, wt, bt], y.to(device)


def fused(ins, labels, **kw):
    hs, ws, bs, ht, wt, bt = ins
    return distill.linear_distillation_loss(hs, ws, ht, wt, labels, student_bias=bs, teacher_bias=bt, **kw)


def eager(ins, labels, **kw):
    hs, ws, bs, ht, wt, bt = ins
    kw.pop("chunk_size", None)
    zs = hs @ ws.T + (0 if bs is None else bs)
    zt = ht @ wt.T + (0 if bt is None else bt)
    return R.distillation_loss(zs, zt, labels, **kw)


def grads(fn, ins, labels, teacher_grad, dtype=None, **kw):
    leaves = [None if t is None else (t if dtype is None else t.to(dtype)).clone().requires_grad_(
        teacher_grad or i < 3) for i, t in enumerate(ins)]
    loss = fn(leaves, labels, **kw)
    loss.backward()
    return loss.detach(), [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("reduction,num_items", [("batchmean", None), ("sum", None), ("mean", None),
                                                 ("batchmean", 11)])
def test_matches_eager_composition(device, beta, reduction, num_items):
    ins, y = heads(device=device)
    for labels in (y, None):
        for teacher_grad in (False, True):
            for chunk in (4, 64):
                kw = dict(beta=beta, temperature=0.9, reduction=reduction, num_items_in_batch=num_items,
                          chunk_size=chunk)
                got = grads(fused, ins, labels, teacher_grad, **kw)
                want = grads(eager, [t.cpu() for t in ins], None if labels is None else labels.cpu(), teacher_grad,
                             **kw)
                torch.testing.assert_close(got[0].cpu(), want[0], rtol=1e-10, atol=1e-12)
                for name, g, w in zip(NAMES, got[1], want[1]):
                    if not teacher_grad and name.startswith("teacher"):
                        assert g is None
                        continue
                    torch.testing.assert_close(g.cpu(), w, rtol=1e-9, atol=1e-12, msg=name)


def test_without_biases_and_softcaps():
    ins, y = heads(bias=False)
    kw = dict(beta=0.5, student_softcap=5.0, teacher_softcap=4.0, chunk_size=5)
    got, want = grads(fused, ins, y, True, **kw), grads(eager, ins, y, True, **kw)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    for g, w in zip(got[1], want[1]):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("divergence", ["tvd", "skew_kl", "skew_reverse_kl"])
def test_other_divergences(divergence):
    ins, y = heads()
    kw = dict(divergence=divergence, skew_alpha=0.2, chunk_size=4)
    got, want = grads(fused, ins, y, True, **kw), grads(eager, ins, y, True, **kw)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    for name, g, w in zip(NAMES, got[1], want[1]):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_low_precision(device, dtype, tol):
    """fp32: to fp32 rounding; bf16 (the logits GEMMs in bf16, the kernel in fp32, dW accumulated in
    fp32 over several chunks and rounded once): to bf16 rounding of the logits."""
    ins, y = heads(device=device, V=300, Hs=32, Ht=48)
    for chunk in (4, 64):
        got = grads(fused, ins, y, True, dtype=dtype, beta=0.5, chunk_size=chunk)
        rounded = [None if t is None else t.to(dtype).double() for t in ins]
        want = grads(eager, [None if t is None else t.cpu() for t in rounded], y.cpu(), True, beta=0.5)
        torch.testing.assert_close(got[0].double().cpu(), want[0], rtol=tol, atol=tol * 1e-2)
        for name, g, w in zip(NAMES, got[1], want[1]):
            assert g.dtype == dtype, name
            scale = w.abs().max().item()
            assert (g.double().cpu() - w).abs().max().item() <= tol * scale, name


def test_all_ignored_and_no_grad():
    ins, y = heads()
    y[:] = -100
    loss, gs = grads(fused, ins, y, True, beta=0.5, chunk_size=4)
    assert loss.item() == 0 and all(not g.any() for g in gs)
    ins, y = heads()
    with torch.no_grad():
        torch.testing.assert_close(fused(ins, y, beta=0.5), eager(ins, y, beta=0.5), rtol=1e-10, atol=1e-12)


def test_hidden_only_gradient():
    ins, y = heads()
    leaves = [t.clone() for t in ins]
    leaves[0].requires_grad_()
    fused(leaves, y, beta=0.2, chunk_size=3).backward()
    want = grads(eager, ins, y, False, beta=0.2)[1][0]
    torch.testing.assert_close(leaves[0].grad, want, rtol=1e-9, atol=1e-12)


def test_opcheck_and_compile():
    ins, y = heads(dtype=torch.float32)
    hs, ws, bs, ht, wt, bt = ins
    w = torch.rand(y.numel())
    args = (hs.reshape(-1, hs.shape[-1]).clone().requires_grad_(), ws.clone().requires_grad_(), bs, ht.reshape(-1, ht.shape[-1]),
            wt, bt, y.reshape(-1), w, "jsd", 0.5, 1.0, 0.0, 0.0, -100, 4, NEED_HIDDEN | NEED_WEIGHT, 0)
    torch.library.opcheck(linear_distillation_op.op, args)
    fn = torch.compile(lambda a, b: distill.linear_distillation_loss(a, b, ht, wt, y, student_bias=bs, teacher_bias=bt,
                                                                     beta=0.5, chunk_size=4), fullgraph=True)
    outs = []
    for f in (lambda a, b: distill.linear_distillation_loss(a, b, ht, wt, y, student_bias=bs, teacher_bias=bt, beta=0.5,
                                                            chunk_size=4), fn):
        a, b = hs.clone().requires_grad_(), ws.clone().requires_grad_()
        loss = f(a, b)
        loss.backward()
        outs.append((loss.detach(), a.grad, b.grad))
    for e, c in zip(*outs):
        assert torch.equal(e, c)


def test_memory():
    """torch's allocator accounting (deterministic): the call keeps the returned gradients (dW, dh of
    the student) and, transiently, the saved copies being scaled, one chunk's two logits blocks and
    their fp32 gradients and O(n H); no [n, V] tensor (which would exceed the bound)."""
    n_tok, H, V, chunk = 256, 64, 8000, 32
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(1, n_tok, H, generator=g).requires_grad_()
    ws = (torch.randn(V, H, generator=g) / H ** 0.5).requires_grad_()
    ht, wt = torch.randn(1, n_tok, H, generator=g), torch.randn(V, H, generator=g) / H ** 0.5
    y = torch.randint(0, V, (1, n_tok), generator=g)

    def run():
        return torch.autograd.grad(distill.linear_distillation_loss(hs, ws, ht, wt, y, beta=0.5, chunk_size=chunk),
                                   (hs, ws))
    _, use = measure(run)
    dw, dh = V * H * 4, n_tok * H * 4
    assert use.retained == dw + dh, use
    bound = 2 * (dw + dh) + 4 * chunk * V * 4 + 4 * n_tok * H * 4 + 2 ** 20
    assert use.peak <= bound, (use, bound)
    assert use.peak < n_tok * V * 4, use  # less than one full logits tensor


def test_bad_input():
    ins, y = heads()
    hs, ws, bs, ht, wt, bt = ins
    cases = [
        (ValueError, "teacher_weight", dict(teacher_weight=wt[:-1], teacher_bias=None)),
        (ValueError, "teacher_hidden", dict(teacher_hidden=ht[:, :-1], labels=None)),
        (ValueError, "student_weight", dict(student_weight=ws[:, :-1])),
        (ValueError, "teacher_bias", dict(teacher_bias=bt[:-1])),
        (ValueError, "labels", dict(labels=y[:, :-1])),
        (ValueError, "reduction", dict(reduction="none")),
        (ValueError, "beta", dict(beta=2.0)),
        (ValueError, "chunk_size", dict(chunk_size=0)),
        (TypeError, "student_hidden", dict(student_hidden=hs.long())),
    ]
    for exc, name, kw in cases:
        args = dict(student_hidden=hs, student_weight=ws, teacher_hidden=ht, teacher_weight=wt, labels=y,
                    student_bias=bs, teacher_bias=bt)
        args.update(kw)
        pos = [args.pop(k) for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight", "labels")]
        with pytest.raises(exc, match=name):
            distill.linear_distillation_loss(*pos, **args)
