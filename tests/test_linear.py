"""Fused linear-head log-probs (pyalign.linear) against the materialized-logits reference."""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyalign
from pyalign.linear import linear_sequence_logprobs, linear_token_logprobs
from pyalign.logprob import sequence_logprobs
from pyalign.ops.linear import (CHUNK_BYTES, auto_chunk_size, linear_token_logprobs_backward_op,
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


def check_against_reference(hidden, weight, bias, labels, *, chunk_size=None, **kw):
    """Compares values and all three gradients with the fp64 reference; low precision gets twice
    the error that the eager (materialized, same dtype) computation makes, plus a small floor."""
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    got = linear_token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], outputs=ALL,
                                chunk_size=chunk_size, **kw)
    g = torch.Generator().manual_seed(1)
    w_lp = torch.randn(got.logprobs.shape, generator=g).to(hidden.device)
    w_ent = torch.randn(got.logprobs.shape, generator=g).to(hidden.device)
    ref, rgrads = ref_grads(hidden, weight, bias, labels, w_lp, w_ent, **kw)
    loss = (got.logprobs * w_lp).sum() + (got.entropy * w_ent).sum()
    present = [t for t in leaves if t is not None]
    ggrads = list(torch.autograd.grad(loss, present)) + ([None] if bias is None else [])
    if hidden.dtype in (torch.float64, torch.float32):
        tol = {torch.float64: 1e-9, torch.float32: 1e-4}[hidden.dtype]
        for name in FLOATS:
            assert max_err(getattr(got, name), ref[name]) <= tol * (1 + ref[name].abs().max().item()), name
        for gg, rg in zip(ggrads, rgrads):
            if rg is not None:
                assert max_err(gg, rg) <= tol * (1 + rg.abs().max().item())
    else:
        eager, egrads = ref_grads(hidden, weight, bias, labels, w_lp, w_ent, dtype=hidden.dtype, **kw)
        for name in FLOATS:
            e_err = max_err(eager[name], ref[name])
            assert max_err(getattr(got, name), ref[name]) <= 2 * e_err + 0.02 * (1 + ref[name].abs().max().item()), name
        for gg, eg, rg in zip(ggrads, egrads, rgrads):
            if rg is not None:
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
    torch.library.opcheck(linear_token_logprobs_op, (h, w, bb, labels, -100, 1.0, 1.0, 0.0, 15, 3))
    torch.library.opcheck(linear_token_logprobs_op, (h, w, None, labels, -100, 0.5, 1.0, 2.0, 1, 4))
    lp, lse, ent, *_ = linear_token_logprobs_op(hidden, weight, b, labels, -100, 1.0, 1.0, 0.0, 1, 3)
    torch.library.opcheck(linear_token_logprobs_backward_op,
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
