"""Fused linear-head log-probs (pyalign.linear) against the materialized-logits reference."""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyalign
from pyalign.bench.memory import measure
from pyalign.logprob import linear_sequence_logprobs, linear_token_logprobs
from pyalign.logprob import sequence_logprobs
from pyalign.ops.linear.chunks import CHUNK_BYTES, MAX_ROWS, auto_chunk_size
from pyalign.ops.linear.ops import (linear_token_logprobs_backward_op,
                                linear_token_logprobs_op)
from pyalign.reference.linear import linear_token_stats

ALL = ("entropy", "log_sum_sq_probs", "mean_logit", "is_top1")
FLOATS = ("logprobs", "entropy", "log_sum_sq_probs", "mean_logit")


def make(shape, H, V, dtype, device, *, bias=True, ignore=0.2, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(*shape, H, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5).to(dtype).to(device)
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.5).to(dtype).to(device) if bias else None
    labels = torch.randint(0, V, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore] = -100
    return hidden, weight, b, labels.to(device)


def ref_grads(hidden, weight, bias, labels, w_lp, w_ent, dtype=torch.float64, **kw):
    """Reference values and gradients through materialized logits in ``dtype``."""
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    r = linear_token_stats(leaves[0], leaves[1], labels, bias=leaves[2], dtype=dtype, **kw)
    loss = (r["logprobs"] * w_lp.to(dtype)).sum() + (r["entropy"] * w_ent.to(dtype)).sum()
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    return r, list(grads) + ([None] if bias is None else [])


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check_against_reference(hidden, weight, bias, labels, *, chunk_size=None, needs=(True, True, True), **kw):
    """Compares values and the gradients of the inputs in ``needs`` (hidden, weight, bias) with the
    fp64 reference; low precision gets twice the error that the eager (materialized, same dtype)
    computation makes, plus a small floor."""
    leaves = [t.clone().requires_grad_(n) if t is not None else None for t, n in zip((hidden, weight, bias), needs)]
    if not any(t is not None and t.requires_grad for t in leaves):
        leaves[0].requires_grad_()
    got = linear_token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], outputs=ALL,
                                chunk_size=chunk_size, **kw)
    g = torch.Generator().manual_seed(1)
    w_lp = torch.randn(got.logprobs.shape, generator=g).to(hidden.device)
    w_ent = torch.randn(got.logprobs.shape, generator=g).to(hidden.device)
    ref, rgrads = ref_grads(hidden, weight, bias, labels, w_lp, w_ent, **kw)
    loss = (got.logprobs * w_lp).sum() + (got.entropy * w_ent).sum()
    present = [t for t in leaves if t is not None and t.requires_grad]
    it = iter(torch.autograd.grad(loss, present))
    ggrads = [next(it) if (t is not None and t.requires_grad) else None for t in leaves]
    if hidden.dtype in (torch.float64, torch.float32):
        tol = {torch.float64: 1e-9, torch.float32: 1e-4}[hidden.dtype]
        for name in FLOATS:
            assert max_err(getattr(got, name), ref[name]) <= tol * (1 + ref[name].abs().max().item()), name
        for gg, rg in zip(ggrads, rgrads):
            if rg is not None and gg is not None:
                assert max_err(gg, rg) <= tol * (1 + rg.abs().max().item())
    else:
        eager, egrads = ref_grads(hidden, weight, bias, labels, w_lp, w_ent, dtype=hidden.dtype, **kw)
        for name in FLOATS:
            e_err = max_err(eager[name], ref[name])
            assert max_err(getattr(got, name), ref[name]) <= 2 * e_err + 0.02 * (1 + ref[name].abs().max().item()), name
        for gg, eg, rg in zip(ggrads, egrads, rgrads):
            if rg is not None and gg is not None:
                e_err = max_err(eg, rg)
                assert max_err(gg, rg) <= 2 * e_err + 0.02 * (1 + rg.abs().max().item())
    # is_top1 can only differ where the label's logit ties the max within rounding.
    z_ok = got.is_top1 == ref["is_top1"]
    assert z_ok.float().mean().item() >= (1.0 if hidden.dtype == torch.float64 else 0.9)


@settings(max_examples=25)
@given(B=st.integers(1, 3), T=st.integers(1, 9), H=st.sampled_from([1, 3, 16, 33]),
       V=st.sampled_from([1, 2, 3, 17, 127, 1000]), bias=st.booleans(), chunk=st.sampled_from([None, 1, 4, 7]),
       dtype=st.sampled_from([torch.float64, torch.float32]), ignore=st.sampled_from([0.0, 0.3, 1.0]),
       opts=st.sampled_from([{}, {"temperature": 0.6}, {"softcap": 3.0, "logit_scale": 1.7},
                             {"shift": True}, {"logit_scale": 0.3, "temperature": 2.0}]))
def test_matches_reference_hypothesis(B, T, H, V, bias, chunk, dtype, ignore, opts):
    if opts.get("shift") and T < 2:
        T = 2
    hidden, weight, b, labels = make((B, T), H, V, dtype, "cpu", bias=bias, ignore=ignore, seed=B * 31 + T)
    check_against_reference(hidden, weight, b, labels, chunk_size=chunk, **opts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_dtypes(device, dtype, bias):
    hidden, weight, b, labels = make((3, 11), 32, 301, dtype, device, bias=bias)
    check_against_reference(hidden, weight, b, labels, chunk_size=8, softcap=20.0, temperature=0.9)


@pytest.mark.parametrize("needs", list(itertools.product([False, True], repeat=3)))
def test_requires_grad_subsets(device, needs):
    hidden, weight, b, labels = make((2, 5), 8, 13, torch.float64, device)
    leaves = [t.clone().requires_grad_(n) for t, n in zip((hidden, weight, b), needs)]
    lp, ent = linear_token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], return_entropy=True, chunk_size=3)
    assert lp.requires_grad == any(needs)
    if not any(needs):
        return
    (lp.sum() + 0.5 * ent.sum()).backward()
    r, rgrads = ref_grads(hidden, weight, b, labels, torch.ones(lp.shape), 0.5 * torch.ones(lp.shape))
    for leaf, need, rg in zip(leaves, needs, rgrads):
        if need:
            assert max_err(leaf.grad, rg) < 1e-9
        else:
            assert leaf.grad is None


def test_gradcheck_fp64():
    hidden, weight, b, labels = make((2, 5), 6, 9, torch.float64, "cpu", ignore=0.3)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]

    def fn(h, w, bb):
        lp, ent = linear_token_logprobs(h, w, labels, bias=bb, return_entropy=True, chunk_size=3, softcap=2.5,
                                        temperature=0.8, shift=True)
        return lp, ent
    assert torch.autograd.gradcheck(fn, leaves)


