"""Per-token statistics of the fused linear head (pyalign.logprob.linear_token_logprobs and
linear_sequence_logprobs) against the materialized float64 reference: random shapes (hypothesis),
dtypes, subsets of inputs requiring grad, gradcheck, ignored tokens, extreme logits, differentiable
lse/mean_logit, mixed dtypes and autocast, opcheck, torch.compile and bad input; on every device."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import pyalign
from linear_helpers import (ALL, FLOATS, WITH_DEVICE, check_against_reference, cpu64, examples, make, max_err,
                            ref_grads)
from pyalign.logprob import linear_cross_entropy, linear_sequence_logprobs, linear_token_logprobs, sequence_logprobs
from pyalign.ops.linear.ops import linear_token_logprobs_backward_op, linear_token_logprobs_op


@settings(WITH_DEVICE, max_examples=examples(25))
@given(B=st.integers(1, 3), T=st.integers(1, 9), H=st.sampled_from([1, 3, 16, 33]),
       V=st.sampled_from([1, 2, 3, 17, 127, 1000]), bias=st.booleans(), chunk=st.sampled_from([None, 1, 4, 7]),
       dtype=st.sampled_from([torch.float64, torch.float32]), ignore=st.sampled_from([0.0, 0.3, 1.0]),
       opts=st.sampled_from([{}, {"temperature": 0.6}, {"softcap": 3.0, "logit_scale": 1.7},
                             {"shift": True}, {"logit_scale": 0.3, "temperature": 2.0}]))
def test_matches_reference_hypothesis(device, B, T, H, V, bias, chunk, dtype, ignore, opts):
    if opts.get("shift") and T < 2:
        T = 2
    hidden, weight, b, labels = make((B, T), H, V, dtype, device, bias=bias, ignore=ignore, seed=B * 31 + T)
    check_against_reference(hidden, weight, b, labels, chunk_size=chunk, **opts)


@settings(WITH_DEVICE, max_examples=examples(30))
@given(B=st.integers(1, 3), T=st.integers(1, 7), H=st.sampled_from([1, 3, 16, 33]),
       V=st.sampled_from([1, 3, 17, 127, 500]), bias=st.booleans(), chunk=st.sampled_from([None, 1, 4, 7]),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]),
       needs=st.tuples(st.booleans(), st.booleans(), st.booleans()).filter(any),
       ignore=st.sampled_from([0.0, 0.3, 1.0]),
       opts=st.sampled_from([{}, {"temperature": 0.6}, {"softcap": 3.0, "logit_scale": 1.7}, {"shift": True}]))
def test_matches_reference_hypothesis_all_dtypes_and_grad_subsets(device, B, T, H, V, bias, chunk, dtype, needs,
                                                                  ignore, opts):
    if opts.get("shift") and T < 2:
        T = 2
    hidden, weight, b, labels = make((B, T), H, V, dtype, device, bias=bias, ignore=ignore, seed=B * 17 + T + V)
    check_against_reference(hidden, weight, b, labels, chunk_size=chunk, needs=needs, **opts)


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
    r, rgrads = ref_grads(hidden, weight, b, labels, torch.ones_like(lp), 0.5 * torch.ones_like(lp))
    for leaf, need, rg in zip(leaves, needs, rgrads):
        if need:
            assert max_err(leaf.grad, rg) < 1e-9
        else:
            assert leaf.grad is None


def test_gradcheck_fp64(device):
    hidden, weight, b, labels = make((2, 5), 6, 9, torch.float64, device, ignore=0.3)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]

    def fn(h, w, bb):
        lp, ent = linear_token_logprobs(h, w, labels, bias=bb, return_entropy=True, chunk_size=3, softcap=2.5,
                                        temperature=0.8, shift=True)
        return lp, ent
    assert torch.autograd.gradcheck(fn, leaves)


def test_ignored_rows_skip_the_matmul(device):
    """NaN in the hidden state of an ignored token must not reach any result or gradient: those
    rows are dropped before the GEMM."""
    hidden, weight, b, labels = make((4, 6), 8, 21, torch.float32, device, ignore=0.0)
    labels[1, 2] = labels[3, :] = -100
    hidden[labels == -100] = float("nan")
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    lp, ent = linear_token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], return_entropy=True, chunk_size=5)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    assert (lp[labels == -100] == 0).all() and (ent[labels == -100] == 0).all()
    (lp.sum() + ent.sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)
    assert (leaves[0].grad[labels == -100] == 0).all()


def test_all_ignored_gives_zeros(device):
    hidden, weight, b, labels = make((2, 3), 4, 5, torch.float32, device, ignore=1.0)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    lp = linear_token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2])
    assert torch.equal(lp, torch.zeros_like(lp))
    lp.sum().backward()
    assert all(torch.equal(t.grad, torch.zeros_like(t)) for t in leaves)


def test_extreme_logits_stay_finite(device):
    hidden, weight, b, labels = make((2, 7), 4, 50, torch.float32, device, scale=3e3)
    check_against_reference(hidden, weight, b, labels, chunk_size=4)
    lp, ent = linear_token_logprobs(hidden, weight, labels, bias=b, return_entropy=True)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()


def test_chunk_size_does_not_change_results(device):
    hidden, weight, b, labels = make((3, 10), 16, 40, torch.float64, device)
    outs = [linear_token_logprobs(hidden, weight, labels, bias=b, outputs=ALL, chunk_size=c) for c in (1, 7, 30, None)]
    for o in outs[1:]:
        for name in FLOATS:
            assert max_err(getattr(o, name), getattr(outs[0], name)) < 1e-12
        assert torch.equal(o.is_top1, outs[0].is_top1)


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


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_lse_and_mean_logit_are_differentiable(device, softcap):
    hidden, weight, b, labels = make((3, 5), 8, 23, torch.float64, device, ignore=0.3)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    out = linear_token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], outputs=("lse", "mean_logit", "entropy"),
                                chunk_size=4, softcap=softcap, temperature=0.9)
    ref = cpu64(hidden, weight, b)
    z = ref[0] @ ref[1].t() + ref[2]
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / 0.9
    valid = labels.cpu() != -100
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


def test_mixed_dtypes_promote(device):
    hidden, weight, b, labels = make((2, 6), 16, 40, torch.float32, device, ignore=0.2)
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


def test_autocast_follows_autocast_dtype(device):
    hidden, weight, b, labels = make((2, 6), 16, 40, torch.float32, device, ignore=0.2)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    with torch.autocast(device, dtype=torch.bfloat16):
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


def test_opcheck(device):
    hidden, weight, b, labels = make((7,), 5, 11, torch.float32, device, ignore=0.3)
    h, w, bb = (t.clone().requires_grad_() for t in (hidden, weight, b))
    torch.library.opcheck(linear_token_logprobs_op.op, (h, w, bb, labels, -100, 1.0, 1.0, 0.0, 15, 3))
    torch.library.opcheck(linear_token_logprobs_op.op, (h, w, None, labels, -100, 0.5, 1.0, 2.0, 1, 4))
    lp, lse, ent, *_ = linear_token_logprobs_op(hidden, weight, b, labels, -100, 1.0, 1.0, 0.0, 1, 3)
    ones = torch.ones(7, device=device)
    torch.library.opcheck(linear_token_logprobs_backward_op.op,
                          (ones, ones.clone(), hidden, weight, b, labels, lse, ent, -100, 1.0, 1.0, 0.0, 3, 7))


def test_torch_compile_fullgraph(device):
    hidden, weight, b, labels = make((2, 6), 8, 19, torch.float32, device)

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


def test_bad_inputs(device):
    hidden, weight, b, labels = make((2, 4), 8, 10, torch.float32, device, ignore=0.0)
    with pytest.raises(ValueError, match="weight: expected shape"):
        linear_token_logprobs(hidden, torch.randn(10, 7, device=device), labels)
    with pytest.raises(ValueError, match="labels: expected shape"):
        linear_token_logprobs(hidden, weight, labels[:, :3])
    with pytest.raises(TypeError, match="weight: expected dtype"):
        linear_token_logprobs(hidden, weight.double(), labels)
    with pytest.raises(ValueError, match="bias: expected shape"):
        linear_token_logprobs(hidden, weight, labels, bias=torch.randn(9, device=device))
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
