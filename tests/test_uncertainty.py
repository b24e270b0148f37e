"""Tests of pyalign.uncertainty against plain-PyTorch references (pyalign/reference/uncertainty.py),
the properties the design names, opcheck on each custom op, and bad input.

Tolerances (absolute, against a float64 reference computed on the same input values):
float64 1e-9; float32/bf16/fp16 inputs 1e-5 for entropies/log-probs. Measured at M=4, 64 tokens,
V=32000, logits ~ 3 N(0, 1): pyalign errs by <= 3.5e-6 and PyTorch's own fp32 eager computation by
<= 6.6e-6 (fp32 accumulation over V; pyalign's polynomial exp/log are within ~2 ulp).
"""
from __future__ import annotations

import math
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import pyalign
from pyalign import uncertainty as U
from pyalign._ext import desc, kernels, stream_of
from pyalign.ops.uncertainty import reward_stats_op, token_uncertainty_backward_op, token_uncertainty_op
from pyalign.reference import uncertainty as R

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
TOKEN_FIELDS = ("total_entropy", "expected_entropy", "mutual_information", "logprobs", "prob_variance",
                "member_logprobs")
# hypothesis tests that take the device fixture: the fixture is a constant string, so that
# hypothesis does not reset it between examples is harmless.
WITH_DEVICE = settings(suppress_health_check=[*settings.default.suppress_health_check,
                                              HealthCheck.function_scoped_fixture])