def test_ignored_rows_skip_the_matmul():
    """NaN in the hidden state of an ignored token must not reach any result or gradient: those
    rows are dropped before the GEMM."""
    hidden, weight, b, labels = make((4, 6), 8, 21, torch.float32, "cpu", ignore=0.0)
    labels[1, 2] = labels[3, :] = -100
    hidden[labels == -100] = float("nan")
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    lp, ent = linear_token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], return_entropy=True, chunk_size=5)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    assert (lp[labels == -100] == 0).all() and (ent[labels == -100] == 0).all()
    (lp.sum() + ent.sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)
    assert (leaves[0].grad[labels == -100] == 0).all()


def test_all_ignored_gives_zeros():
    hidden, weight, b, labels = make((2, 3), 4, 5, torch.float32, "cpu", ignore=1.0)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    lp = linear_token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2])
    assert torch.equal(lp, torch.zeros_like(lp))
    lp.sum().backward()
    assert all(torch.equal(t.grad, torch.zeros_like(t)) for t in leaves)


def test_extreme_logits_stay_finite():
    hidden, weight, b, labels = make((2, 7), 4, 50, torch.float32, "cpu", scale=3e3)
    check_against_reference(hidden, weight, b, labels, chunk_size=4)
    lp, ent = linear_token_logprobs(hidden, weight, labels, bias=b, return_entropy=True)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()


def test_chunk_size_does_not_change_results():
    hidden, weight, b, labels = make((3, 10), 16, 40, torch.float64, "cpu")
    outs = [linear_token_logprobs(hidden, weight, labels, bias=b, outputs=ALL, chunk_size=c) for c in (1, 7, 30, None)]
    for o in outs[1:]:
        for name in FLOATS:
            assert max_err(getattr(o, name), getattr(outs[0], name)) < 1e-12
        assert torch.equal(o.is_top1, outs[0].is_top1)


def test_auto_chunk_size_bound():
    for V, dt in [(32000, torch.float32), (128256, torch.bfloat16), (7, torch.float16)]:
        for dev in ("cpu", "cuda"):
            c = auto_chunk_size(1 << 20, V, dt, dev)
            assert c >= 16
            assert c * V * torch.empty((), dtype=dt).element_size() <= max(CHUNK_BYTES[dev], 16 * V * 4)
    assert auto_chunk_size(5, 32000, torch.float32, "cpu") == 5


def test_sequence_logprobs_matches_unfused(device):
    hidden, weight, b, labels = make((3, 8), 8, 30, torch.float64, device, ignore=0.3)
    labels[1] = -100
    for reduction in ("sum", "mean"):
        for shift in (False, True):
            got = linear_sequence_logprobs(hidden, weight, labels, bias=b, reduction=reduction, shift=shift,
                                           temperature=1.5)
            want = sequence_logprobs(hidden @ weight.t() + b, labels, reduction=reduction, shift=shift,
                                     temperature=1.5)
            assert max_err(got[0], want[0]) < 1e-10 and torch.equal(got[1], want[1])
    assert got[0][1].item() == 0.0


def test_reexported_from_logprob():
    assert pyalign.logprob.linear_token_logprobs is linear_token_logprobs
    assert pyalign.logprob.linear_sequence_logprobs is linear_sequence_logprobs


def test_opcheck():
    hidden, weight, b, labels = make((7,), 5, 11, torch.float32, "cpu", ignore=0.3)
    h, w, bb = (t.clone().requires_grad_() for t in (hidden, weight, b))
    torch.library.opcheck(linear_token_logprobs_op.op, (h, w, bb, labels, -100, 1.0, 1.0, 0.0, 15, 3))
    torch.library.opcheck(linear_token_logprobs_op.op, (h, w, None, labels, -100, 0.5, 1.0, 2.0, 1, 4))
    lp, lse, ent, *_ = linear_token_logprobs_op(hidden, weight, b, labels, -100, 1.0, 1.0, 0.0, 1, 3)
    torch.library.opcheck(linear_token_logprobs_backward_op.op,
                          (torch.ones(7), torch.ones(7), hidden, weight, b, labels, lse, ent, -100, 1.0, 1.0, 0.0,
                           3, 7))


def test_torch_compile_fullgraph():
    hidden, weight, b, labels = make((2, 6), 8, 19, torch.float32, "cpu")

    def loss_fn(h, w, bb):
        lp, ent = linear_token_logprobs(h, w, labels, bias=bb, return_entropy=True, chunk_size=4, shift=True)
        return -(lp.sum() - 0.1 * ent.sum())

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    leaves_a = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    leaves_b = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    la, lb = loss_fn(*leaves_a), compiled(*leaves_b)
    la.backward()
    lb.backward()
    assert max_err(la, lb) < 1e-5
    for x, y in zip(leaves_a, leaves_b):
        assert max_err(x.grad, y.grad) < 1e-5


def test_bad_inputs():
    hidden, weight, b, labels = make((2, 4), 8, 10, torch.float32, "cpu", ignore=0.0)
    with pytest.raises(ValueError, match="weight: expected shape"):
        linear_token_logprobs(hidden, torch.randn(10, 7), labels)
    with pytest.raises(ValueError, match="labels: expected shape"):
        linear_token_logprobs(hidden, weight, labels[:, :3])
    with pytest.raises(TypeError, match="weight: expected dtype"):
        linear_token_logprobs(hidden, weight.double(), labels)
    with pytest.raises(ValueError, match="bias: expected shape"):
        linear_token_logprobs(hidden, weight, labels, bias=torch.randn(9))
    with pytest.raises(TypeError, match="labels"):
        linear_token_logprobs(hidden, weight, labels.float())
    with pytest.raises(ValueError, match="chunk_size"):
        linear_token_logprobs(hidden, weight, labels, chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        linear_token_logprobs(hidden, weight, labels, temperature=0.0)
    with pytest.raises(ValueError, match="outputs"):
        linear_token_logprobs(hidden, weight, labels, outputs=("nope",))
    with pytest.raises(ValueError, match="shift"):
        linear_token_logprobs(hidden[0, 0], weight, labels[0, 0], shift=True)
    bad = labels.clone()
    bad[1, 2] = 10
    with pytest.raises(ValueError, match="labels: value 10"):
        linear_token_logprobs(hidden, weight, bad)


# ---- cross-entropy head, differentiable lse/mean_logit, mixed dtypes, memory, chunking ----

import torch.nn.functional as F  # noqa: E402

from pyalign.logprob import linear_cross_entropy  # noqa: E402
from pyalign.ops.linear.gemm import accumulate_dw  # noqa: E402

CE_OPTIONS = [dict(reduction=r, label_smoothing=e, z_loss_scale=z, weighted=w)
              for r in ("mean", "sum", "none") for e in (0.0, 0.25) for z in (0.0, 1e-2) for w in (False, True)]


def ref_cross_entropy(logits, labels, *, reduction, label_smoothing, z_loss_scale, class_weights,
                      temperature=1.0, logit_scale=1.0, softcap=None, ignore_index=-100):
    """F.cross_entropy on materialized transformed logits plus the z-loss (the oracle)."""
    z = logits * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    zf, lf = z.reshape(-1, z.shape[-1]), labels.reshape(-1)
    loss = F.cross_entropy(zf, lf, weight=class_weights, reduction=reduction, ignore_index=ignore_index,
                           label_smoothing=label_smoothing)
    valid = lf != ignore_index
    zl = z_loss_scale * torch.logsumexp(zf.to(torch.float32 if z.dtype != torch.float64 else z.dtype), -1) ** 2 * valid
    if reduction == "mean":
        zl = zl.sum() / valid.sum()
    elif reduction == "sum":
        zl = zl.sum()
    else:
        loss, zl = loss.view(labels.shape), zl.view(labels.shape)
    return loss + zl, zl


def _ce_case(dtype, opts, seed=0, shape=(3, 7), H=16, V=37, ignore=0.25):
    hidden, weight, b, labels = make(shape, H, V, dtype, "cpu", ignore=ignore, seed=seed)
    g = torch.Generator().manual_seed(seed + 5)
    cw = (torch.rand(V, generator=g, dtype=torch.float64) + 0.5) if opts["weighted"] else None
    kw = {k: v for k, v in opts.items() if k != "weighted"}
    return hidden, weight, b, labels, cw, kw


def _ce_grads(fn, leaves, upstream):
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves, upstream(out))


