"""pyalign.distill.distillation_loss: against TRL's GKDTrainer.generalized_jsd_loss (where TRL imports)
and the float64 reference, every reduction and beta; gradients of student and teacher; dtypes;
probability-0 entries; extreme logits; all-ignored batches; gradcheck; opcheck; torch.compile;
thread-count determinism; bad input."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from pyalign import distill
from pyalign.ops.distill import distillation_op
from pyalign.reference import distill as R

BETAS = (0.0, 0.3, 0.5, 1.0)


def batch(B=2, T=6, V=13, dtype=torch.float64, seed=0, device="cpu", scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale).to(device, dtype)
    t = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale).to(device, dtype)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, 1:2] = -100
    y[1:, 3:] = -100
    return s, t, y.to(device)


def run(fn, s, t, labels, **kw):
    a, b = s.clone().requires_grad_(), t.clone().requires_grad_()
    loss = fn(a, b, labels, **kw)
    loss.sum().backward()
    return loss.detach(), a.grad, b.grad


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
@pytest.mark.parametrize("with_labels", [True, False])
def test_matches_trl(beta, reduction, with_labels):
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    s, t, y = batch()
    labels = y if with_labels else None
    got = run(distill.distillation_loss, s, t, labels, beta=beta, temperature=0.7, reduction=reduction)
    want = run(gkd.GKDTrainer.generalized_jsd_loss, s, t, labels, beta=beta, temperature=0.7, reduction=reduction)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-13)


def test_num_items_in_batch_matches_trl():
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    s, t, y = batch()
    for n in (7, torch.tensor(7.0)):
        got = run(distill.distillation_loss, s, t, y, beta=0.5, num_items_in_batch=n)
        want = run(gkd.GKDTrainer.generalized_jsd_loss, s, t, y, beta=0.5, num_items_in_batch=n)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-13)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 5), V=st.integers(1, 40), beta=st.sampled_from(BETAS),
       temperature=st.sampled_from([0.5, 1.0, 2.0]), reduction=st.sampled_from(["batchmean", "sum", "mean", "none"]),
       seed=st.integers(0, 2**16))
def test_matches_reference(B, T, V, beta, temperature, reduction, seed):
    s, t, y = batch(B, T, V, seed=seed)
    kw = dict(beta=beta, temperature=temperature, reduction=reduction)
    got = run(distill.distillation_loss, s, t, y, **kw)
    want = run(R.distillation_loss, s, t, y, **kw)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("divergence", ["tvd", "skew_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("skew_alpha", [0.0, 0.1, 0.6])
def test_other_divergences(device, divergence, skew_alpha):
    """The total variation and DistiLLM's skew KL divergences against the reference written from their
    definitions (values, both gradients), fp64 and fp32, every reduction, with softcapping, ignored
    rows and probability-0 entries; gradcheck in fp64."""
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        s, t, y = batch(V=300, dtype=dtype, device=device)
        s[0, 0, :3] = t[0, 0, :3] = -math.inf
        for reduction in ("batchmean", "sum", "none"):
            # a softcap turns the student's -inf into -30, mass where the teacher has none: with a = 0 the
            # skew reverse KL is the reverse KL, infinite there; so softcap only where it stays finite
            kw = dict(divergence=divergence, skew_alpha=skew_alpha, temperature=0.9, reduction=reduction,
                      student_softcap=30.0 if skew_alpha > 0 else None)
            got = run(distill.distillation_loss, s, t, y, **kw)
            want = run(R.distillation_loss, s.double().cpu().clamp_min(-1e300), t.double().cpu().clamp_min(-1e300),
                       y.cpu(), **kw)
            for g, w in zip(got, want):
                torch.testing.assert_close(g.double().cpu(), w, rtol=tol, atol=tol * 1e-1)
    s, t, y = batch(B=1, T=3, V=6)
    if divergence != "tvd":  # the total variation has kinks where p_s = p_t, which finite differences cross
        torch.autograd.gradcheck(lambda a, b: distill.distillation_loss(a, b, y, divergence=divergence,
                                                                        skew_alpha=skew_alpha),
                                 (s.clone().requires_grad_(), t.clone().requires_grad_()))


@pytest.mark.parametrize("beta", BETAS)
def test_kernel_on_each_device(device, beta):
    """The kernel of each device (CPU; CUDA where present) against the float64 reference: fp64 and
    fp32 inputs, ignored rows, a temperature, the teacher's gradient, a row of V wider than a chunk
    of the CPU kernel and than a CUDA block's threads."""
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        s, t, y = batch(B=3, T=5, V=1500, dtype=dtype, seed=7, device=device)
        s[0, 0, :7] = t[0, 0, :7] = -math.inf  # entries of probability 0 in both
        got = run(distill.distillation_loss, s, t, y, beta=beta, temperature=1.3)
        want = run(R.distillation_loss, s.double().cpu().clamp_min(-1e300), t.double().cpu().clamp_min(-1e300),
                   y.cpu(), beta=beta, temperature=1.3)
        for g, w in zip(got, want):
            assert g.device.type == device
            torch.testing.assert_close(g.double().cpu(), w, rtol=tol, atol=tol * 1e-2)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-5), (torch.float16, 2e-5)])
