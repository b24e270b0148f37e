"""pyalign.distill.topk_distillation_loss: against the float64 reference (which sums the student's tail
entry by entry) for both divergences and both tail treatments, every reduction, hypothesis shapes from
K = 1 to K = V; tails of ~0 and ~1; fp32/bf16; all-ignored batches; another ignore_index; gradcheck;
opcheck; torch.compile; bad input."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from pyalign import distill
from pyalign.ops.distill_topk import topk_distillation_op
from pyalign.reference import distill as R

COMBOS = [(d, t) for d in ("forward_kl", "reverse_kl") for t in ("bucket", "renormalize")]


def case(B=2, T=5, V=40, K=6, dtype=torch.float64, seed=0, device="cpu", teacher_scale=2.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2).to(device, dtype)
    tl = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64) * teacher_scale, -1)
    top = tl.topk(K, -1)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, :1] = -100
    return s, top.values.to(device), top.indices.to(device), y.to(device)


def run(fn, s, b, ids, y, **kw):
    a = s.clone().requires_grad_()
    loss = fn(a, b, ids, y, **kw)
    loss.sum().backward()
    return loss.detach(), a.grad


@pytest.mark.parametrize("divergence,tail", COMBOS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_matches_reference(device, divergence, tail, reduction):
    s, b, ids, y = case(device=device)
    for labels in (y, None):
        kw = dict(divergence=divergence, tail=tail, temperature=0.8, reduction=reduction)
        got = run(distill.topk_distillation_loss, s, b, ids, labels, **kw)
        want = run(R.topk_distillation_loss, s.cpu(), b.cpu(), ids.cpu(), None if labels is None else labels.cpu(),
                   **kw)
        for g, w in zip(got, want):
            torch.testing.assert_close(g.cpu(), w, rtol=1e-10, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(V=st.integers(1, 30), k=st.integers(1, 30), combo=st.sampled_from(COMBOS), seed=st.integers(0, 2**16),
       num_items=st.sampled_from([None, 3]))
def test_hypothesis_shapes(V, k, combo, seed, num_items):
    K = min(k, V)
    s, b, ids, y = case(B=2, T=3, V=V, K=K, seed=seed)
    kw = dict(divergence=combo[0], tail=combo[1], num_items_in_batch=num_items)
    got = run(distill.topk_distillation_loss, s, b, ids, y, **kw)
    want = run(R.topk_distillation_loss, s, b, ids, y, **kw)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


def test_extreme_tails():
    """A teacher whose top-k hold all but 1e-12 of its mass (tail ~0), and a student whose mass is
    almost all outside the ids (tail ~1): finite, equal to the reference (to the 1e-4 relative
    precision a tail of 1e-12 keeps when formed from rounded log-probs)."""
    s, _, ids, y = case(V=50, K=8)
    g = torch.Generator().manual_seed(3)
    b = torch.log_softmax(torch.randn(2, 5, 8, generator=g, dtype=torch.float64), -1) + math.log1p(-1e-12)
    s = s.scatter(-1, ids, -30.0)  # the student's ids hold ~e^-30 of its mass
    for divergence, tail in COMBOS:
        got = run(distill.topk_distillation_loss, s, b, ids, y, divergence=divergence, tail=tail)
        want = run(R.topk_distillation_loss, s, b, ids, y, divergence=divergence, tail=tail)
        assert all(torch.isfinite(x).all() for x in got), (divergence, tail)
        for x, w in zip(got, want):
            torch.testing.assert_close(x, w, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_low_precision(device, dtype, tol):
    s, b, ids, y = case(V=500, K=20, dtype=dtype, device=device)
    for divergence, tail in COMBOS:
        got = run(distill.topk_distillation_loss, s, b.float(), ids, y, divergence=divergence, tail=tail)
        want = run(R.topk_distillation_loss, s.double().cpu(), b.cpu(), ids.cpu(), y.cpu(), divergence=divergence,
                   tail=tail)
        assert got[1].dtype == dtype
        torch.testing.assert_close(got[0].double().cpu(), want[0], rtol=tol, atol=tol * 1e-2)
        torch.testing.assert_close(got[1].double().cpu(), want[1], rtol=tol, atol=tol * 1e-2)


def test_all_ignored_and_ignore_index():
    s, b, ids, y = case()
    y[:] = -100
    loss, grad = run(distill.topk_distillation_loss, s, b, ids, y)
    assert loss.item() == 0 and not grad.any()
    s, b, ids, y = case()
    y2 = torch.where(y == -100, 7, y + 10)  # 7 marks the ignored positions; -100 is an ordinary label here
    y2[1, 2] = -100
    got = run(distill.topk_distillation_loss, s, b, ids, y2, ignore_index=7)
    want = run(R.topk_distillation_loss, s, b, ids, y2, ignore_index=7)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_gradcheck_opcheck_compile():
    s, b, ids, y = case(B=1, T=3, V=9, K=3)
    for divergence, tail in COMBOS:
        torch.autograd.gradcheck(lambda a: distill.topk_distillation_loss(a, b, ids, y, divergence=divergence,
                                                                          tail=tail, temperature=0.7),
                                 (s.clone().requires_grad_(),))
    s32, b32 = s.float().reshape(-1, 9), b.float().reshape(-1, 3)
    torch.library.opcheck(topk_distillation_op.op, (s32.clone().requires_grad_(), b32, ids.reshape(-1, 3), y.reshape(-1),
                                                    torch.rand(3), "forward_kl", "bucket", 1.0))
    fn = torch.compile(lambda a: distill.topk_distillation_loss(a, b, ids, y, divergence="reverse_kl"), fullgraph=True)
    eager = run(lambda a, *_: distill.topk_distillation_loss(a, b, ids, y, divergence="reverse_kl"), s, b, ids, y)
    compiled = run(lambda a, *_: fn(a), s, b, ids, y)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(e, c, rtol=1e-12, atol=1e-14)


def test_bad_input():
    s, b, ids, y = case()
    dup, out_of_range, positive = ids.clone(), ids.clone(), b.clone()
    dup[0, 2, 1] = dup[0, 2, 0]
    out_of_range[1, 0, 3] = 40
    positive[0, 3, 0] = 0.5
    cases = [
        (ValueError, r"teacher_topk_ids: expected ids in \[0, 40\)", dict(teacher_topk_ids=out_of_range)),
        (ValueError, "distinct", dict(teacher_topk_ids=dup)),
        (ValueError, "<= 0", dict(teacher_topk_logprobs=positive)),
        (ValueError, "at most 1", dict(teacher_topk_logprobs=b.clamp(min=-0.5))),
        (ValueError, "teacher_topk_logprobs", dict(teacher_topk_logprobs=b.masked_fill(b < -3, math.nan))),
        (ValueError, "teacher_topk_ids", dict(teacher_topk_ids=ids[..., :-1])),
        (ValueError, "teacher_topk_logprobs", dict(teacher_topk_logprobs=b[:, :-1], teacher_topk_ids=ids[:, :-1])),
        (ValueError, "divergence", dict(divergence="jsd")),
        (ValueError, "tail", dict(tail="drop")),
        (ValueError, "temperature", dict(temperature=-1.0)),
        (TypeError, "teacher_topk_ids", dict(teacher_topk_ids=ids.float())),
        (ValueError, "labels", dict(labels=y[:, :-1])),
    ]
    for exc, name, kw in cases:
        args = dict(student_logits=s, teacher_topk_logprobs=b, teacher_topk_ids=ids, labels=y)
        args.update(kw)
        pos = [args.pop(k) for k in ("student_logits", "teacher_topk_logprobs", "teacher_topk_ids", "labels")]
        with pytest.raises(exc, match=name):
            distill.topk_distillation_loss(*pos, **args)