@pytest.mark.parametrize("opts", CE_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tf", [{}, {"softcap": 4.0, "temperature": 0.7, "logit_scale": 1.3}])
def test_cross_entropy_matches_torch(dtype, opts, tf):
    hidden, weight, b, labels, cw, kw = _ce_case(dtype, opts)
    up_gen = lambda out: torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).view(out.shape)
    ours = lambda h, w, bb: linear_cross_entropy(h, w, labels, bias=bb, class_weights=cw, chunk_size=5, **kw, **tf)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    got, ggrads = _ce_grads(ours, leaves, up_gen)
    ref_leaves = [t.detach().double().requires_grad_() for t in (hidden, weight, b)]
    theirs = lambda h, w, bb: ref_cross_entropy(h @ w.t() + bb, labels, class_weights=cw, **kw, **tf)[0]
    want, rgrads = _ce_grads(theirs, ref_leaves, up_gen)
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
def test_cross_entropy_low_precision(dtype, opts):
    """Within twice the error of eager F.cross_entropy in the same dtype (plus a small floor)."""
    hidden, weight, b, labels, cw, kw = _ce_case(dtype, opts, shape=(4, 9), H=32, V=301, seed=3)
    up_gen = lambda out: torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).view(out.shape).to(out.dtype)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    got, ggrads = _ce_grads(lambda h, w, bb: linear_cross_entropy(h, w, labels, bias=bb, class_weights=cw,
                                                                  chunk_size=8, **kw), leaves, up_gen)
    ref_leaves = [t.detach().double().requires_grad_() for t in (hidden, weight, b)]
    want, rgrads = _ce_grads(lambda h, w, bb: ref_cross_entropy(h @ w.t() + bb, labels, class_weights=cw, **kw)[0],
                             ref_leaves, up_gen)
    eager_leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    cw_e = None if cw is None else cw.to(dtype)
    eager, egrads = _ce_grads(lambda h, w, bb: ref_cross_entropy(h @ w.t() + bb, labels, class_weights=cw_e, **kw)[0],
                              eager_leaves, up_gen)
    assert max_err(got, want) <= 2 * max_err(eager, want) + 0.02 * (1 + want.abs().max().item())
    for gg, eg, rg in zip(ggrads, egrads, rgrads):
        assert max_err(gg, rg) <= 2 * max_err(eg, rg) + 0.02 * (1 + rg.abs().max().item())


def test_cross_entropy_shift_and_return_z_loss():
    hidden, weight, b, labels = make((2, 6), 8, 19, torch.float64, "cpu", ignore=0.2)
    loss, zl = linear_cross_entropy(hidden, weight, labels, bias=b, shift=True, z_loss_scale=0.1,
                                    label_smoothing=0.1, return_z_loss=True, chunk_size=3)
    want, wz = ref_cross_entropy((hidden @ weight.t() + b)[:, :-1], labels[:, 1:], reduction="mean",
                                 label_smoothing=0.1, z_loss_scale=0.1, class_weights=None)
    assert max_err(loss, want) < 1e-12 and max_err(zl, wz) < 1e-12 and zl.item() > 0
    # no kept token: "mean" is NaN exactly like F.cross_entropy, "sum" is 0
    none = torch.full_like(labels, -100)
    assert torch.isnan(linear_cross_entropy(hidden, weight, none)).item()
    assert torch.isnan(F.cross_entropy((hidden @ weight.t()).reshape(-1, 19), none.reshape(-1))).item()
    assert linear_cross_entropy(hidden, weight, none, reduction="sum").item() == 0.0


def test_cross_entropy_gradcheck_fp64():
    hidden, weight, b, labels = make((2, 4), 5, 7, torch.float64, "cpu", ignore=0.25)
    cw = torch.rand(7, dtype=torch.float64) + 0.5
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
def test_cross_entropy_bad_inputs(kwargs, exc, match):
    hidden, weight, b, labels = make((2, 4), 8, 10, torch.float32, "cpu", ignore=0.0)
    with pytest.raises(exc, match=match):
        linear_cross_entropy(hidden, weight, labels, **kwargs)
    if "chunk_size" not in kwargs:
        with pytest.raises(exc, match=match):
            pyalign.cross_entropy(hidden @ weight.t(), labels, **kwargs)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_lse_and_mean_logit_are_differentiable(softcap):
    hidden, weight, b, labels = make((3, 5), 8, 23, torch.float64, "cpu", ignore=0.3)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    out = linear_token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], outputs=("lse", "mean_logit", "entropy"),
                                chunk_size=4, softcap=softcap, temperature=0.9)
    ref = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    z = ref[0] @ ref[1].t() + ref[2]
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / 0.9
    valid = labels != -100
    lse, mean = torch.logsumexp(z, -1) * valid, z.mean(-1) * valid
    assert max_err(out.lse, lse) < 1e-12 and max_err(out.mean_logit, mean) < 1e-12
    for f_out, f_ref in ((lambda o: (o.lse ** 2).sum() - 0.7 * o.mean_logit.sum(), lambda: (lse ** 2).sum() - 0.7 * mean.sum()),
                         (lambda o: o.lse.sum() + o.entropy.sum(), None)):
        got = torch.autograd.grad(f_out(out), leaves, retain_graph=True)
        if f_ref is not None:
            want = torch.autograd.grad(f_ref(), ref, retain_graph=True)
            for a, c in zip(got, want):
                assert max_err(a, c) < 1e-10

    def lse_and_mean(h, w, bb):
        o = linear_token_logprobs(h, w, labels, bias=bb, outputs=("lse", "mean_logit"), chunk_size=4, softcap=softcap)
        return o.lse, o.mean_logit
    assert torch.autograd.gradcheck(lse_and_mean, leaves)