def test_low_precision_inputs(dtype, tol):
    """fp32 accumulation whatever the input dtype: equal to the float64 reference of the same
    (rounded) inputs to fp32 rounding; the gradients come back in the inputs' dtype."""
    s, t, y = batch(V=300, dtype=dtype)
    for beta in BETAS:
        got = run(distill.distillation_loss, s, t, y, beta=beta)
        want = run(R.distillation_loss, s.double(), t.double(), y, beta=beta)
        assert got[1].dtype == dtype and got[2].dtype == dtype
        torch.testing.assert_close(got[0].double(), want[0], rtol=tol, atol=tol)
        gtol = tol if dtype == torch.float32 else 1e-2  # the gradients are rounded to the input dtype
        torch.testing.assert_close(got[1].double(), want[1], rtol=gtol, atol=gtol * 1e-2)


def test_per_position_reduction():
    s, t, y = batch()
    rows = distill.distillation_loss(s, t, y, reduction="none")
    assert rows.shape == y.shape
    assert torch.equal(rows[y == -100], torch.zeros_like(rows[y == -100]))
    torch.testing.assert_close(rows, R.distillation_loss(s, t, y, reduction="none"), rtol=1e-12, atol=1e-13)
    # a per-position upstream gradient reaches each row
    a = s.clone().requires_grad_()
    w = torch.rand(y.shape, dtype=torch.float64)
    (distill.distillation_loss(a, t, y, reduction="none") * w).sum().backward()
    a2 = s.clone().requires_grad_()
    (R.distillation_loss(a2, t, y, reduction="none") * w).sum().backward()
    torch.testing.assert_close(a.grad, a2.grad, rtol=1e-12, atol=1e-13)


def test_probability_zero_entries_and_extreme_logits():
    """Teacher (and student) entries of -inf have probability 0 and contribute 0, not NaN; logits of
    +-1e4 stay finite."""
    s, t, y = batch(V=17)
    t[..., :5] = -math.inf
    s[..., 1] = -math.inf  # where the teacher has no mass either (else the forward KL is infinite)
    for beta in (0.0, 0.5):  # reverse KL of a teacher with zeros where the student has mass: infinite
        got = run(distill.distillation_loss, s, t, y, beta=beta)
        assert all(torch.isfinite(g).all() for g in got)
        # the reference's autograd gives NaN through the -inf entries; -1e300 has the same
        # probability (exactly 0 in float64) and finite derivatives
        want = run(R.distillation_loss, s.clamp_min(-1e300), t.clamp_min(-1e300), y, beta=beta)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
        assert not got[2][..., :5].any()
    big_s, big_t, _ = batch(scale=1e4)
    for beta in BETAS:
        got = run(distill.distillation_loss, big_s.float(), big_t.float(), y, beta=beta)
        assert all(torch.isfinite(g).all() for g in got)
        want = R.distillation_loss(big_s, big_t, y, beta=beta)
        torch.testing.assert_close(got[0].double(), want, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("caps", [(30.0, None), (None, 20.0), (15.0, 25.0)])
def test_softcapping(device, caps):
    """Softcapping of either side's logits inside the kernel equals capping them first (the
    reference), with the chain rule through tanh; fp64 and fp32 (logits up to ~25 after the
    transform: fp32 rounding of them moves the gradients by up to ~1e-5)."""
    kw = dict(student_softcap=caps[0], teacher_softcap=caps[1], temperature=0.8)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-3)):
        s, t, y = batch(V=700, dtype=dtype, device=device, scale=20.0)
        for beta in BETAS:
            got = run(distill.distillation_loss, s, t, y, beta=beta, **kw)
            want = run(R.distillation_loss, s.double().cpu(), t.double().cpu(), y.cpu(), beta=beta, **kw)
            for g, w in zip(got, want):
                torch.testing.assert_close(g.double().cpu(), w, rtol=tol, atol=tol * 1e-2)
    s, t, y = batch(B=1, T=3, V=6, scale=20.0)
    torch.autograd.gradcheck(lambda a, b: distill.distillation_loss(a, b, y, beta=0.4, **kw),
                             (s.clone().requires_grad_(), t.clone().requires_grad_()))


