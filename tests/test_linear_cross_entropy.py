"""The fused linear cross-entropy (pyalign.logprob.linear_cross_entropy) against F.cross_entropy
(+ z-loss) on materialized float64 logits, and its forward-gradient path (a reduced loss's gradient
formed in the forward, 3 GEMMs per chunk, scaled in the backward) against the recompute path
(``pyalign.overrides(forward_gradients=False)``); on every device."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import pyalign
import pyalign.ops.linear.chunks as chunks
from linear_helpers import (CE_OPTIONS, LOW_TOL, GemmCounter, ce_case, ce_grads, class_weights, cpu64, lce_run, make,
                            max_err, ref_cross_entropy)
from pyalign.logprob import linear_cross_entropy
from pyalign.ops.linear.ops import linear_cross_entropy_fwd_grad_backward_op, linear_cross_entropy_fwd_grad_op


def _upstream(out):
    """A non-uniform upstream gradient for ``out``, on its device and in its dtype."""
    return torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).view(out.shape).to(out.device, out.dtype)


@pytest.mark.parametrize("opts", CE_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tf", [{}, {"softcap": 4.0, "temperature": 0.7, "logit_scale": 1.3}])
def test_cross_entropy_matches_torch(device, dtype, opts, tf):
    hidden, weight, b, labels, cw, kw = ce_case(dtype, opts, device)
    up_gen = lambda out: torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype, device=out.device).view(out.shape)
    ours = lambda h, w, bb: linear_cross_entropy(h, w, labels, bias=bb, class_weights=cw, chunk_size=5, **kw, **tf)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    got, ggrads = ce_grads(ours, leaves, up_gen)
    lab, cw64 = labels.cpu(), None if cw is None else cw.cpu()
    theirs = lambda h, w, bb: ref_cross_entropy(h @ w.t() + bb, lab, class_weights=cw64, **kw, **tf)[0]
    want, rgrads = ce_grads(theirs, cpu64(hidden, weight, b), up_gen)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert got.dtype == dtype
    assert max_err(got, want) <= tol * (1 + want.abs().max().item())
    for gg, rg in zip(ggrads, rgrads):
        assert gg.dtype == dtype and max_err(gg, rg) <= tol * (1 + rg.abs().max().item())
    # the materialized cross_entropy gives the same
    mat = pyalign.cross_entropy(hidden.double() @ weight.double().t() + b.double(), labels, class_weights=cw,
                                **kw, **tf)
    assert max_err(mat, want) <= 1e-10 * (1 + want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("opts", [CE_OPTIONS[i] for i in (0, 7, 13, 23)])
def test_cross_entropy_low_precision(device, dtype, opts):
    """Within twice the error of eager F.cross_entropy in the same dtype on the same device (plus a
    small floor)."""
    hidden, weight, b, labels, cw, kw = ce_case(dtype, opts, device, shape=(4, 9), H=32, V=301, seed=3)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    got, ggrads = ce_grads(lambda h, w, bb: linear_cross_entropy(h, w, labels, bias=bb, class_weights=cw,
                                                                 chunk_size=8, **kw), leaves, _upstream)
    lab, cw64 = labels.cpu(), None if cw is None else cw.cpu()
    want, rgrads = ce_grads(lambda h, w, bb: ref_cross_entropy(h @ w.t() + bb, lab, class_weights=cw64, **kw)[0],
                            cpu64(hidden, weight, b), _upstream)
    eager_leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    cw_e = None if cw is None else cw.to(dtype)
    eager, egrads = ce_grads(lambda h, w, bb: ref_cross_entropy(h @ w.t() + bb, labels, class_weights=cw_e, **kw)[0],
                             eager_leaves, _upstream)
    assert max_err(got, want) <= 2 * max_err(eager, want) + 0.02 * (1 + want.abs().max().item())
    for gg, eg, rg in zip(ggrads, egrads, rgrads):
        assert max_err(gg, rg) <= 2 * max_err(eg, rg) + 0.02 * (1 + rg.abs().max().item())


def test_cross_entropy_shift_and_return_z_loss(device):
    hidden, weight, b, labels = make((2, 6), 8, 19, torch.float64, device, ignore=0.2)
    loss, zl = linear_cross_entropy(hidden, weight, labels, bias=b, shift=True, z_loss_scale=0.1,
                                    label_smoothing=0.1, return_z_loss=True, chunk_size=3)
    h, w, bb = (t.cpu() for t in (hidden, weight, b))
    want, wz = ref_cross_entropy((h @ w.t() + bb)[:, :-1], labels.cpu()[:, 1:], reduction="mean",
                                 label_smoothing=0.1, z_loss_scale=0.1, class_weights=None)
    assert max_err(loss, want) < 1e-12 and max_err(zl, wz) < 1e-12 and zl.item() > 0
    # no kept token: "mean" is NaN exactly like F.cross_entropy, "sum" is 0
    none = torch.full_like(labels, -100)
    assert torch.isnan(linear_cross_entropy(hidden, weight, none)).item()
    assert torch.isnan(F.cross_entropy((hidden @ weight.t()).reshape(-1, 19), none.reshape(-1))).item()
    assert linear_cross_entropy(hidden, weight, none, reduction="sum").item() == 0.0


def test_cross_entropy_gradcheck_fp64(device):
    hidden, weight, b, labels = make((2, 4), 5, 7, torch.float64, device, ignore=0.25)
    cw = class_weights(7, device, seed=1)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    for kw in (dict(label_smoothing=0.2, z_loss_scale=0.05, class_weights=cw, softcap=2.5, temperature=0.8),
               dict(reduction="none", label_smoothing=0.3, z_loss_scale=0.1), dict(reduction="sum", class_weights=cw)):
        assert torch.autograd.gradcheck(
            lambda h, w, bb: linear_cross_entropy(h, w, labels, bias=bb, chunk_size=3, **kw), leaves)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    (dict(label_smoothing=float("nan")), ValueError, "label_smoothing"),
    (dict(z_loss_scale=-1.0), ValueError, "z_loss_scale"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(class_weights=torch.ones(9)), ValueError, "class_weights: expected shape"),
    (dict(class_weights=torch.ones(10, dtype=torch.int64)), TypeError, "class_weights"),
    (dict(class_weights=[1.0] * 10), TypeError, "class_weights"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
])
def test_cross_entropy_bad_inputs(device, kwargs, exc, match):
    hidden, weight, b, labels = make((2, 4), 8, 10, torch.float32, device, ignore=0.0)
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    with pytest.raises(exc, match=match):
        linear_cross_entropy(hidden, weight, labels, **kwargs)
    if "chunk_size" not in kwargs:
        with pytest.raises(exc, match=match):
            pyalign.cross_entropy(hidden @ weight.t(), labels, **kwargs)


# ---- the forward-gradient path ---------------------------------------------------------------------

FG_OPTIONS = [
    dict(),
    dict(label_smoothing=0.2),
    dict(z_loss_scale=0.03, weighted=True),
    dict(label_smoothing=0.3, z_loss_scale=0.01, weighted=True, softcap=3.0, temperature=0.7, logit_scale=1.3),
    dict(shift=True, label_smoothing=0.1, z_loss_scale=0.02),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("opts", FG_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain")
@pytest.mark.parametrize("ignore", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_grad_matches_torch_and_recompute(recompute_path, device, dtype, reduction, opts, ignore, bias):
    """The forward-gradient path against F.cross_entropy (+ z-loss) on materialized fp64 logits and
    against the recompute path (loss bitwise, gradients within rounding), several token chunks."""
    hidden, weight, b, labels, cw, kw = ce_case(dtype, dict(opts, weighted=opts.get("weighted", False)), device,
                                                shape=(3, 7), H=16, V=37, ignore=ignore, seed=11)
    if not bias:
        b = None
    kw = dict(kw, reduction=reduction, class_weights=cw, chunk_size=4)
    needs = (True, True, bias)
    runs = {}
    for recompute in (False, True):
        recompute_path(recompute)
        runs[recompute] = lce_run(hidden, weight, b, labels, needs, upstream=(1.7, None), **kw)
    recompute_path(False)
    (loss, _, grads), (rloss, _, rgrads) = runs[False], runs[True]
    assert torch.equal(loss, rloss)
    # the fp64 oracle on materialized logits (CPU)
    ref = cpu64(hidden, weight, b)
    h, lab = ref[0], labels.cpu()
    if kw.get("shift"):
        h, lab = h[:, :-1], lab[:, 1:]
    logits = h @ ref[1].t() + (0 if ref[2] is None else ref[2])
    tf = {k: kw[k] for k in ("softcap", "temperature", "logit_scale") if k in kw}
    cw64 = None if cw is None else cw.cpu()
    want, _ = ref_cross_entropy(logits, lab, reduction=reduction, label_smoothing=kw.get("label_smoothing", 0.0),
                                z_loss_scale=kw.get("z_loss_scale", 0.0), class_weights=cw64, **tf)
    wgrads = torch.autograd.grad(want * 1.7, [t for t in ref if t is not None])
    low = dtype == torch.bfloat16
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 0.03}[dtype]
    assert max_err(loss, want) <= tol * (1 + want.abs().max().item())
    for gg, rg, wg in zip(grads, rgrads, wgrads):
        assert gg.dtype == dtype
        scale = 1 + wg.abs().max().item()
        assert max_err(gg, wg) <= tol * scale
        assert max_err(gg, rg) <= (LOW_TOL[dtype] if low else tol) * scale


@pytest.mark.parametrize("needs", [n for n in itertools.product((False, True), repeat=3) if any(n)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_forward_grad_requires_grad_subsets(recompute_path, device, needs, reduction):
    hidden, weight, b, labels = make((4, 5), 12, 29, torch.float64, device, ignore=0.25, seed=2)
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss_scale=0.02, chunk_size=3)
    loss, _, grads = lce_run(hidden, weight, b, labels, needs, **kw)
    recompute_path(True)
    rloss, _, rgrads = lce_run(hidden, weight, b, labels, needs, **kw)
    assert torch.equal(loss, rloss)
    for nd, gg, rg in zip(needs, grads, rgrads):
        assert (gg is None) == (not nd) == (rg is None)
        if nd:
            assert max_err(gg, rg) < 1e-12


@pytest.mark.parametrize("upstream", [(1.0, None), (0.0, 1.0), (0.7, -1.3), (-2.0, 0.0)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_forward_grad_return_z_loss(monkeypatch, device, upstream, reduction):
    """return_z_loss: the loss and the separate z-loss output each with its own upstream gradient,
    exactly; the z-loss output's part is recomputed only when its gradient is nonzero."""
    hidden, weight, b, labels = make((3, 6), 8, 23, torch.float64, device, ignore=0.2, seed=9)
    kw = dict(reduction=reduction, label_smoothing=0.2, z_loss_scale=0.05, return_z_loss=True, chunk_size=4,
              softcap=4.0)
    counter = GemmCounter(monkeypatch)
    loss, zl, grads = lce_run(hidden, weight, b, labels, (True, True, True), upstream=upstream, **kw)
    kept = int((labels != -100).sum())
    n_chunks = -(-kept // 4)
    assert counter.n == 3 * n_chunks + (3 * n_chunks if upstream[1] else 0)
    ref = cpu64(hidden, weight, b)
    want, wz = ref_cross_entropy(ref[0] @ ref[1].t() + ref[2], labels.cpu(), reduction=reduction, label_smoothing=0.2,
                                 z_loss_scale=0.05, class_weights=None, softcap=4.0)
    total = want * upstream[0] + (0 if upstream[1] is None else wz * upstream[1])
    wgrads = torch.autograd.grad(total, ref)
    assert max_err(loss, want) < 1e-12 and max_err(zl, wz) < 1e-12
    for gg, wg in zip(grads, wgrads):
        assert max_err(gg, wg) < 1e-10 * (1 + wg.abs().max().item())


def test_forward_grad_gradcheck_fp64(device):
    hidden, weight, b, labels = make((2, 4), 5, 7, torch.float64, device, ignore=0.25, seed=3)
    cw = class_weights(7, device, seed=4)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    for kw in (dict(label_smoothing=0.2, z_loss_scale=0.05, class_weights=cw, softcap=2.5, temperature=0.8),
               dict(reduction="sum", z_loss_scale=0.1, logit_scale=1.4), dict(shift=True, label_smoothing=0.1)):
        assert torch.autograd.gradcheck(
            lambda h, w, bb: linear_cross_entropy(h, w, labels, bias=bb, chunk_size=3, **kw), leaves)
    for red in ("mean", "sum"):
        assert torch.autograd.gradcheck(
            lambda h, w, bb: linear_cross_entropy(h, w, labels, bias=bb, chunk_size=3, z_loss_scale=0.1,
                                                  label_smoothing=0.1, return_z_loss=True, reduction=red), leaves)
    # a subset: weight only
    assert torch.autograd.gradcheck(lambda w: linear_cross_entropy(hidden, w, labels, chunk_size=2, z_loss_scale=0.1),
                                    (leaves[1],))


def test_forward_grad_all_ignored_and_determinism(device):
    hidden, weight, b, labels = make((2, 5), 8, 13, torch.float32, device, ignore=0.3, seed=4)
    none = torch.full_like(labels, -100)
    for red, expect_nan in (("mean", True), ("sum", False)):
        _, _, grads = lce_run(hidden, weight, b, none, (True, True, True), reduction=red, z_loss_scale=0.1)
        loss = linear_cross_entropy(hidden.clone().requires_grad_(), weight, none, reduction=red)
        assert bool(torch.isnan(loss)) == expect_nan
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    kw = dict(label_smoothing=0.1, z_loss_scale=0.01, chunk_size=3)
    a = lce_run(hidden, weight, b, labels, (True, True, True), **kw)
    c = lce_run(hidden, weight, b, labels, (True, True, True), **kw)
    assert torch.equal(a[0], c[0]) and all(torch.equal(x, y) for x, y in zip(a[2], c[2]))


@pytest.mark.parametrize("chunk", [4, 1000])
def test_forward_grad_low_precision_dw(recompute_path, device, chunk):
    """bf16/fp16 weights: one chunk writes dW with one GEMM, several chunks accumulate it in fp32
    (no bf16 accumulation across chunks): within block rounding of the recompute path."""
    for dtype in (torch.bfloat16, torch.float16):
        hidden, weight, b, labels = make((4, 9), 32, 301, dtype, device, ignore=0.2, seed=6)
        kw = dict(label_smoothing=0.1, z_loss_scale=0.01, chunk_size=chunk)
        loss, _, grads = lce_run(hidden, weight, b, labels, (True, True, True), **kw)
        recompute_path(True)
        rloss, _, rgrads = lce_run(hidden, weight, b, labels, (True, True, True), **kw)
        recompute_path(False)
        assert torch.equal(loss, rloss)
        for gg, rg in zip(grads, rgrads):
            assert gg.dtype == dtype
            assert max_err(gg, rg) <= LOW_TOL[dtype] * (1 + rg.abs().max().item())


def test_forward_grad_opcheck(device):
    hidden, weight, b, labels = make((9,), 5, 11, torch.float32, device, ignore=0.3, seed=7)
    cw = class_weights(11, device, seed=7).float()
    N = chunks
    for bb, needs, rest in ((b, N.NEED_HIDDEN | N.NEED_WEIGHT | N.NEED_BIAS, (0.1, 0.02, cw, False)),
                            (None, N.NEED_WEIGHT, (0.0, 0.0, None, True)),
                            (b, N.NEED_HIDDEN | N.NEED_BIAS, (0.2, 0.0, None, False))):
        for z_output in (False, True):
            h = hidden.clone().requires_grad_(bool(needs & N.NEED_HIDDEN))
            w = weight.clone().requires_grad_(bool(needs & N.NEED_WEIGHT))
            bias = None if bb is None else bb.clone().requires_grad_(bool(needs & N.NEED_BIAS))
            torch.library.opcheck(linear_cross_entropy_fwd_grad_op.op,
                                  (h, w, bias, labels, -100, 0.9, 1.0, 3.0, 4, *rest, needs, z_output))
    needs = N.NEED_HIDDEN | N.NEED_WEIGHT | N.NEED_BIAS
    loss, zl, lse, dh, dw, db = linear_cross_entropy_fwd_grad_op(hidden, weight, b, labels, -100, 1.0, 1.0, 0.0, 4,
                                                                 0.1, 0.05, None, False, needs, True)
    scalar = lambda v: torch.tensor(v, device=device)
    torch.library.opcheck(linear_cross_entropy_fwd_grad_backward_op.op,
                          (scalar(0.5), scalar(1.5), dh, dw, db, hidden, weight, b, labels, lse, -100,
                           1.0, 1.0, 0.0, 4, 0.05, False, needs))
    # a forward told not to form a gradient that autograd then wants: a clear error naming it
    h = hidden.clone().requires_grad_()
    out = linear_cross_entropy_fwd_grad_op(h, weight, None, labels, -100, 1.0, 1.0, 0.0, 4, 0.0, 0.0, None, False,
                                           N.NEED_WEIGHT, False)
    with pytest.raises(RuntimeError, match="hidden requires grad"):
        out[0].backward()


@pytest.mark.parametrize("needs", [(True, True, True), (False, True, False), (True, False, True)])
def test_forward_grad_torch_compile_fullgraph(device, needs):
    hidden, weight, b, labels = make((2, 7), 8, 19, torch.float32, device, ignore=0.2, seed=8)

    def loss_fn(h, w, bb):
        loss, zl = linear_cross_entropy(h, w, labels, bias=bb, label_smoothing=0.1, z_loss_scale=0.02, shift=True,
                                        return_z_loss=True, chunk_size=4)
        return loss + 0.5 * zl

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    mk = lambda: [t.clone().requires_grad_(nd) for t, nd in zip((hidden, weight, b), needs)]
    la_leaves, lb_leaves = mk(), mk()
    la, lb = loss_fn(*la_leaves), compiled(*lb_leaves)
    la.backward()
    lb.backward()
    assert max_err(la, lb) < 1e-6
    for x, y, nd in zip(la_leaves, lb_leaves, needs):
        assert (x.grad is None) == (not nd) == (y.grad is None)
        if nd:
            assert max_err(x.grad, y.grad) < 1e-6