def test_mixed_dtypes_promote():
    hidden, weight, b, labels = make((2, 6), 16, 40, torch.float32, "cpu", ignore=0.2)
    h16 = hidden.to(torch.bfloat16)
    for w, bb in ((weight, b), (weight, b.to(torch.bfloat16)), (weight.to(torch.float16), None)):
        leaves = [h16.clone().requires_grad_(), w.clone().requires_grad_()] + ([bb.clone().requires_grad_()] if bb is not None else [])
        got = linear_cross_entropy(leaves[0], leaves[1], labels, bias=leaves[2] if bb is not None else None,
                                   label_smoothing=0.1, chunk_size=4)
        got.backward()
        # the documented rule: promote to fp32 (bf16 with fp16 -> fp32 too)
        ref = [t.detach().float().requires_grad_() for t in leaves]
        want = linear_cross_entropy(ref[0], ref[1], labels, bias=ref[2] if bb is not None else None,
                                    label_smoothing=0.1, chunk_size=4)
        want.backward()
        assert max_err(got, want) < 1e-6
        for leaf, r in zip(leaves, ref):
            assert leaf.grad.dtype == leaf.dtype
            assert max_err(leaf.grad, r.grad.to(leaf.dtype)) <= 1e-6 + 1e-2 * r.grad.abs().max().item()
    with pytest.raises(TypeError, match="weight: expected dtype"):
        linear_token_logprobs(hidden.double(), weight, labels)


def test_autocast_follows_autocast_dtype():
    hidden, weight, b, labels = make((2, 6), 16, 40, torch.float32, "cpu", ignore=0.2)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], chunk_size=4)
        eager = F.linear(hidden, weight, b)
    assert eager.dtype == torch.bfloat16
    want = linear_token_logprobs(*(t.to(torch.bfloat16) for t in (hidden, weight)), labels,
                                 bias=b.to(torch.bfloat16), chunk_size=4)
    assert torch.equal(got, want)  # the GEMMs ran in bf16, exactly as with bf16 inputs
    got.sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in leaves)
    full = linear_token_logprobs(hidden, weight, labels, bias=b, chunk_size=4)
    assert not torch.equal(got, full)  # outside autocast: fp32