def test_all_ignored_batch_is_zero():
    s, t, y = batch()
    y[:] = -100
    for reduction in ("batchmean", "sum", "mean"):
        loss, gs, gt = run(distill.distillation_loss, s, t, y, reduction=reduction)
        assert loss.item() == 0 and not gs.any() and not gt.any()


def test_teacher_gradient_only_when_asked():
    s, t, y = batch()
    a = s.clone().requires_grad_()
    distill.distillation_loss(a, t, y).backward()
    assert a.grad is not None and t.grad is None


def test_gradcheck():
    s, t, y = batch(B=2, T=3, V=5)
    for beta in BETAS:
        torch.autograd.gradcheck(lambda a, b: distill.distillation_loss(a, b, y, beta=beta, temperature=0.8),
                                 (s.clone().requires_grad_(), t.clone().requires_grad_()))


def test_opcheck_and_compile():
    s, t, y = batch(dtype=torch.float32)
    s2, t2, y2 = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]), y.reshape(-1)
    w = torch.rand(s2.shape[0])
    torch.library.opcheck(distillation_op.op, (s2.clone().requires_grad_(), t2.clone().requires_grad_(), y2, w, "jsd",
                                               0.5, 1.0, 30.0, 0.0, -100, True))
    fn = torch.compile(lambda a, b: distill.distillation_loss(a, b, y, beta=0.3), fullgraph=True)
    eager = run(lambda a, b, _: distill.distillation_loss(a, b, y, beta=0.3), s, t, None)
    compiled = run(lambda a, b, _: fn(a, b), s, t, None)
    for e, c in zip(eager, compiled):
        assert torch.equal(e, c)


def test_same_bits_with_one_or_two_threads():
    s, t, y = batch(B=4, T=16, V=500, dtype=torch.float32)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(distill.distillation_loss, s, t, y, beta=0.5)
        torch.set_num_threads(2)
        two = run(distill.distillation_loss, s, t, y, beta=0.5)
    finally:
        torch.set_num_threads(n)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_bad_input():
    s, t, y = batch()
    cases = [
        (ValueError, "teacher_logits", dict(teacher_logits=t[..., :-1])),
        (ValueError, "beta", dict(beta=1.5)),
        (ValueError, "beta", dict(beta=-0.1)),
        (ValueError, "temperature", dict(temperature=0.0)),
        (ValueError, "reduction", dict(reduction="avg")),
        (ValueError, "labels", dict(labels=y[:, :-1])),
        (TypeError, "labels", dict(labels=y.float())),
        (TypeError, "student_logits", dict(student_logits=s.long())),
        (ValueError, "student_logits", dict(student_logits=s[0, 0], teacher_logits=t[0, 0], labels=None)),
        (ValueError, "num_items_in_batch", dict(num_items_in_batch=0)),
        (ValueError, "student_softcap", dict(student_softcap=0.0)),
        (ValueError, "divergence", dict(divergence="kl")),
        (ValueError, "skew_alpha", dict(divergence="skew_kl", skew_alpha=1.0)),
        (ValueError, "teacher_softcap", dict(teacher_softcap=-1.0)),
    ]
    for exc, name, kw in cases:
        args = dict(student_logits=s, teacher_logits=t, labels=y)
        args.update(kw)
        with pytest.raises(exc, match=name):
            distill.distillation_loss(args.pop("student_logits"), args.pop("teacher_logits"), args.pop("labels"), **args)