def _logits(m, lead, v, dtype, device, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, *lead, v, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def _labels(lead, v, device, seed=0, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed + 1)
    lab = torch.randint(0, v, lead, generator=g)
    lab[torch.rand(lead, generator=g) < ignore_frac] = -100
    return lab.to(device)


class _On:
    """Tensors on one device, so that a CPU case and its CUDA twin see the same numbers: ``randn``
    and ``rand`` drawn on the CPU from one seeded generator and moved, ``tensor``, ``ones`` and
    ``empty`` made there."""

    def __init__(self, device, seed=0):
        self.device, self.g = device, torch.Generator().manual_seed(seed)

    def randn(self, *shape, dtype=torch.float32):
        return torch.randn(*shape, generator=self.g, dtype=dtype).to(self.device)

    def rand(self, *shape, dtype=torch.float32):
        return torch.rand(*shape, generator=self.g, dtype=dtype).to(self.device)

    def tensor(self, data, **kw):
        return torch.tensor(data, **kw).to(self.device)

    def ones(self, *shape, **kw):
        return torch.ones(*shape, **kw).to(self.device)

    def empty(self, *shape, **kw):
        return torch.empty(*shape, **kw, device=self.device)


def _compare_tokens(out, ref, tol, rtol=0.0):
    for k, v in ref.items():
        got = getattr(out, k)
        assert got is not None, k
        assert got.shape == v.shape, k
        torch.testing.assert_close(got.double().cpu(), v.cpu(), atol=tol, rtol=rtol, msg=k)


# ---------------------------------------------------------------------------------------------
# token_uncertainty
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_token_uncertainty_matches_reference(device, dtype):
    x = _logits(3, (2, 5), 1000, dtype, device)
    lab = _labels((2, 5), 1000, device)
    out = U.token_uncertainty(x, lab, temperature=1.3)
    assert out.total_entropy.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _compare_tokens(out, R.token_uncertainty(x.cpu(), lab.cpu(), temperature=1.3), TOL[dtype])


@settings(WITH_DEVICE)
@given(m=st.integers(1, 4), lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
       v=st.sampled_from([1, 3, 17, 513, 1031]), temp=st.floats(0.5, 2.0),
       dtype=st.sampled_from(DTYPES), with_labels=st.booleans(), seed=st.integers(0, 1000))
def test_token_uncertainty_hypothesis(device, m, lead, v, temp, dtype, with_labels, seed):
    lead = tuple(lead)
    x = _logits(m, lead, v, dtype, device, seed=seed)
    lab = _labels(lead, v, device, seed=seed) if with_labels else None
    out = U.token_uncertainty(x, lab, temperature=temp)
    ref = R.token_uncertainty(x.cpu(), None if lab is None else lab.cpu(), temperature=temp)
    _compare_tokens(out, ref, TOL[dtype])
    if lab is None:
        assert out.logprobs is None and out.member_logprobs is None


def test_token_uncertainty_odd_vocab_and_views(device):
    # A strided view of the leading dims (every other token, a member slice) is read in place.
    base = _logits(4, (6, 7), 32001, torch.float32, device, seed=3)
    x = base[1:, ::2]
    lab = _labels((3, 7), 32001, device, seed=3)
    out = U.token_uncertainty(x, lab)
    _compare_tokens(out, R.token_uncertainty(x.cpu(), lab.cpu()), 1e-5)
    # A vocabulary stride other than 1 (one contiguous copy) and the gradient of a view.
    wide = _logits(2, (3,), 2 * 101, torch.float32, device, seed=4).view(2, 3, 101, 2)[..., 1]
    lab2 = torch.tensor([0, 100, 7], device=device)
    _compare_tokens(U.token_uncertainty(wide, lab2), R.token_uncertainty(wide.cpu(), lab2.cpu()), 1e-5)
    leaf = base.detach().double().requires_grad_()
    U.token_uncertainty(leaf[1:, ::2], lab).logprobs.sum().backward()
    ref_leaf = base.detach().double().cpu().requires_grad_()
    R.token_uncertainty(ref_leaf[1:, ::2], lab.cpu())["logprobs"].sum().backward()
    torch.testing.assert_close(leaf.grad.double().cpu(), ref_leaf.grad, atol=1e-6, rtol=0)


def test_token_uncertainty_extreme_and_masked(device):
    x = _logits(3, (4,), 257, torch.float32, device, seed=5) * 1e4 / 3
    x[:, 0, 10:] = float("-inf")   # a token whose vocab is mostly masked
    x[1, 1] = 0                    # a uniform member
    lab = torch.tensor([3, 5, 7, 9], device=device)
    out = U.token_uncertainty(x, lab)
    for k in TOKEN_FIELDS:
        assert torch.isfinite(getattr(out, k)).all(), k
    # |logits| ~ 1e4: log-probs are ~ -3e4 and fp32 resolves them to ~3e-3 (rtol 1e-6).
    _compare_tokens(out, R.token_uncertainty(x.cpu(), lab.cpu()), 1e-4, rtol=1e-6)


def test_token_mutual_information_properties(device):
    x = _logits(4, (3, 9), 700, torch.float32, device, seed=7)
    out = U.token_uncertainty(x)
    assert (out.mutual_information >= 0).all()
    torch.testing.assert_close(out.total_entropy, out.expected_entropy + out.mutual_information, atol=1e-5, rtol=0)
    assert (out.total_entropy <= math.log(700) + 1e-5).all()
    # Identical members: no disagreement, MI == 0 and total == expected.
    same = x[:1].expand(5, *x.shape[1:])
    o2 = U.token_uncertainty(same)
    assert o2.mutual_information.abs().max() < 1e-5
    torch.testing.assert_close(o2.total_entropy, o2.expected_entropy, atol=1e-5, rtol=0)
    # One member: MI == 0 exactly (pbar == p).
    o1 = U.token_uncertainty(x[:1])
    assert o1.mutual_information.abs().max() < 1e-5
    # Disagreeing members (one-hot on different tokens) have MI ~ log M.
    d = torch.full((3, 1, 50), -1e4, device=device)
    for k in range(3):
        d[k, 0, k] = 1e4
    assert abs(float(U.token_uncertainty(d).mutual_information) - math.log(3)) < 1e-4


def test_token_ignore_index_gives_zero(device):
    x = _logits(2, (5,), 100, torch.float32, device)
    lab = torch.full((5,), -100, device=device)
    lab[2] = 4
    out = U.token_uncertainty(x, lab)
    for k in TOKEN_FIELDS:
        t = getattr(out, k)
        keep = torch.zeros_like(t, dtype=torch.bool)
        keep[..., 2] = True
        assert (t[~keep] == 0).all(), k
    assert out.total_entropy[2] > 0


def test_token_gradcheck_fp64(device):
    x = _logits(3, (2, 3), 11, torch.float64, device).requires_grad_()
    lab = torch.tensor([[1, -100, 4], [0, 10, 5]], device=device)
    f = lambda t: U.token_uncertainty(t, lab, temperature=0.7).logprobs
    assert torch.autograd.gradcheck(f, (x,))
    g = lambda t: U.token_uncertainty(t, lab, temperature=0.7).member_logprobs
    assert torch.autograd.gradcheck(g, (x,))
    h = lambda t: (lambda o: o.logprobs * 2 + o.member_logprobs.sum(0))(U.token_uncertainty(t, lab))
    assert torch.autograd.gradcheck(h, (x,))


@pytest.mark.parametrize("dtype", DTYPES)
def test_token_grad_matches_reference(device, dtype):
    x = _logits(3, (4, 5), 300, dtype, device, seed=2).requires_grad_()
    lab = _labels((4, 5), 300, device, seed=2)
    w = _On(device, seed=2).randn(4, 5)
    out = U.token_uncertainty(x, lab, temperature=1.5)
    (out.logprobs * w).sum().backward()
    xr = x.detach().cpu().double().requires_grad_()
    ref = R.token_uncertainty(xr, lab.cpu(), temperature=1.5)
    (ref["logprobs"] * w.cpu().double()).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2 * float(xr.grad.abs().max())
    torch.testing.assert_close(x.grad.double().cpu(), xr.grad, atol=tol, rtol=0 if dtype == torch.float32 else 1e-2)
    assert x.grad.dtype == dtype


def test_token_entropies_are_not_differentiable(device):
    x = _logits(2, (3,), 20, torch.float32, device).requires_grad_()
    out = U.token_uncertainty(x, torch.tensor([1, 2, 3], device=device))
    assert not out.mutual_information.requires_grad and not out.total_entropy.requires_grad
    assert out.logprobs.requires_grad


def test_token_opcheck(device):
    x = _logits(2, (3,), 40, torch.float32, device).requires_grad_()
    lab = torch.tensor([1, -100, 7], device=device)
    torch.library.opcheck(token_uncertainty_op.op, (x, lab, 1.0, -100))
    torch.library.opcheck(token_uncertainty_op.op, (x, None, 0.5, -100))
    out = token_uncertainty_op(x.detach(), lab, 1.0, -100)
    torch.library.opcheck(token_uncertainty_backward_op.op,
                          (torch.ones(3, device=device), None, x.detach(), lab, out[6], out[3], 1.0, -100))


def test_sequence_uncertainty(device):
    x = _logits(3, (2, 6), 50, torch.float32, device, seed=4)
    lab = _labels((2, 6), 50, device, seed=4)
    lab[1] = -100  # a sequence without valid tokens
    mask = torch.ones(2, 6, dtype=torch.bool, device=device)
    mask[0, 0] = False
    tok = U.token_uncertainty(x, lab)
    valid = (lab != -100) & mask
    for red in ("sum", "mean"):
        seq = U.sequence_uncertainty(x, lab, mask=mask, reduction=red)
        cnt = valid.sum(-1)
        assert torch.equal(seq.counts, cnt)
        for name in ("total_entropy", "expected_entropy", "mutual_information", "logprobs"):
            want = (getattr(tok, name) * valid).sum(-1)
            if red == "mean":
                want = want / cnt.clamp(min=1)
            torch.testing.assert_close(getattr(seq, name), want, atol=1e-5, rtol=1e-5)
        assert getattr(seq, "mutual_information")[1] == 0
    no_lab = U.sequence_uncertainty(x, mask=mask)
    assert no_lab.logprobs is None and torch.equal(no_lab.counts, mask.sum(-1))


# ---------------------------------------------------------------------------------------------
# reward ensembles
# ---------------------------------------------------------------------------------------------

@settings(WITH_DEVICE)
@given(m=st.integers(2, 9), n=st.integers(1, 600), dtype=st.sampled_from(DTYPES + [torch.float64]),
       weighted=st.booleans(), ddof=st.sampled_from([0, 1]), q=st.floats(0, 1), seed=st.integers(0, 999))
def test_reward_stats_hypothesis(device, m, n, dtype, weighted, ddof, q, seed):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(m, n, generator=g, dtype=torch.float64).to(dtype)
    v = torch.rand(m, n, generator=g, dtype=torch.float64).to(dtype)
    w = torch.rand(m, generator=g) + 0.1 if weighted else None
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    ref = R.reward_stats(r, v, w, ddof=ddof, q=q)
    r, v, w = (None if t is None else t.to(device) for t in (r, v, w))
    agg = U.aggregate_rewards(r, member_weights=w, ddof=ddof, variances=v)
    cpu64 = lambda t: t.double().cpu()
    torch.testing.assert_close(cpu64(agg.mean), ref["mean"], atol=tol, rtol=0)
    torch.testing.assert_close(cpu64(agg.variance), ref["var"], atol=tol, rtol=0)
    torch.testing.assert_close(cpu64(agg.min), ref["min"], atol=0, rtol=0)
    torch.testing.assert_close(cpu64(agg.max), ref["max"], atol=0, rtol=0)
    torch.testing.assert_close(cpu64(agg.aleatoric), ref["aleatoric"], atol=tol, rtol=0)
    if not weighted:
        qa = U.aggregate_rewards(r, method="quantile", q=q)
        torch.testing.assert_close(cpu64(qa.reward), ref["quantile"], atol=tol, rtol=0)


@pytest.mark.parametrize("method", U.METHODS)
def test_aggregate_methods(device, method):
    g = torch.Generator().manual_seed(1)
    r = torch.randn(5, 3, 4, generator=g).to(device)
    agg = U.aggregate_rewards(r, method=method, lam=0.5, q=0.25)
    assert agg.reward.shape == (3, 4)
    ref = R.reward_stats(r.reshape(5, -1).cpu(), q=0.25)
    mean, var = ref["mean"], ref["var"]
    want = {"mean": mean, "min": ref["min"], "uwo": mean - 0.5 * var, "lcb": mean - 0.5 * var.sqrt(),
            "median": torch.quantile(r.reshape(5, -1).cpu().double(), 0.5, dim=0), "quantile": ref["quantile"]}[method]
    torch.testing.assert_close(agg.reward.reshape(-1).double().cpu(), want, atol=1e-6, rtol=0)
    # Penalized and pessimistic rewards never exceed the mean; every aggregate lies in [min, max].
    if method in ("uwo", "lcb", "min"):
        assert (agg.reward <= agg.mean + 1e-6).all()
    assert ((agg.reward >= agg.min - 1e-6) | (method in ("uwo", "lcb"))).all()
    assert (agg.reward <= agg.max + 1e-6).all()


def test_quantile_many_members_and_ties(device):
    # M above the CPU kernel's local-sort size uses rank counting; ties and NaN behave like torch.
    g = torch.Generator().manual_seed(2)
    r = torch.randn(130, 6, generator=g).to(device)
    q = U.aggregate_rewards(r, method="quantile", q=0.37).reward
    torch.testing.assert_close(q.cpu(), torch.quantile(r.cpu(), 0.37, dim=0), atol=1e-6, rtol=0)
    t = torch.tensor([[1.0, 2.0], [1.0, float("nan")], [3.0, 0.0], [1.0, 5.0]], device=device)
    med = U.aggregate_rewards(t, method="median")
    assert float(med.reward[0]) == 1.0 and torch.isnan(med.reward[1])
    assert torch.isnan(med.min[1]) and torch.isnan(med.max[1]) and torch.isnan(med.mean[1])


def test_member_weights_and_posterior(device):
    r = _On(device, seed=3).randn(4, 10)
    logev = torch.tensor([-3.0, -1.0, -2.0, -1.5], device=device)
    w = U.posterior_weights(logev)
    torch.testing.assert_close(w.sum(), torch.tensor(1.0, device=device))
    assert int(w.argmax()) == 1
    agg = U.aggregate_rewards(r, member_weights=w)
    torch.testing.assert_close(agg.mean, (w[:, None] * r).sum(0), atol=1e-6, rtol=0)
    # A one-hot weight selects that member; a flat tempered posterior approaches the plain mean.
    onehot = torch.tensor([0.0, 0.0, 1.0, 0.0], device=device)
    torch.testing.assert_close(U.aggregate_rewards(r, member_weights=onehot).mean, r[2])
    flat = U.posterior_weights(logev, temperature=1e6)
    torch.testing.assert_close(U.aggregate_rewards(r, member_weights=flat).mean, r.mean(0), atol=1e-5, rtol=0)


def test_heteroscedastic_decomposition_sums(device):
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(6, 20, generator=g).to(device)
    var = torch.rand(6, 20, generator=g).to(device)
    dec = U.heteroscedastic_decomposition(mu, var)
    torch.testing.assert_close(dec.total, dec.aleatoric + dec.epistemic)
    torch.testing.assert_close(dec.aleatoric, var.mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(dec.epistemic, mu.var(0, unbiased=False), atol=1e-6, rtol=0)
    # Law of total variance, checked by sampling the mixture.
    gen = torch.Generator().manual_seed(0)
    k = 200_000
    comp = torch.randint(0, 6, (k,), generator=gen)
    samples = mu[comp, 0].cpu() + var[comp, 0].cpu().sqrt() * torch.randn(k, generator=gen)
    assert abs(float(samples.var()) - float(dec.total[0])) < 0.05 * float(dec.total[0]) + 0.01


def test_reward_gradcheck(device):
    on = _On(device, seed=4)
    r = on.randn(5, 7, dtype=torch.float64).requires_grad_()
    v = on.rand(5, 7, dtype=torch.float64).requires_grad_()
    w = on.rand(5, dtype=torch.float64)
    for method in U.METHODS:
        mw = w if method not in ("median", "quantile") else None
        f = lambda a, b: (lambda o: o.reward + o.total_variance + o.max)(
            U.aggregate_rewards(a, method=method, lam=0.3, q=0.3, member_weights=mw, variances=b, ddof=1))
        assert torch.autograd.gradcheck(f, (r, v)), method


def test_reward_opcheck(device):
    on = _On(device, seed=5)
    r = on.randn(4, 9).requires_grad_()
    v = on.rand(4, 9).requires_grad_()
    w = torch.softmax(on.randn(4), 0)
    torch.library.opcheck(reward_stats_op.op, (r, v, w, 1.0, 0.3))
    torch.library.opcheck(reward_stats_op.op, (r, None, None, 0.75, -1.0))


def test_preference_uncertainty(device):
    g = torch.Generator().manual_seed(5)
    rc = torch.randn(5, 30, generator=g).to(device)
    rr = torch.randn(5, 30, generator=g).to(device)
    out = U.preference_uncertainty(rc, rr, beta=2.0)
    ref = R.preference_uncertainty(rc.cpu(), rr.cpu(), beta=2.0)
    for k, v in ref.items():
        torch.testing.assert_close(getattr(out, k).double().cpu(), v, atol=1e-6, rtol=0, msg=k)
    assert (out.epistemic >= 0).all()
    torch.testing.assert_close(out.total, out.aleatoric + out.epistemic, atol=1e-6, rtol=0)
    same = U.preference_uncertainty(rc[:1].expand(4, 30), rr[:1].expand(4, 30))
    assert same.epistemic.abs().max() < 1e-6
    # Large margins: certain members, entropies ~ 0 and finite.
    big = U.preference_uncertainty(rc * 1e4, rr * 0)
    assert torch.isfinite(big.total).all() and torch.isfinite(big.aleatoric).all()


def test_preference_uncertainty_grad(device):
    on = _On(device, seed=6)
    rc = on.randn(3, 5, dtype=torch.float64).requires_grad_()
    rr = on.randn(3, 5, dtype=torch.float64).requires_grad_()
    f = lambda a, b: (lambda o: o.prob + o.prob_variance + o.aleatoric)(U.preference_uncertainty(a, b))
    assert torch.autograd.gradcheck(f, (rc, rr))


def test_uncertainty_weights(device):
    g = torch.Generator().manual_seed(7)
    base = torch.randn(1, 8, generator=g).to(device)
    noise = torch.randn(5, 8, generator=g).to(device)
    scale = torch.linspace(0, 3, 8, device=device)   # pair k: members disagree more with k
    rc = base + noise * scale
    rr = torch.zeros_like(rc)
    for source in ("mutual_information", "margin_std"):
        w = U.uncertainty_weights(rc, rr, source=source)
        assert w.shape == (8,) and w.dtype == torch.float32 and not w.requires_grad
        torch.testing.assert_close(w.mean(), torch.tensor(1.0, device=device))
        assert float(w[0]) > float(w[-1])   # the certain pair outweighs the most uncertain one
    w = U.uncertainty_weights(rc, rr, min_weight=0.5)
    assert float(w.min()) >= 0.5 - 1e-6   # raw weights <= 1, so the mean-1 rescaling keeps the floor
    for seed in range(20):  # identical members: rounding in u must not become weights
        b = torch.randn(1, 8, generator=torch.Generator().manual_seed(seed)).to(device) * 3
        for source in ("mutual_information", "margin_std"):
            same = U.uncertainty_weights(b.expand(4, 8), torch.zeros(4, 8, device=device), source=source)
            torch.testing.assert_close(same, torch.ones(8, device=device), atol=0, rtol=0)
    with pytest.raises(ValueError, match="M >= 2"):
        U.uncertainty_weights(rc[:1], rr[:1])
    u = U.uncertainty_weights(rc, rr, source="margin_std", temperature=0.5)
    std = (rc - rr).std(0, unbiased=False)
    want = torch.exp(-std / 0.5)
    torch.testing.assert_close(u, want / want.mean(), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# calibration and conformal
# ---------------------------------------------------------------------------------------------

def test_calibration_matches_loop_reference(device):
    g = torch.Generator().manual_seed(8)
    p = torch.rand(500, generator=g)
    y = (torch.rand(500, generator=g) < p ** 2).long()
    cal = U.calibration(p.to(device), y.to(device), n_bins=10)
    ece, mce = R.calibration(p, y, n_bins=10)
    assert abs(float(cal.ece) - ece) < 1e-6 and abs(float(cal.mce) - mce) < 1e-6
    torch.testing.assert_close(cal.brier.double().cpu(), ((p - y) ** 2).mean().double(), atol=1e-6, rtol=0)
    pt = torch.where(y == 1, p, 1 - p)
    torch.testing.assert_close(cal.nll.double().cpu(), -pt.clamp(min=1e-12).log().mean().double(), atol=1e-5, rtol=0)
    assert int(cal.bin_count.sum()) == 500
    probs = torch.softmax(torch.randn(400, 5, generator=g) * 2, 1)
    t = torch.multinomial(probs, 1, generator=g).squeeze(1)
    cal2 = U.calibration(probs.to(device), t.to(device), n_bins=8)
    ece2, mce2 = R.calibration(probs, t, n_bins=8)
    assert abs(float(cal2.ece) - ece2) < 1e-6 and abs(float(cal2.mce) - mce2) < 1e-6
    onehot = torch.nn.functional.one_hot(t, 5).float()
    torch.testing.assert_close(cal2.brier.cpu(), ((probs - onehot) ** 2).sum(1).mean(), atol=1e-6, rtol=0)


def test_calibration_properties(device):
    g = torch.Generator().manual_seed(9)
    p = torch.rand(200_000, generator=g)
    y = (torch.rand(200_000, generator=g) < p).long()   # calibrated by construction
    p, y = p.to(device), y.to(device)
    good = U.calibration(p, y, n_bins=15)
    assert float(good.ece) < 0.01
    bad = U.calibration(p.clamp(0.0, 1.0) ** 0.25, y, n_bins=15)   # over-confident positives
    assert float(bad.ece) > 0.1 and float(bad.mce) >= float(bad.ece)
    q = U.calibration(p, y, n_bins=10, strategy="quantile")
    counts = q.bin_count.float()
    assert counts.min() > 0.8 * counts.mean()


def test_plot_reliability_without_matplotlib(monkeypatch):
    cal = U.calibration(torch.tensor([0.2, 0.9]), torch.tensor([0, 1]))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match="matplotlib"):
        U.plot_reliability(cal)


def test_plot_reliability_draws(device):
    pytest.importorskip("matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    on = _On(device, seed=10)
    cal = U.calibration(on.rand(100), (on.rand(100) > 0.5).long())
    ax = U.plot_reliability(cal)
    assert len(ax.patches) == 15


def test_conformal_quantile_exact(device):
    s = torch.arange(1.0, 20.0, device=device)   # n = 19: ceil(20 * 0.9) = 18 -> the 18th smallest
    assert float(U.conformal_quantile(s, 0.1)) == 18.0
    assert float(U.conformal_quantile(s, 0.5)) == 10.0
    assert math.isinf(float(U.conformal_quantile(torch.arange(5.0, device=device), 0.1)))   # ceil(6 * 0.9) = 6 > 5


def test_conformal_reward_interval_coverage(device):
    g = torch.Generator().manual_seed(10)
    alpha, n_cal, n_test, trials = 0.1, 200, 200, 200
    covered = []
    for _ in range(trials):
        x = torch.randn(n_cal + n_test, generator=g)
        scale = 0.2 + x.abs()                                   # heteroscedastic noise
        y = 2 * x + scale * torch.randn(n_cal + n_test, generator=g)
        x, scale, y = x.to(device), scale.to(device), y.to(device)
        pred = 2 * x
        iv = U.conformal_reward_interval(pred[:n_cal], y[:n_cal], pred[n_cal:], alpha=alpha,
                                         cal_scale=scale[:n_cal], test_scale=scale[n_cal:])
        covered.append(((y[n_cal:] >= iv.lower) & (y[n_cal:] <= iv.upper)).float().mean())
    cov = float(torch.stack(covered).mean())
    se = math.sqrt(alpha * (1 - alpha) / (n_test * trials)) + 0.01  # + calibration-set variability
    assert cov >= 1 - alpha - 3 * se
    assert cov <= 1 - alpha + 1 / (n_cal + 1) + 3 * se   # not trivially wide
    plain = U.conformal_reward_interval(pred[:n_cal], y[:n_cal], pred[n_cal:], alpha=alpha)
    assert torch.allclose(plain.width, plain.width[0].expand_as(plain.width))


def test_conformal_token_sets_coverage(device):
    g = torch.Generator().manual_seed(11)
    alpha, n, v, trials = 0.2, 300, 20, 60
    cov, sizes = [], []
    for _ in range(trials):
        probs = torch.softmax(torch.randn(2 * n, v, generator=g) * 2, 1)
        lab = torch.multinomial(probs, 1, generator=g).squeeze(1)
        probs, lab = probs.to(device), lab.to(device)
        sets = U.conformal_token_sets(probs[:n], lab[:n], probs[n:], alpha=alpha)
        cov.append(sets.mask[torch.arange(n, device=device), lab[n:]].float().mean())
        sizes.append(sets.sizes.float().mean())
        assert torch.equal(sets.sizes, sets.mask.sum(1))
    c = float(torch.stack(cov).mean())
    se = math.sqrt(alpha * (1 - alpha) / (n * trials)) + 0.01
    assert c >= 1 - alpha - 3 * se
    assert float(torch.stack(sizes).mean()) < v / 2


# ---------------------------------------------------------------------------------------------
# Laplace
# ---------------------------------------------------------------------------------------------

def _bt_data(n, d, device, seed=12):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    fc = torch.randn(n, d, generator=g, dtype=torch.float64)
    fr = torch.randn(n, d, generator=g, dtype=torch.float64)
    flip = torch.rand(n, generator=g, dtype=torch.float64) > torch.sigmoid((fc - fr) @ w)
    fc2 = torch.where(flip[:, None], fr, fc)
    fr2 = torch.where(flip[:, None], fc, fr)
    return fc2.to(device), fr2.to(device), w.to(device)


def test_laplace_precision_is_the_hessian_at_the_mode(device):
    fc, fr, _ = _bt_data(80, 4, device)
    lam = 0.7
    head = U.last_layer_laplace(fc, fr, prior_precision=lam)
    d = fc - fr
    nlp = lambda w: -torch.nn.functional.logsigmoid(d @ w).sum() + 0.5 * lam * (w * w).sum()
    grad = torch.autograd.functional.jacobian(nlp, head.weight)
    assert grad.abs().max() < 1e-6   # the mode
    hess = torch.autograd.functional.hessian(nlp, head.weight)
    torch.testing.assert_close(head.precision, hess, atol=1e-8, rtol=1e-8)
    diag = U.last_layer_laplace(fc, fr, prior_precision=lam, hessian="diag")
    torch.testing.assert_close(diag.precision, torch.diagonal(hess), atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("hessian", ["full", "diag"])
def test_laplace_variance_shrinks_with_data(device, hessian):
    fc, fr, _ = _bt_data(2000, 5, device)
    on = _On(device, seed=0)
    test = on.randn(50, 5, dtype=torch.float64)
    w = on.randn(5, dtype=torch.float64)
    prev = None
    for n in (20, 200, 2000):
        # The same head: only the data (curvature) grows; the variance must shrink for every point.
        head = U.last_layer_laplace(fc[:n], fr[:n], weight=w, prior_precision=1.0, hessian=hessian)
        _, var = head.predict(test)
        assert (var > 0).all()
        if prev is not None:
            assert (var < prev).all()
        prev = var
    small = U.last_layer_laplace(fc[:20], fr[:20], hessian=hessian)
    large = U.last_layer_laplace(fc, fr, hessian=hessian)
    assert float(large.predict(test)[1].mean()) < float(small.predict(test)[1].mean())


def test_laplace_marginal_likelihood_choice_and_probit(device):
    fc, fr, w_true = _bt_data(300, 3, device)
    head = U.last_layer_laplace(fc, fr)
    grid = [10.0 ** (k / 4) for k in range(-16, 17)]
    assert head.prior_precision in grid
    for lam in grid:   # the chosen prior precision maximizes the evidence over the grid
        other = U.last_layer_laplace(fc, fr, prior_precision=lam)
        assert other.log_marginal_likelihood <= head.log_marginal_likelihood + 1e-9
    assert torch.nn.functional.cosine_similarity(head.weight, w_true, dim=0) > 0.9
    p = head.preference_prob(fc[:10], fr[:10])
    mu = (fc[:10] - fr[:10]) @ head.weight
    assert ((p - 0.5).abs() <= (torch.sigmoid(mu) - 0.5).abs() + 1e-12).all()   # pulled towards 1/2
    assert ((p > 0.5) == (mu > 0)).all()


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------

def test_bad_input_tokens(device):
    on = _On(device)
    x = on.randn(2, 3, 10)
    with pytest.raises(ValueError, match="labels"):
        U.token_uncertainty(x, on.tensor([1, 2]))
    with pytest.raises(ValueError, match="labels: value 10"):
        U.token_uncertainty(x, on.tensor([1, 10, 2]))
    with pytest.raises(TypeError, match="labels"):
        U.token_uncertainty(x, on.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(TypeError, match="logits"):
        U.token_uncertainty(x.long())
    with pytest.raises(ValueError, match="logits"):
        U.token_uncertainty(on.randn(10))
    with pytest.raises(ValueError, match="temperature"):
        U.token_uncertainty(x, temperature=0.0)
    with pytest.raises(ValueError, match="logits"):
        U.token_uncertainty(on.randn(0, 3, 10))
    with pytest.raises(ValueError, match="mask"):
        U.sequence_uncertainty(x.unsqueeze(1), mask=on.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="reduction"):
        U.sequence_uncertainty(x.unsqueeze(1), reduction="max")
    with pytest.raises(TypeError, match="ignore_index"):
        U.token_uncertainty(x, ignore_index=1.5)


def test_bad_input_kernel_level(device):
    # The compiled core validates too: descriptors of the wrong shape never reach a kernel.
    on = _On(device)
    x = on.randn(2, 3, 10)
    out = on.empty(2)
    with pytest.raises(ValueError, match="total"):
        kernels.token_uncertainty_forward(desc(x, "logits"), None, desc(out, "total"), desc(out, "expected"),
                                          desc(out, "mutual_info"), None, None, None,
                                          desc(on.empty(2, 3), "lse"), 1.0, -100, stream_of(x))
    with pytest.raises(ValueError, match="q"):
        r = on.randn(3, 4)
        o = on.empty(4)
        kernels.reward_stats(desc(r, "rewards"), None, None, desc(o, "mean"), desc(o, "var"), desc(o, "min"),
                             desc(o, "max"), desc(o, "quantile"), None, 1.0, 1.5, stream_of(r))


def test_bad_input_rewards(device):
    on = _On(device)
    r = on.randn(1, 5)
    for method in ("uwo", "lcb"):
        with pytest.raises(ValueError, match="M >= 2"):
            U.aggregate_rewards(r, method=method)
    with pytest.raises(ValueError, match="M >= 2"):
        U.aggregate_rewards(r, ddof=1)
    one = U.aggregate_rewards(r)   # ddof=0, M = 1: documented variance 0
    assert (one.variance == 0).all() and torch.equal(one.reward, r[0])
    r = on.randn(3, 5)
    with pytest.raises(ValueError, match="method"):
        U.aggregate_rewards(r, method="max")
    with pytest.raises(ValueError, match="member_weights"):
        U.aggregate_rewards(r, member_weights=on.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="member_weights"):
        U.aggregate_rewards(r, member_weights=on.ones(4))
    with pytest.raises(ValueError, match="member_weights"):
        U.aggregate_rewards(r, member_weights=on.tensor([0.0, 1.0, 0.0]), ddof=1)
    with pytest.raises(ValueError, match="q"):
        U.aggregate_rewards(r, method="quantile", q=1.5)
    with pytest.raises(ValueError, match="ddof"):
        U.aggregate_rewards(r, ddof=2)
    with pytest.raises(ValueError, match="variances"):
        U.aggregate_rewards(r, variances=on.ones(3, 4))
    with pytest.raises(TypeError, match="rewards"):
        U.aggregate_rewards(r.long())
    with pytest.raises(ValueError, match="r_rejected"):
        U.preference_uncertainty(r, on.randn(3, 4))
    with pytest.raises(ValueError, match="log_evidence"):
        U.posterior_weights(on.randn(2, 2))


def test_bad_input_calibration_conformal_laplace(device):
    on = _On(device)
    with pytest.raises(ValueError, match="probs"):
        U.calibration(on.tensor([0.2, 1.5]), on.tensor([0, 1]))
    with pytest.raises(ValueError, match="probs"):
        U.calibration(on.tensor([0.2, float("nan")]), on.tensor([0, 1]))
    with pytest.raises(ValueError, match="targets"):
        U.calibration(on.tensor([0.2, 0.5]), on.tensor([0, 2]))
    with pytest.raises(ValueError, match="targets"):
        U.calibration(on.tensor([0.2, 0.5]), on.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="strategy"):
        U.calibration(on.tensor([0.2]), on.tensor([0]), strategy="kmeans")
    for alpha in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            U.conformal_quantile(on.rand(10), alpha)
    with pytest.raises(ValueError, match="cal_target"):
        U.conformal_reward_interval(on.rand(10), on.rand(9), on.rand(3))
    with pytest.raises(ValueError, match="scale"):
        U.conformal_reward_interval(on.rand(10), on.rand(10), on.rand(3), cal_scale=on.rand(10))
    with pytest.raises(ValueError, match="cal_probs"):
        U.conformal_token_sets(on.rand(4, 5) * 2, on.tensor([0, 1, 2, 3]), on.rand(2, 5))
    with pytest.raises(ValueError, match="cal_labels"):
        U.conformal_token_sets(on.rand(4, 5), on.tensor([0, 1, 2, 5]), on.rand(2, 5))
    with pytest.raises(ValueError, match="rejected_features"):
        U.last_layer_laplace(on.randn(5, 3), on.randn(5, 2))
    with pytest.raises(ValueError, match="hessian"):
        U.last_layer_laplace(on.randn(5, 3), on.randn(5, 3), hessian="kfac")
    with pytest.raises(ValueError, match="prior_precision"):
        U.last_layer_laplace(on.randn(5, 3), on.randn(5, 3), prior_precision=0.0)
    with pytest.raises(ValueError, match="min_weight"):
        U.uncertainty_weights(on.randn(3, 4), on.randn(3, 4), min_weight=2.0)


def test_nan_logits_are_not_read_as_certain(device):
    logits = _On(device, seed=13).randn(3, 4, 7)
    logits[1, 2, 3] = float("nan")
    tu = U.token_uncertainty(logits, torch.zeros(4, dtype=torch.long, device=device))
    assert tu.mutual_information[2].isnan() and tu.total_entropy[2].isnan()
    assert torch.isfinite(tu.mutual_information[[0, 1, 3]]).all()


def test_public_names():
    assert pyalign.uncertainty is U
    for name in U.__all__:
        assert hasattr(U, name)


def test_deterministic_and_compiles_without_graph_break(device):
    x = _logits(3, (4, 6), 999, torch.float32, device, seed=9)
    lab = _labels((4, 6), 999, device, seed=9)
    a, b = U.token_uncertainty(x, lab), U.token_uncertainty(x, lab)
    for k in TOKEN_FIELDS:
        assert torch.equal(getattr(a, k), getattr(b, k)), k   # bitwise run to run
    f = torch.compile(lambda t, l: U.token_uncertainty(t, l).logprobs, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(f(x, lab), a.logprobs)
    r = _On(device, seed=14).randn(5, 8)
    g = torch.compile(lambda t: U.aggregate_rewards(t, method="lcb", lam=0.5).reward, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(g(r), U.aggregate_rewards(r, method="lcb", lam=0.5).reward)


def test_nan_logit_in_a_masked_chunk_reaches_every_statistic(device):
    V = 1500
    logits = _On(device, seed=15).randn(2, 3, V)
    logits[0, 1, :700] = -float("inf")
    logits[0, 1, 5] = float("nan")
    tu = U.token_uncertainty(logits, torch.full((3,), V - 1, dtype=torch.long, device=device))
    for name in ("total_entropy", "expected_entropy", "mutual_information", "logprobs"):
        t = getattr(tu, name)
        assert t[1].isnan() and torch.isfinite(t[[0, 2]]).all(), (name, t)


def test_min_max_follow_amin_amax_with_infinities(device):
    r = torch.tensor([[float("inf"), 1.0, float("nan")], [-float("inf"), 2.0, 0.0]], device=device)
    r = r.repeat(1, 300)  # many 256-column chunks: a NaN in one column must not leak into others
    agg = U.aggregate_rewards(r)
    torch.testing.assert_close(agg.min, r.amin(0), equal_nan=True)
    torch.testing.assert_close(agg.max, r.amax(0), equal_nan=True)


# ---- numpy in, numpy out ------------------------------------------------------------------------

def _numpy_cases(np):
    rng = np.random.default_rng(0)
    r = rng.normal(size=(4, 50)).astype(np.float32)
    v = rng.uniform(0.1, 1, size=(4, 50)).astype(np.float32)
    w = np.array([1.0, 2.0, 1.0, 0.5], dtype=np.float32)
    probs = rng.uniform(size=200)
    targets = (rng.uniform(size=200) < probs).astype(np.float64)
    pv = rng.dirichlet(np.ones(7), size=60).astype(np.float32)
    lab = rng.integers(0, 7, size=60)
    return [
        ("aggregate_rewards", (r,), dict(method="uwo", member_weights=w)),
        ("aggregate_rewards", (r,), dict(method="quantile", q=0.25, variances=v)),
        ("posterior_weights", (np.array([-1.0, -2.0, -0.5]),), {}),
        ("heteroscedastic_decomposition", (r, v), {}),
        ("penalized_reward", (r,), dict(method="lcb", lam=0.5)),
        ("preference_uncertainty", (r, r[::-1]), dict(beta=0.7)),  # a negative-stride view
        ("uncertainty_weights", (r, r[::-1] + 0.1), {}),
        ("calibration", (probs, targets), dict(n_bins=10)),
        ("conformal_quantile", (probs,), dict(alpha=np.float32(0.1))),
        ("conformal_reward_interval", (r[0], r[1], r[2]), dict(alpha=0.2)),
        ("conformal_token_sets", (pv[:40], lab[:40], pv[40:]), dict(alpha=0.2)),
    ]


@pytest.mark.parametrize("case", range(11))
def test_numpy_arrays_in_give_numpy_arrays_out(case):
    np = pytest.importorskip("numpy")
    name, args, kwargs = _numpy_cases(np)[case]
    fn = getattr(U, name)
    got = fn(*args, **kwargs)
    want = fn(*(torch.from_numpy(a.copy()) for a in args),
              **{k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()})
    if isinstance(want, torch.Tensor):
        got, want = (got,), (want,)
    assert type(got) is type(want) or isinstance(want, tuple)
    for g, e in zip(got, want):
        if e is None:
            assert g is None
            continue
        assert isinstance(g, np.ndarray), (name, type(g))
        np.testing.assert_array_equal(g, e.numpy())


def test_numpy_inputs_are_not_copied():
    np = pytest.importorskip("numpy")
    r = np.random.default_rng(1).normal(size=(3, 1000)).astype(np.float32)
    seen = {}
    import pyalign.uncertainty.ensembles as ensembles
    orig = ensembles.reward_stats_op

    def spy(r2, *rest):
        seen["ptr"] = r2.data_ptr()
        return orig(r2, *rest)
    ensembles.reward_stats_op = spy
    try:
        U.aggregate_rewards(r, method="mean")
    finally:
        ensembles.reward_stats_op = orig
    assert seen["ptr"] == r.ctypes.data  # the kernel read the caller's buffer