def test_accumulate_dw_is_fp32_exact():
    """The low-precision chunk product is accumulated in fp32 without rounding to bf16."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(37, 300, generator=g).to(torch.bfloat16)
    h = torch.randn(37, 24, generator=g).to(torch.bfloat16)
    acc = torch.zeros(300, 24)
    accumulate_dw(acc, a, h)
    exact = a.double().t() @ h.double()
    assert max_err(acc, exact) < 1e-5
    assert max_err(acc, (a.t() @ h).float()) > 1e-4  # what rounding to bf16 would have given


def test_peak_memory_within_documented_bound(force_path):
    """bf16 head, gradients for hidden and weight, memory from torch's allocator events
    (pyalign.bench.memory: deterministic). The automatic (vocab-blocked) path's temporaries stay
    within the documented bound: the logits block (<= chunk*V*2) + the fp32 dhidden accumulator
    (n*H*4) + O(n*H) + the GEMMs' own packing scratch (< 2 MiB here), far below the V*H*4 of an
    fp32 [V, H] accumulator, which the token-outer path holds and must show."""
    n, H, V, chunk = 256, 512, 32000, 64
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, H, generator=g).to(torch.bfloat16)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(torch.bfloat16)
    labels = torch.randint(0, V, (n,), generator=g)

    def run():
        h, w = hidden.clone().requires_grad_(), weight.requires_grad_()
        lp = linear_token_logprobs(h, w, labels, chunk_size=chunk)
        return torch.autograd.grad(lp.sum(), (h, w))
    use = {}
    for path in (None, "token"):
        force_path(path)
        use[path] = measure(run)[1]
    force_path(None)
    mib = 2 ** 20
    results = V * H * 2 + n * H * 2  # the gradients returned: dW and dh (bf16)
    assert use[None].retained == use["token"].retained == results, use
    bound = chunk * V * 2 + n * H * 4 + 4 * n * H * 4 + 2 * mib
    acc = V * H * 4  # 62.5 MiB
    assert use[None].transient <= bound, (use, bound)
    assert acc <= use["token"].transient <= acc + bound, (use, acc)


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


@settings(max_examples=30)
@given(B=st.integers(1, 3), T=st.integers(1, 7), H=st.sampled_from([1, 3, 16, 33]),
       V=st.sampled_from([1, 3, 17, 127, 500]), bias=st.booleans(), chunk=st.sampled_from([None, 1, 4, 7]),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]),
       needs=st.tuples(st.booleans(), st.booleans(), st.booleans()).filter(any),
       ignore=st.sampled_from([0.0, 0.3, 1.0]),
       opts=st.sampled_from([{}, {"temperature": 0.6}, {"softcap": 3.0, "logit_scale": 1.7}, {"shift": True}]))
def test_matches_reference_hypothesis_all_dtypes_and_grad_subsets(B, T, H, V, bias, chunk, dtype, needs, ignore, opts):
    if opts.get("shift") and T < 2:
        T = 2
    hidden, weight, b, labels = make((B, T), H, V, dtype, "cpu", bias=bias, ignore=ignore, seed=B * 17 + T + V)
    check_against_reference(hidden, weight, b, labels, chunk_size=chunk, needs=needs, **opts)


# ---- the vocab-blocked backward (vocabulary blocks outermost, token chunks inside) ----------------

import contextlib  # noqa: E402

import pyalign.ops.linear.chunks as chunks  # noqa: E402
import pyalign.ops.linear.gemm as gemm  # noqa: E402
from pyalign._ext import kernels, desc  # noqa: E402

LOW_TOL = {torch.bfloat16: 2 ** -6, torch.float16: 2 ** -9}  # block-by-block rounding (relative to max)
# forced (token chunk, vocab block) sizes: several chunks and blocks with remainders; one block
BLOCKS = [(5, 7), (4, 64), (1000, 3), None]


@pytest.fixture
def force_path():
    """``set_(path, blocks)``: the backward loop order and vocab-blocked sizes (pyalign.overrides)
    for the rest of the test."""
    stack = contextlib.ExitStack()

    def set_(path, blocks=None):
        stack.close()
        stack.enter_context(pyalign.overrides(backward_order=path, vocab_blocks=blocks))
    yield set_
    stack.close()


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
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    outs = _ref_all(*leaves[:2], leaves[2], labels, dtype=dtype, **kw)
    present = [t for t in leaves if t is not None]
    it = iter(torch.autograd.grad(_all_outputs_loss(outs, coeffs), present))
    grads = [next(it) if t is not None else None for t in leaves]
    return [t.detach() for t in outs], [g if n else None for g, n in zip(grads, needs)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("opts", [{}, {"shift": True}, {"softcap": 3.0, "logit_scale": 1.7, "temperature": 0.8}],
                         ids=["plain", "shift", "transform"])
def test_vocab_blocked_matches_reference_and_token_outer(force_path, dtype, bias, opts):
    """Each forced loop order (and several block shapes) against the materialized fp64 reference,
    through log-probs, entropy, lse and mean_logit, for subsets of inputs requiring grad, with
    ignored tokens; and the two loop orders against each other within rounding."""
    hidden, weight, b, labels = make((3, 7), 16, 53, dtype, "cpu", bias=bias, ignore=0.25, seed=7)
    g = torch.Generator().manual_seed(2)
    n_out = labels[..., 1:].shape if opts.get("shift") else labels.shape
    coeffs = [torch.randn(n_out, generator=g) for _ in range(4)]
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
def test_backward_paths_requires_grad_subsets(force_path, path, needs):
    hidden, weight, b, labels = make((2, 5), 8, 13, torch.float64, "cpu", ignore=0.3)
    force_path(path, (3, 4) if path == "vocab" else None)
    leaves = [t.clone().requires_grad_(n) for t, n in zip((hidden, weight, b), needs)]
    lp, ent = linear_token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], return_entropy=True)
    (lp.sum() + 0.5 * ent.sum()).backward()
    _, rgrads = ref_grads(hidden, weight, b, labels, torch.ones(lp.shape), 0.5 * torch.ones(lp.shape))
    for leaf, need, rg in zip(leaves, needs, rgrads):
        assert (leaf.grad is None) == (not need)
        if need:
            assert max_err(leaf.grad, rg) < 1e-9


def test_vocab_blocked_all_ignored_and_gradcheck(force_path):
    force_path("vocab", (3, 4))
    hidden, weight, b, labels = make((2, 4), 5, 11, torch.float64, "cpu", ignore=0.25)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    cw = torch.rand(11, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(
        lambda h, w, bb: linear_cross_entropy(h, w, labels, bias=bb, label_smoothing=0.2, z_loss_scale=0.05,
                                              class_weights=cw, softcap=2.5, reduction="none"), leaves)
    none = torch.full_like(labels, -100)
    lp = linear_token_logprobs(leaves[0], leaves[1], none, bias=leaves[2])
    grads = torch.autograd.grad(lp.sum(), leaves)
    assert all(torch.equal(gr, torch.zeros_like(gr)) for gr in grads)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_vocab_blocked_cross_entropy(force_path, dtype, reduction):
    """linear_cross_entropy with label smoothing, class weights and z-loss: both loop orders against
    F.cross_entropy on materialized logits (fp64), and against each other."""
    opts = dict(reduction=reduction, label_smoothing=0.2, z_loss_scale=0.01, weighted=True)
    hidden, weight, b, labels, cw, kw = _ce_case(dtype, opts, shape=(4, 9), H=16, V=61, seed=4)
    tf = {"softcap": 4.0, "temperature": 0.7}
    up = lambda out: torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).view(out.shape).to(out.dtype)
    ref_leaves = [t.detach().double().requires_grad_() for t in (hidden, weight, b)]
    want, rgrads = _ce_grads(lambda h, w, bb: ref_cross_entropy(h @ w.t() + bb, labels, class_weights=cw, **kw, **tf)[0],
                             ref_leaves, up)
    results = {}
    for path, blocks in (("token", None), ("vocab", (5, 7)), ("vocab", (100, 16)), ("vocab", None)):
        force_path(path, blocks)
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
        results[(path, blocks)] = _ce_grads(
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


def test_backward_path_choice():
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


def test_slice_kernel_grad_mean_with_global_vocab():
    """The slice backward with grad_mean, the whole vocabulary's size and the slice's class weights
    gives, slice by slice, the full-vocabulary gradient."""
    g = torch.Generator().manual_seed(0)
    n, V = 6, 10
    logits = torch.randn(n, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (n,), generator=g)
    mw = torch.rand(V, generator=g, dtype=torch.float64) + 0.5
    lse, ent = torch.logsumexp(logits, -1), torch.zeros(n, dtype=torch.float64)
    gr = [torch.randn(n, generator=g, dtype=torch.float64) for _ in range(3)]  # logp, lse, mean
    full = torch.empty_like(logits)
    tf = (1.0, 1.0, 0.0)
    kernels.logprob_backward(desc(logits, "logits"), desc(labels, "labels"), desc(lse, "lse"), None,
                        desc(gr[0], "grad_logp"), None, desc(full, "grad_logits"), *tf, -100, 0,
                        desc(gr[1], "grad_lse"), desc(gr[2], "grad_mean"), desc(mw, "mean_weights"))
    parts = []
    for v0, v1 in ((0, 4), (4, 10)):
        local = torch.where((labels >= v0) & (labels < v1), labels - v0, -1)
        out = torch.empty(n, v1 - v0, dtype=torch.float64)
        kernels.logprob_backward_slice(desc(logits[:, v0:v1], "logits"), desc(local, "labels"), desc(lse, "lse"), None,
                                  desc(gr[0], "grad_logp"), None, desc(out, "grad_logits"), *tf, -(1 << 62), 0,
                                  desc(gr[1], "grad_lse"), desc(gr[2], "grad_mean"), desc(mw[v0:v1].contiguous(), "mean_weights"),
                                  mean_vocab=V)
        parts.append(out)
    assert max_err(torch.cat(parts, 1), full) < 1e-14
    out = torch.empty(n, 4, dtype=torch.float64)
    with pytest.raises(Exception, match="mean_vocab"):  # the slice's own V is not the vocabulary size
        kernels.logprob_backward_slice(desc(logits[:, :4], "logits"), desc(labels, "labels"), desc(lse, "lse"), None,
                                  None, None, desc(out, "grad_logits"), *tf, -100, 0, None, desc(gr[2], "grad_mean"),
                                  None, mean_vocab=2)
    with pytest.raises(Exception, match="mean_vocab"):
        kernels.logprob_backward(desc(logits, "logits"), desc(labels, "labels"), desc(lse, "lse"), None, None, None,
                            desc(full, "grad_logits"), *tf, -100, 0, None, desc(gr[2], "grad_mean"), None, mean_vocab=7)
    with pytest.raises(Exception, match="mean_weights"):
        kernels.logprob_backward_slice(desc(logits[:, :4], "logits"), desc(labels, "labels"), desc(lse, "lse"), None,
                                  None, None, desc(out, "grad_logits"), *tf, -100, 0, None, desc(gr[2], "grad_mean"),
                                  desc(mw, "mean_weights"), mean_vocab=V)


# ---- reduced cross-entropy: the gradient formed in the forward (3 GEMMs), scaled in the backward --

from pyalign.ops.linear.ops import (linear_cross_entropy_fwd_grad_backward_op,  # noqa: E402
                                linear_cross_entropy_fwd_grad_op)


@pytest.fixture
def recompute_path():
    """``set_(True)`` forces the recompute path (pyalign.overrides(forward_gradients=False)) for the
    rest of the test."""
    stack = contextlib.ExitStack()

    def set_(on):
        stack.close()
        if on:
            stack.enter_context(pyalign.overrides(forward_gradients=False))
    yield set_
    stack.close()


class GemmCounter:
    """Counts the GEMM calls (torch.mm, torch.addmm, Tensor.addmm_, and oneDNN's linear, which the
    CPU fp32 path uses) made while active."""

    def __init__(self, monkeypatch):
        self.n = 0
        for owner, name in ((torch, "mm"), (torch, "addmm"), (torch.Tensor, "addmm_"),
                            (torch.ops.mkldnn, "_linear_pointwise")):
            orig = getattr(owner, name)

            def counted(*a, _orig=orig, **k):
                self.n += 1
                return _orig(*a, **k)
            monkeypatch.setattr(owner, name, counted)


def _lce_run(hidden, weight, b, labels, needs, upstream=(1.0, None), **kw):
    """Loss (and z-loss), and the gradients of the leaves in ``needs`` for ``g_loss * loss (+ g_z *
    z_loss)``; absent gradients are None."""
    leaves = [None if t is None else t.clone().requires_grad_(bool(nd)) for t, nd in zip((hidden, weight, b), needs)]
    out = linear_cross_entropy(leaves[0], leaves[1], labels, bias=leaves[2], **kw)
    loss, zl = out if isinstance(out, tuple) else (out, None)
    total = loss * upstream[0] + (0 if upstream[1] is None else zl * upstream[1])
    present = [t for t in leaves if t is not None and t.requires_grad]
    it = iter(torch.autograd.grad(total, present))
    grads = [next(it) if (t is not None and t.requires_grad) else None for t in leaves]
    return loss.detach(), None if zl is None else zl.detach(), grads


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
def test_forward_grad_matches_torch_and_recompute(recompute_path, dtype, reduction, opts, ignore, bias):
    """The forward-gradient path against F.cross_entropy (+ z-loss) on materialized fp64 logits and
    against the recompute path (loss bitwise, gradients within rounding), several token chunks."""
    hidden, weight, b, labels, cw, kw = _ce_case(dtype, dict(opts, weighted=opts.get("weighted", False)),
                                                 shape=(3, 7), H=16, V=37, ignore=ignore, seed=11)
    if not bias:
        b = None
    kw = dict(kw, reduction=reduction, class_weights=cw, chunk_size=4)
    needs = (True, True, bias)
    runs = {}
    for recompute in (False, True):
        recompute_path(recompute)
        runs[recompute] = _lce_run(hidden, weight, b, labels, needs, upstream=(1.7, None), **kw)
    recompute_path(False)
    (loss, _, grads), (rloss, _, rgrads) = runs[False], runs[True]
    assert torch.equal(loss, rloss)
    # the fp64 oracle on materialized logits
    ref = [None if t is None else t.detach().double().requires_grad_() for t in (hidden, weight, b)]
    h, lab = ref[0], labels
    if kw.get("shift"):
        h, lab = h[:, :-1], labels[:, 1:]
    logits = h @ ref[1].t() + (0 if ref[2] is None else ref[2])
    tf = {k: kw[k] for k in ("softcap", "temperature", "logit_scale") if k in kw}
    want, _ = ref_cross_entropy(logits, lab, reduction=reduction, label_smoothing=kw.get("label_smoothing", 0.0),
                                z_loss_scale=kw.get("z_loss_scale", 0.0), class_weights=cw, **tf)
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
def test_forward_grad_requires_grad_subsets(recompute_path, needs, reduction):
    hidden, weight, b, labels = make((4, 5), 12, 29, torch.float64, "cpu", ignore=0.25, seed=2)
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss_scale=0.02, chunk_size=3)
    loss, _, grads = _lce_run(hidden, weight, b, labels, needs, **kw)
    recompute_path(True)
    rloss, _, rgrads = _lce_run(hidden, weight, b, labels, needs, **kw)
    assert torch.equal(loss, rloss)
    for nd, gg, rg in zip(needs, grads, rgrads):
        assert (gg is None) == (not nd) == (rg is None)
        if nd:
            assert max_err(gg, rg) < 1e-12


def test_forward_grad_path_is_taken(monkeypatch):
    """3 GEMMs per token chunk in the forward and none in the backward (the recompute path: 1 + 3);
    ignored tokens are dropped before the GEMMs (the chunk count is that of the kept tokens)."""
    hidden, weight, b, labels = make((24,), 8, 17, torch.float32, "cpu", ignore=0.0, seed=5)
    labels[:6] = -100  # 18 kept tokens: 3 chunks of 6
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    counter = GemmCounter(monkeypatch)
    loss = linear_cross_entropy(*leaves[:2], labels, bias=leaves[2], chunk_size=6, z_loss_scale=0.1)
    assert counter.n == 9
    loss.backward()
    assert counter.n == 9
    with pyalign.overrides(forward_gradients=False):
        counter.n = 0
        fresh = [t.clone().requires_grad_() for t in (hidden, weight, b)]
        loss2 = linear_cross_entropy(*fresh[:2], labels, bias=fresh[2], chunk_size=6, z_loss_scale=0.1)
        assert counter.n == 3
        loss2.backward()
        assert counter.n == 12
    # no gradient wanted (grad mode off, or no input requires grad): the plain forward, 1 GEMM per
    # chunk, no graph and so nothing saved
    for grad_mode, args in ((False, leaves[:2]), (True, (hidden, weight))):
        counter.n = 0
        with torch.set_grad_enabled(grad_mode):
            out = linear_cross_entropy(*args, labels, chunk_size=6)
        assert counter.n == 3 and out.grad_fn is None
    # reduction="none" keeps the recompute path
    counter.n = 0
    out = linear_cross_entropy(*leaves[:2], labels, chunk_size=6, reduction="none")
    out.sum().backward()
    assert counter.n == 12


@pytest.mark.parametrize("upstream", [(1.0, None), (0.0, 1.0), (0.7, -1.3), (-2.0, 0.0)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_forward_grad_return_z_loss(monkeypatch, upstream, reduction):
    """return_z_loss: the loss and the separate z-loss output each with its own upstream gradient,
    exactly; the z-loss output's part is recomputed only when its gradient is nonzero."""
    hidden, weight, b, labels = make((3, 6), 8, 23, torch.float64, "cpu", ignore=0.2, seed=9)
    kw = dict(reduction=reduction, label_smoothing=0.2, z_loss_scale=0.05, return_z_loss=True, chunk_size=4,
              softcap=4.0)
    counter = GemmCounter(monkeypatch)
    loss, zl, grads = _lce_run(hidden, weight, b, labels, (True, True, True), upstream=upstream, **kw)
    kept = int((labels != -100).sum())
    chunks = -(-kept // 4)
    assert counter.n == 3 * chunks + (3 * chunks if upstream[1] else 0)
    ref = [t.detach().requires_grad_() for t in (hidden, weight, b)]
    want, wz = ref_cross_entropy(ref[0] @ ref[1].t() + ref[2], labels, reduction=reduction, label_smoothing=0.2,
                                 z_loss_scale=0.05, class_weights=None, softcap=4.0)
    total = want * upstream[0] + (0 if upstream[1] is None else wz * upstream[1])
    wgrads = torch.autograd.grad(total, ref)
    assert max_err(loss, want) < 1e-12 and max_err(zl, wz) < 1e-12
    for gg, wg in zip(grads, wgrads):
        assert max_err(gg, wg) < 1e-10 * (1 + wg.abs().max().item())


def test_forward_grad_gradcheck_fp64():
    hidden, weight, b, labels = make((2, 4), 5, 7, torch.float64, "cpu", ignore=0.25, seed=3)
    cw = torch.rand(7, dtype=torch.float64) + 0.5
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


def test_forward_grad_all_ignored_and_determinism():
    hidden, weight, b, labels = make((2, 5), 8, 13, torch.float32, "cpu", ignore=0.3, seed=4)
    none = torch.full_like(labels, -100)
    for red, expect_nan in (("mean", True), ("sum", False)):
        _, _, grads = _lce_run(hidden, weight, b, none, (True, True, True), reduction=red, z_loss_scale=0.1)
        loss = linear_cross_entropy(hidden.clone().requires_grad_(), weight, none, reduction=red)
        assert bool(torch.isnan(loss)) == expect_nan
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    kw = dict(label_smoothing=0.1, z_loss_scale=0.01, chunk_size=3)
    a = _lce_run(hidden, weight, b, labels, (True, True, True), **kw)
    c = _lce_run(hidden, weight, b, labels, (True, True, True), **kw)
    assert torch.equal(a[0], c[0]) and all(torch.equal(x, y) for x, y in zip(a[2], c[2]))


@pytest.mark.parametrize("chunk", [4, 1000])
def test_forward_grad_low_precision_dw(recompute_path, chunk):
    """bf16/fp16 weights: one chunk writes dW with one GEMM, several chunks accumulate it in fp32
    (no bf16 accumulation across chunks): within block rounding of the recompute path."""
    for dtype in (torch.bfloat16, torch.float16):
        hidden, weight, b, labels = make((4, 9), 32, 301, dtype, "cpu", ignore=0.2, seed=6)
        kw = dict(label_smoothing=0.1, z_loss_scale=0.01, chunk_size=chunk)
        loss, _, grads = _lce_run(hidden, weight, b, labels, (True, True, True), **kw)
        recompute_path(True)
        rloss, _, rgrads = _lce_run(hidden, weight, b, labels, (True, True, True), **kw)
        recompute_path(False)
        assert torch.equal(loss, rloss)
        for gg, rg in zip(grads, rgrads):
            assert gg.dtype == dtype
            assert max_err(gg, rg) <= LOW_TOL[dtype] * (1 + rg.abs().max().item())


def test_forward_grad_opcheck():
    hidden, weight, b, labels = make((9,), 5, 11, torch.float32, "cpu", ignore=0.3, seed=7)
    cw = torch.rand(11) + 0.5
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
    torch.library.opcheck(linear_cross_entropy_fwd_grad_backward_op.op,
                          (torch.tensor(0.5), torch.tensor(1.5), dh, dw, db, hidden, weight, b, labels, lse, -100,
                           1.0, 1.0, 0.0, 4, 0.05, False, needs))
    # a forward told not to form a gradient that autograd then wants: a clear error naming it
    h = hidden.clone().requires_grad_()
    out = linear_cross_entropy_fwd_grad_op(h, weight, None, labels, -100, 1.0, 1.0, 0.0, 4, 0.0, 0.0, None, False,
                                           N.NEED_WEIGHT, False)
    with pytest.raises(RuntimeError, match="hidden requires grad"):
        out[0].backward()


@pytest.mark.parametrize("needs", [(True, True, True), (False, True, False), (True, False, True)])
def test_forward_grad_torch_compile_fullgraph(needs):
    hidden, weight, b, labels = make((2, 7), 8, 19, torch.float32, "cpu", ignore=0.2, seed=8)

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


def test_forward_grad_backward_memory():
    """The backward holds the saved dW and its scaled copy, nothing more (no zero-filled [V, H]
    upstream gradient for the dW output): the peak of forward+backward (torch's allocator events)
    is below 2 dW + two logits buffers + O(n * H), where a third [V, H] would exceed it."""
    n, H, V, chunk = 256, 512, 32000, 64
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, H, generator=g).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).requires_grad_()
    labels = torch.randint(0, V, (n,), generator=g)

    def run():
        return torch.autograd.grad(linear_cross_entropy(hidden, weight, labels, chunk_size=chunk), (hidden, weight))
    use = measure(run)[1]
    dw = V * H * 4
    assert use.retained == dw + n * H * 4, use  # the two gradients returned
    bound = 2 * dw + 2 * chunk * V * 4 + 4 * n * H * 4 + 2 ** 20
    assert use.peak <= bound, (use, bound)
    assert use.peak < 3 * dw, use


# ---- CPU fp32 GEMMs through oneDNN ------------------------------------------------------------------

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def _head_run(hidden, weight, b, labels, chunk, ce=False):
    """Outputs and (hidden, weight, bias) gradients of per-token stats (or the mean cross-entropy)."""
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    if ce:
        outs = [linear_cross_entropy(*leaves[:2], labels, bias=leaves[2], chunk_size=chunk, z_loss_scale=0.01)]
        loss = outs[0]
    else:
        r = linear_token_logprobs(*leaves[:2], labels, bias=leaves[2], outputs=ALL, chunk_size=chunk)
        outs = [r.logprobs, r.entropy, r.log_sum_sq_probs, r.mean_logit, r.is_top1]
        loss = (r.logprobs * torch.linspace(-1, 1, r.logprobs.numel()).view_as(r.logprobs)).sum() + r.entropy.sum()
    return outs + list(torch.autograd.grad(loss, leaves))


@needs_onednn
@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # from mkldnn.flags()
@pytest.mark.parametrize("ce", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_gemms_match_blas(monkeypatch, ce, bias):
    """The oneDNN path (CPU fp32 default) is taken and agrees with the BLAS path (torch.mm) to
    fp32 rounding, forward and backward; with oneDNN disabled through torch.backends.mkldnn no
    oneDNN call is made and the result is the BLAS path's, bitwise."""
    hidden, weight, b, labels = make((3, 41), 24, 700, torch.float32, "cpu", bias=bias, seed=3)
    if b is None:
        b = torch.zeros(700)
    with pyalign.overrides(gemm="blas"):
        blas = _head_run(hidden, weight, b, labels, 32, ce)
    counter = GemmCounter(monkeypatch)
    calls = []
    orig = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(1) or orig(*a))
    fast = _head_run(hidden, weight, b, labels, 32, ce)
    assert len(calls) > 0 and counter.n > 0
    for x, y in zip(fast, blas):
        if x.dtype == torch.bool:
            assert (x == y).float().mean() >= 0.99
        else:
            assert max_err(x, y) <= 2e-5 * (1 + y.abs().max().item())
    calls.clear()
    with torch.backends.mkldnn.flags(enabled=False):
        off = _head_run(hidden, weight, b, labels, 32, ce)
    assert not calls
    for x, y in zip(off, blas):
        assert torch.equal(x, y)


@needs_onednn
def test_onednn_failure_falls_back_to_blas(monkeypatch):
    """Where oneDNN's linear op refuses (an old or unusual torch build), the BLAS path gives the
    result and the op is not tried again."""
    hidden, weight, b, labels = make((50,), 16, 300, torch.float32, "cpu", seed=4)
    with pyalign.overrides(gemm="blas"):
        blas = _head_run(hidden, weight, b, labels, 16)
    calls = []

    def refuse(*a):
        calls.append(1)
        raise RuntimeError("no oneDNN kernel for this input")
    monkeypatch.setattr(gemm, "_ONEDNN_WORKS", None)
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", refuse)
    got = _head_run(hidden, weight, b, labels, 16)
    assert len(calls) == 1 and gemm._ONEDNN_WORKS is False
    for x, y in zip(got, blas):
        assert torch.equal(x, y)


# ---- frozen head: the hidden gradient's basis formed in the forward -------------------------------

def _frozen_run(hidden, weight, b, labels, g, **kw):
    """Log-probs and the hidden gradient of ``sum(g * logp)`` with weight and bias frozen."""
    h = hidden.clone().requires_grad_()
    lp = linear_token_logprobs(h, weight, labels, bias=b, **kw)
    (gh,) = torch.autograd.grad((lp * g).sum(), h)
    return lp.detach(), gh


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opts", [dict(), dict(temperature=0.7, logit_scale=1.3, softcap=2.5), dict(shift=True)])
@pytest.mark.parametrize("bias", [False, True])
def test_frozen_head_basis_matches_recompute(dtype, opts, bias, device):
    """Only hidden requires grad: the basis path (hidden gradient formed in the forward) gives the
    recompute path's log-probs bitwise and its gradient within rounding, ignored tokens included;
    fp64 against the materialized reference."""
    hidden, weight, b, labels = make((3, 13), 16, 150, dtype, device, bias=bias, ignore=0.25, seed=11)
    g = torch.randn(labels[..., 1:].shape if opts.get("shift") else labels.shape,
                    generator=torch.Generator().manual_seed(2), dtype=torch.float64).float().to(device)
    if dtype == torch.float64:
        g = g.double()
    got = _frozen_run(hidden, weight, b, labels, g, chunk_size=8, **opts)
    with pyalign.overrides(forward_gradients=False):
        want = _frozen_run(hidden, weight, b, labels, g, chunk_size=8, **opts)
    assert torch.equal(got[0], want[0])
    tol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2}[dtype]
    assert max_err(got[1], want[1]) <= tol * (1 + want[1].abs().max().item())
    if dtype == torch.float64:
        ref, (rg, *_) = ref_grads(hidden, weight, b, labels, g, torch.zeros_like(g), **opts)
        assert max_err(got[0], ref["logprobs"]) < 1e-9
        assert max_err(got[1], rg) < 1e-9


def test_frozen_head_gemm_count(monkeypatch):
    """2 GEMMs per kept chunk in the forward and none in the backward (the recompute path: 1 + 2);
    a head that requires grad, grad mode off, or a requested entropy keep the ordinary op."""
    hidden, weight, b, labels = make((24,), 8, 17, torch.float32, "cpu", ignore=0.0, seed=5)
    labels[:6] = -100  # 18 kept tokens: 3 chunks of 6
    counter = GemmCounter(monkeypatch)
    h = hidden.clone().requires_grad_()
    lp = linear_token_logprobs(h, weight, labels, bias=b, chunk_size=6)
    assert counter.n == 6
    lp.sum().backward()
    assert counter.n == 6
    cases = [((h, weight.clone().requires_grad_()), {}, True, 3),  # weight requires grad
             ((h, weight), {"return_entropy": True}, True, 3),  # entropy requested
             ((h, weight), {}, False, 3)]  # grad mode off
    for (hh, ww), kw, grad_mode, n in cases:
        counter.n = 0
        with torch.set_grad_enabled(grad_mode):
            linear_token_logprobs(hh, ww, labels, chunk_size=6, **kw)
        assert counter.n == n, kw


def test_frozen_head_basis_op_other_gradients_are_exact():
    """The basis op differentiated through lse and entropy as well (reachable by calling the op
    directly): those parts go through the recompute loop, and the hidden gradient equals the
    ordinary op's; a weight that requires grad is refused in the backward."""
    from pyalign.ops.linear import linear_token_logprobs_basis_op
    from pyalign._outputs import ENTROPY
    hidden, weight, b, labels = make((40,), 12, 90, torch.float64, "cpu", ignore=0.2, seed=6)
    args = (labels, -100, 0.9, 1.0, 3.0, ENTROPY, 16)
    coef = [torch.randn(40, generator=torch.Generator().manual_seed(k), dtype=torch.float64) for k in range(3)]
    grads = []
    for op in (linear_token_logprobs_basis_op, linear_token_logprobs_op):
        h = hidden.clone().requires_grad_()
        logp, lse, ent, *_ = op(h, weight, b, *args)
        (gh,) = torch.autograd.grad((coef[0] * logp + coef[1] * lse + coef[2] * ent).sum(), h)
        grads.append(gh)
    assert max_err(grads[0], grads[1]) < 1e-12
    logp = linear_token_logprobs_basis_op(hidden, weight.clone().requires_grad_(), b, *args)[0]
    with pytest.raises(RuntimeError, match="weight requires grad"):
        logp.sum().backward()


def test_frozen_head_torch_compile_fullgraph():
    hidden, weight, b, labels = make((2, 9), 8, 19, torch.float32, "cpu", ignore=0.2, seed=9)

    def loss_fn(h):
        return -linear_token_logprobs(h, weight, labels, bias=b, chunk_size=4, shift=True).sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    ha, hb = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    la, lb = loss_fn(ha), compiled(hb)
    la.backward()
    lb.backward()
    assert max_err(la, lb) < 1e-5 and max_err(ha.grad, hb.grad) < 1e-5
