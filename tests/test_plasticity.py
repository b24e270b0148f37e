"""Plasticity rules, PlasticLinear and consolidation against pyalign.reference.plasticity, plus the
learning properties the rules are known for (Oja/Sanger find principal components, BCM becomes
selective, STDP's sign follows spike order), on every device: inputs are drawn on the CPU from seeded
generators and moved, so a CPU case and its CUDA twin see the same numbers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

from pyalign import plasticity as P
from pyalign._ext import desc, kernels, stream_of
from pyalign.bench.memory import measure
from pyalign.ops.plasticity import plastic_update_, quad_penalty_
from pyalign.reference import plasticity as R

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Relative tolerance of the fused update against the fp64 reference of the same rounded inputs:
# the kernel rounds its fp32 result once to the weight dtype (<= 0.5 ulp) and the fp32 GEMM adds a
# few fp32 ulps; two ulps of the storage dtype cover both.
RTOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}
ATOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-5, torch.float16: 1e-5}
RULES = ["hebb", "anti_hebb", "oja", "sanger", "bcm", "soft_hebb", "stdp", "stdp_triplet", "three_factor",
         "three_factor_ps"]
OPTIONS = {
    "plain": {},
    "decay_bounds_max": dict(weight_decay=0.1, w_min=-0.3, w_max=0.35, norm=1.0, norm_mode="max"),
    "exact_norm": dict(norm=0.7, norm_mode="exact"),
}
# hypothesis tests that take the device fixture: the fixture is a constant string, so that
# hypothesis does not reset it between examples is harmless.
WITH_DEVICE = settings(suppress_health_check=[*settings.default.suppress_health_check,
                                              HealthCheck.function_scoped_fixture])


def _gen(seed):
    return torch.Generator().manual_seed(seed)


class _On:
    """Tensors on one device: ``randn`` and ``rand`` drawn on the CPU from one seeded generator and
    moved, ``zeros``, ``full``, ``ones`` and ``tensor`` made there."""

    def __init__(self, device, seed=0):
        self.device, self.g = device, _gen(seed)

    def randn(self, *shape, dtype=torch.float32):
        return torch.randn(*shape, generator=self.g, dtype=dtype).to(self.device)

    def rand(self, *shape, dtype=torch.float32):
        return torch.rand(*shape, generator=self.g, dtype=dtype).to(self.device)

    def zeros(self, *shape, **kw):
        return torch.zeros(*shape, **kw, device=self.device)

    def ones(self, *shape, **kw):
        return torch.ones(*shape, **kw, device=self.device)

    def full(self, shape, value, **kw):
        return torch.full(shape, value, **kw, device=self.device)

    def tensor(self, data, **kw):
        return torch.tensor(data, **kw).to(self.device)


def _inputs(rule, out_f, in_f, n, dtype, device, seed=0):
    g = _gen(seed)
    w = (torch.randn(out_f, in_f, generator=g, dtype=torch.float64) * 0.3).to(dtype)
    if rule.startswith("stdp"):
        x = (torch.rand(4, n, in_f, generator=g) < 0.3).double()
        y = (torch.rand(4, n, out_f, generator=g) < 0.3).double()
    else:
        x = torch.randn(n, in_f, generator=g, dtype=torch.float64)
        y = torch.randn(n, out_f, generator=g, dtype=torch.float64)
    return w.to(device), x.to(dtype).to(device), y.to(dtype).to(device)


def _run_both(rule, w, x, y, opts, lr=0.05):
    """Runs pyalign's rule (in place on a copy) and the fp64 reference; returns (got, ref) weights
    (and the state pairs for stateful rules)."""
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    dev = w.device
    got = w.clone()
    opts = dict(opts)
    ws = opts.pop("workspace", None)
    popts = dict(opts, workspace=ws) if ws is not None else opts
    wd, xd, yd = (t.double().cpu().clone() for t in (w, x, y))
    states = []
    if rule in ("hebb", "anti_hebb", "oja", "sanger"):
        getattr(P, rule)(got, x, y, lr=lr, **popts)
        ref = getattr(R, rule)(wd, xd, yd, lr=lr, **opts)
    elif rule == "soft_hebb":
        P.soft_hebb(got, x, y, lr=lr, temperature=0.7, **popts)
        ref = R.soft_hebb(wd, xd, yd, lr=lr, temperature=0.7, **opts)
    elif rule == "bcm":
        theta = torch.linspace(0.1, 1.5, w.shape[0], dtype=acc, device=dev)
        theta_ref = theta.double().cpu().clone()
        P.bcm(got, x, y, theta, lr=lr, tau=10.0, **popts)
        ref, theta_ref = R.bcm(wd, xd, yd, theta_ref, lr=lr, tau=10.0, **opts)
        states.append((theta, theta_ref))
    elif rule.startswith("stdp"):
        kw = dict(a_plus=1.0, a_minus=0.8, tau_plus=5.0, tau_minus=8.0)
        if rule == "stdp_triplet":
            kw.update(a3_plus=0.5, a3_minus=0.2, tau_x=12.0, tau_y=15.0)
        xt, yt = P.stdp(got, x, y, lr=lr, **kw, **popts)
        ref, xr, yr = R.stdp(wd, xd, yd, lr=lr, **kw, **opts)
        states += [(xt, xr), (yt, yr)]
    else:
        trace = (torch.randn(w.shape, generator=_gen(5), dtype=torch.float64) * 0.2).to(acc).to(dev)
        trace_ref = trace.double().cpu().clone()
        if rule == "three_factor":
            mod, mod_ref = 0.7, 0.7
        else:
            mod = torch.randn(x.shape[0], generator=_gen(6), dtype=torch.float64).to(acc).to(dev)
            mod_ref = mod.double().cpu().clone()
        P.three_factor(got, x, y, trace, mod, lr=lr, decay=0.8, **popts)
        ref, trace_ref = R.three_factor(wd, xd, yd, trace_ref, mod_ref, lr=lr, decay=0.8, **opts)
        states.append((trace, trace_ref))
    return got, ref, states


def _close(got, ref, dtype, msg=""):
    torch.testing.assert_close(got.double().cpu(), ref.to(dtype).double(), rtol=RTOL[dtype], atol=ATOL[dtype], msg=msg)


@pytest.mark.parametrize("opt", list(OPTIONS))
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("rule", RULES)
def test_fused_matches_eager_formula(device, rule, dtype, opt):
    w, x, y = _inputs(rule, 7, 37, 5, dtype, device)
    got, ref, states = _run_both(rule, w, x, y, OPTIONS[opt])
    assert got.dtype == dtype
    _close(got, ref, dtype, msg=rule)
    for s, s_ref in states:
        torch.testing.assert_close(s.double().cpu(), s_ref, rtol=1e-5, atol=1e-6)


@settings(WITH_DEVICE)
@given(
    out_f=st.integers(1, 9), in_f=st.integers(1, 70), n=st.integers(1, 6),
    rule=st.sampled_from(RULES), dtype=st.sampled_from(DTYPES),
    lr=st.floats(0.0, 0.5), wd=st.sampled_from([0.0, 0.3]),
    bounds=st.sampled_from([None, (-0.2, 0.25), (0.0, 1.0)]),
    norm=st.sampled_from([None, 0.5, 2.0]), norm_mode=st.sampled_from(["max", "exact"]),
    seed=st.integers(0, 2 ** 16),
)
def test_fused_matches_eager_formula_hypothesis(device, out_f, in_f, n, rule, dtype, lr, wd, bounds, norm, norm_mode,
                                                seed):
    opts = dict(weight_decay=wd, norm=norm, norm_mode=norm_mode)
    if bounds:
        opts.update(w_min=bounds[0], w_max=bounds[1])
    w, x, y = _inputs(rule, out_f, in_f, n, dtype, device, seed)
    got, ref, _ = _run_both(rule, w, x, y, opts, lr=lr)
    # Clipping and the norm scaling are Lipschitz, so rounding differences before them stay within the tolerance.
    _close(got, ref, dtype, msg=f"{rule} {opts}")


@settings(WITH_DEVICE)
@given(rule=st.sampled_from(RULES), lr=st.floats(0.0, 50.0), seed=st.integers(0, 2 ** 16),
       bounds=st.sampled_from([(-0.1, 0.1), (0.0, 0.5), (0.2, 0.3)]), norm=st.sampled_from([None, 0.3]),
       dtype=st.sampled_from(DTYPES))
def test_bounds_always_hold(device, rule, lr, seed, bounds, norm, dtype):
    w, x, y = _inputs(rule, 5, 11, 4, dtype, device, seed)
    x, y = x * 10, y * 10
    got, _, _ = _run_both(rule, w, x, y, dict(w_min=bounds[0], w_max=bounds[1], norm=norm), lr=lr)
    # The bounds hold in the weight's dtype (a bound such as 0.1 is itself rounded to bf16/fp16).
    lo, hi = (torch.tensor(b, dtype=dtype, device=device) for b in bounds)
    assert bool((got >= lo).all()) and bool((got <= hi).all())
    if norm is not None and bounds[0] <= 0 <= bounds[1]:
        assert float(got.double().norm(dim=1).max()) <= norm * (1 + 4 * RTOL[dtype])


def test_noncontiguous_weight_and_determinism(device):
    w, x, y = _inputs("oja", 16, 300, 8, torch.float32, device)
    wt = w.t().contiguous().t()  # same values, column-major
    a, b = w.clone(), w.clone()
    P.oja(a, x, y, lr=0.1, norm=1.0)
    P.oja(b, x, y, lr=0.1, norm=1.0)
    P.oja(wt, x, y, lr=0.1, norm=1.0)
    assert torch.equal(a, b)
    assert torch.equal(a, wt)
    big = torch.zeros(16, 310, device=device)
    view = big[:, 5:305]  # rows with a stride other than their length, updated in place
    view.copy_(w)
    P.oja(view, x, y, lr=0.1, norm=1.0)
    assert torch.equal(view, a)
    assert not big[:, :5].any() and not big[:, 305:].any()


def test_leading_dims_flattened(device):
    w, _, _ = _inputs("hebb", 4, 6, 1, torch.float32, device)
    on = _On(device, seed=7)
    x = on.randn(2, 3, 6)
    y = on.randn(2, 3, 4)
    got = P.hebb(w.clone(), x, y, lr=0.1)
    ref = R.hebb(w.double().cpu(), x.double().cpu(), y.double().cpu(), lr=0.1)
    _close(got, ref, torch.float32)


# ---------------------------------------------------------------------------------------------- properties


def _gaussian_data(n, d, eigs, seed):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    z = rng.standard_normal((n, d)) * np.sqrt(np.asarray(eigs))
    return z @ q.T


def test_oja_finds_first_principal_component(device):
    data = _gaussian_data(12000, 10, [6, 2.5, 2, 1.5, 1, 0.8, 0.6, 0.4, 0.3, 0.2], seed=0)
    _, _, vt = np.linalg.svd(data, full_matrices=False)
    pc1 = vt[0]
    x_all = torch.tensor(data, dtype=torch.float32, device=device)
    w = torch.randn(1, 10, generator=_gen(1)).mul_(0.1).to(device)
    for epoch in range(2):
        for i in range(0, x_all.shape[0], 128):
            P.oja(w, x_all[i:i + 128], lr=0.02 / (1 + 2 * epoch))
    v = w[0].double().cpu().numpy()
    cos = abs(v @ pc1) / np.linalg.norm(v)
    assert cos >= 0.99, cos
    assert abs(np.linalg.norm(v) - 1) < 0.05, np.linalg.norm(v)


def test_sanger_recovers_top_components_in_order(device):
    k = 3
    data = _gaussian_data(16000, 8, [8, 4, 2, 0.8, 0.5, 0.3, 0.2, 0.1], seed=2)
    _, _, vt = np.linalg.svd(data, full_matrices=False)
    x_all = torch.tensor(data, dtype=torch.float32, device=device)
    w = torch.randn(k, 8, generator=_gen(3)).mul_(0.1).to(device)
    for epoch in range(3):
        for i in range(0, x_all.shape[0], 128):
            P.sanger(w, x_all[i:i + 128], lr=0.02 / (1 + 2 * epoch))
    wn = w.double().cpu().numpy()
    for i in range(k):
        cos = abs(wn[i] @ vt[i]) / np.linalg.norm(wn[i])
        assert cos >= 0.99, (i, cos)


def test_bcm_becomes_selective(device):
    # Two input patterns shown equally often; an initially unselective unit ends up responding to
    # one of them and not the other (Bienenstock et al. 1982, Fig. 2).
    g = _gen(4)
    patterns = torch.tensor([[1.0, 0.2, 0.0, 0.5], [0.1, 1.0, 0.6, 0.0]], device=device)
    w = torch.full((1, 4), 0.3, device=device)
    theta = torch.zeros(1, device=device)
    before = (patterns @ w.t()).squeeze()
    for _ in range(4000):
        x = patterns[torch.randint(0, 2, (8,), generator=g).to(device)]
        y = torch.relu(x @ w.t())
        P.bcm(w, x, y, theta, lr=0.02, tau=20.0, w_min=0.0)
    after = (patterns @ w.t()).squeeze()
    sel = lambda r: 1 - float(r.min() / r.max())
    assert sel(before) < 0.2
    assert sel(after) > 0.9, after
    assert float(after.max()) > 0.1


def test_stdp_sign_follows_spike_order(device):
    def run(pre_t, post_t):
        pre = torch.zeros(6, 1, 1, device=device)
        post = torch.zeros(6, 1, 1, device=device)
        pre[pre_t] = 1
        post[post_t] = 1
        w = torch.zeros(1, 1, device=device)
        P.stdp(w, pre, post, lr=1.0, tau_plus=5.0, tau_minus=5.0)
        return float(w)
    assert run(0, 3) > 0                                # pre before post: potentiation
    assert run(3, 0) < 0                                # post before pre: depression
    assert run(2, 2) == 0                               # coincident: neither
    assert run(0, 1) > run(0, 4) > 0                    # shorter delay, larger change
    assert run(1, 0) < run(4, 0) < 0


def test_triplet_stdp_post_pre_post_potentiates_more(device):
    # A post spike shortly before a pre-post pair raises the slow post trace, so the triplet rule
    # potentiates the pair more than the pair rule does (Pfister and Gerstner 2006).
    pre = torch.zeros(8, 1, 1, device=device)
    post = torch.zeros(8, 1, 1, device=device)
    post[1] = 1
    pre[3] = 1
    post[5] = 1
    def dw(a3):
        w = torch.zeros(1, 1, device=device)
        P.stdp(w, pre, post, lr=1.0, a_minus=0.0, a3_plus=a3, tau_plus=5.0, tau_y=20.0)
        return float(w)
    assert dw(1.0) > dw(1e-12) > 0


@pytest.mark.parametrize("a3", [0.0, 0.4])
def test_stdp_one_step_with_carried_traces_equals_train(device, a3):
    w, pre, post = _inputs("stdp", 5, 7, 3, torch.float32, device)
    a = w.clone()
    P.stdp(a, pre, post, lr=0.1, a3_plus=a3, a3_minus=a3 / 2)
    rule = P.STDP(0.1, a3_plus=a3, a3_minus=a3 / 2)
    b = w.clone()
    for t in range(pre.shape[0]):
        rule.step(b, pre[t], post[t])
    # One call applies the summed change once; per-step calls apply it step by step. Both are
    # linear in the spikes with a fixed weight, so they agree.
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_three_factor_zero_modulator_leaves_weight(device):
    w, x, y = _inputs("three_factor", 6, 9, 4, torch.float32, device)
    trace = _On(device, seed=8).randn(6, 9)
    for m in (0.0, torch.zeros(4, device=device), torch.tensor(0.0, device=device)):
        got = w.clone()
        tr = trace.clone()
        P.three_factor(got, x, y, tr, m, lr=1.0, decay=0.5, w_min=-10.0, w_max=10.0)
        assert torch.equal(got, w)
        torch.testing.assert_close(tr, 0.5 * trace + y.t() @ x / 4, rtol=1e-5, atol=1e-6)


def test_three_factor_reward_sign(device):
    w, x, y = _inputs("three_factor", 3, 4, 16, torch.float32, device)
    corr = y.t() @ x
    up, down = w.clone(), w.clone()
    P.three_factor(up, x, y, torch.zeros_like(w), 1.0, lr=0.1)
    P.three_factor(down, x, y, torch.zeros_like(w), -1.0, lr=0.1)
    assert bool(((up - w) * corr >= 0).all()) and bool(((down - w) * corr <= 0).all())


# ---------------------------------------------------------------------------------------------- objects


def test_attach_records_and_applies(device):
    torch.manual_seed(0)
    lin = nn.Linear(6, 4, bias=False).to(device)
    w0 = lin.weight.detach().clone()
    rule = P.Oja(0.05, norm=2.0, keep_workspace=device == "cpu")
    handle = P.attach(lin, rule)
    on = _On(device, seed=9)
    x1, x2 = on.randn(3, 6), on.randn(2, 5, 6)
    with torch.no_grad():
        y1, y2 = lin(x1), lin(x2)
    rule.apply()
    x = torch.cat([x1, x2.reshape(-1, 6)])
    y = torch.cat([y1, y2.reshape(-1, 4)])
    ref = R.oja(w0.double().cpu(), x.double().cpu(), y.double().cpu(), lr=0.05, norm=2.0)
    _close(lin.weight.detach(), ref, torch.float32)
    with pytest.raises(RuntimeError, match="no forward pass"):
        rule.apply()
    with pytest.raises(ValueError, match="already attached"):
        P.attach(nn.Linear(2, 2), rule)
    handle.remove()
    with pytest.raises(RuntimeError, match="not attached"):
        rule.apply()


def test_attached_three_factor_and_bcm_objects(device):
    torch.manual_seed(1)
    lin = nn.Linear(5, 3).to(device)
    tf = P.ThreeFactor(0.1, decay=0.5)
    P.attach(lin, tf)
    on = _On(device, seed=10)
    x = on.randn(4, 5)
    w0 = lin.weight.detach().clone()
    with torch.no_grad():
        y = lin(x)
    tf.apply(modulator=2.0)
    ref, tr = R.three_factor(w0.double().cpu(), x.double().cpu(), y.double().cpu(),
                             torch.zeros(3, 5, dtype=torch.float64), 2.0, lr=0.1, decay=0.5)
    _close(lin.weight.detach(), ref, torch.float32)
    torch.testing.assert_close(tf.trace.double().cpu(), tr, rtol=1e-5, atol=1e-6)
    bcm = P.BCM(0.1, tau=5.0)
    w = on.randn(3, 5)
    bcm.step(w, x, x @ w.t())
    assert bcm.theta is not None and bcm.theta.shape == (3,)
    bcm.reset()
    assert bcm.theta is None


# ---------------------------------------------------------------------------------------------- PlasticLinear


@pytest.mark.parametrize("mode", ["decay", "neuromodulated"])
def test_plastic_linear_gradcheck(device, mode):
    torch.manual_seed(0)
    layer = P.PlasticLinear(4, 3, mode=mode, eta=0.3, alpha=0.5, clip=0.4, dtype=torch.float64).to(device)
    names = ["weight", "alpha", "bias"] + (["eta"] if mode == "decay" else [])
    x1 = torch.randn(2, 4, dtype=torch.float64).to(device).requires_grad_()
    x2 = torch.randn(2, 4, dtype=torch.float64).to(device).requires_grad_()
    mod = torch.tensor([0.7, -1.3], dtype=torch.float64, device=device, requires_grad=True)

    def f(x1, x2, mod, *ps):
        # Three steps from a fresh trace: gradients flow through the trace into every input.
        layer.reset_trace()
        state = dict(zip(names, ps))
        kw = {} if mode == "decay" else {"modulator": mod}
        return tuple(torch.func.functional_call(layer, state, (x,), kw) for x in (x1, x2, x1))

    params = tuple(getattr(layer, n).detach().clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(f, (x1, x2, mod) + params)


def test_plastic_linear_matches_reference_and_trace_api(device):
    torch.manual_seed(0)
    layer = P.PlasticLinear(5, 3, mode="neuromodulated", clip=0.05).to(device)
    xs = [torch.randn(4, 5).to(device) for _ in range(3)]
    mod = torch.tensor([1.0, -0.5, 2.0, 0.0], device=device)
    h = None
    for x in xs:
        y = layer(x, modulator=mod)
        y_ref, h = R.plastic_linear_step(x, layer.weight, layer.bias, layer.alpha, None, h, mode="neuromodulated",
                                         modulator=mod, clip=0.05)
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(layer.hebb, h)
    assert bool(layer.hebb.detach().abs().max() <= torch.tensor(0.05, device=device))
    layer.detach_trace()
    assert not layer.hebb.requires_grad
    layer.reset_trace()
    assert layer.hebb is None
    with pytest.raises(ValueError, match="modulator"):
        layer(xs[0])
    d = P.PlasticLinear(5, 3).to(device)
    d(xs[0])
    d(xs[1]).sum().backward()  # through the trace: eta receives a gradient
    assert d.eta.grad is not None and float(d.eta.grad.abs()) > 0
    assert d.alpha.grad is not None and float(d.alpha.grad.abs().sum()) > 0


# ---------------------------------------------------------------------------------------------- consolidation


def _model(seed=0, device="cpu"):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2)).to(device)


def _task_batches(seed, n=3, device="cpu"):
    g = _gen(seed)
    return [(torch.randn(8, 5, generator=g).to(device), torch.randn(8, 2, generator=g).to(device)) for _ in range(n)]


def _perturb(model, seed=9):
    g = _gen(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.device) * 0.3)


def _check_penalty(model, reg, anchors, imps, const=0.0):
    for p in model.parameters():
        p.grad = None
    val = reg.penalty()
    grads = [p.grad.clone() for p in model.parameters()]
    params = [p.detach().double().cpu().requires_grad_(True) for p in model.parameters()]
    ref = R.quadratic_penalty(params, [a.double().cpu() for a in anchors], [i.double().cpu() for i in imps],
                              reg.strength, const)
    ref_grads = torch.autograd.grad(ref, params)
    torch.testing.assert_close(val.double().cpu(), ref.detach(), rtol=1e-5, atol=1e-6)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g.double().cpu(), rg, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("online", [False, True])
def test_ewc_penalty_and_gradient_equal_autograd(device, online):
    model = _model(device=device)
    ewc = P.EWC(model, strength=3.0, online=online, decay=0.5)
    fishers, anchors = [], []
    for task in range(2):
        fisher = [torch.zeros_like(p) for p in model.parameters()]
        for x, t in _task_batches(task, device=device):
            model.zero_grad()
            ((model(x) - t) ** 2).mean().backward()
            ewc.accumulate()
            for f, p in zip(fisher, model.parameters()):
                f += p.grad ** 2
        ewc.consolidate()
        fishers.append([f / 3 for f in fisher])
        anchors.append([p.detach().clone() for p in model.parameters()])
        _perturb(model, seed=10 + task)
    if online:
        imps = [0.5 * a + b for a, b in zip(*fishers)]
        _check_penalty(model, ewc, anchors[1], imps)
    else:
        # Sum of the two tasks' quadratics, each with its own anchor.
        params = [p.detach().double().cpu().requires_grad_(True) for p in model.parameters()]
        ref = sum(R.quadratic_penalty(params, [a.double().cpu() for a in anchors[t]],
                                      [f.double().cpu() for f in fishers[t]], 3.0) for t in range(2))
        ref_grads = torch.autograd.grad(ref, params)
        for p in model.parameters():
            p.grad = None
        val = ewc.penalty()
        torch.testing.assert_close(val.double().cpu(), ref.detach(), rtol=1e-4, atol=1e-5)
        for p, rg in zip(model.parameters(), ref_grads):
            torch.testing.assert_close(p.grad.double().cpu(), rg, rtol=1e-4, atol=1e-6)


def test_si_penalty_and_gradient_equal_autograd(device):
    model = _model(1, device)
    si = P.SynapticIntelligence(model, strength=2.0, xi=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    start = [p.detach().clone() for p in model.parameters()]
    omega = [torch.zeros_like(p) for p in model.parameters()]
    for x, t in _task_batches(3, n=5, device=device):
        opt.zero_grad()
        ((model(x) - t) ** 2).mean().backward()
        prev = [p.detach().clone() for p in model.parameters()]
        opt.step()
        si.accumulate()
        for o, p, q in zip(omega, model.parameters(), prev):
            o -= p.grad * (p.detach() - q)
    si.consolidate()
    anchors = [p.detach().clone() for p in model.parameters()]
    imps = [o.clamp_min(0) / ((a - s) ** 2 + 0.1) for o, a, s in zip(omega, anchors, start)]
    _perturb(model)
    _check_penalty(model, si, anchors, imps)


def test_mas_penalty_and_gradient_equal_autograd(device):
    model = _model(2, device)
    mas = P.MAS(model, strength=0.5)
    imps = [torch.zeros_like(p) for p in model.parameters()]
    for x, _ in _task_batches(4, device=device):
        mas.accumulate(model(x))
        out = model(x)
        gs = torch.autograd.grad(out.pow(2).sum(-1).mean(), list(model.parameters()))
        for i, g in zip(imps, gs):
            i += g.abs() / 3
    mas.consolidate()
    anchors = [p.detach().clone() for p in model.parameters()]
    _perturb(model)
    _check_penalty(model, mas, anchors, imps)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_penalty_kernel_dtypes(device, dtype):
    g = _gen(0)
    n = 3 * 8192 + 17  # several chunks and a tail
    p = torch.randn(n, generator=g, dtype=torch.float64).to(dtype).to(device)
    a = torch.randn(n, generator=g, dtype=torch.float64).to(dtype).to(device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    imp = torch.rand(n, generator=g, dtype=torch.float64).to(acc).to(device)
    grad = torch.randn(n, generator=g, dtype=torch.float64).to(dtype).to(device)
    grad0 = grad.clone()
    val = quad_penalty_(p, a, imp, grad, 0.75).sum(dtype=torch.float64)
    pd, ad, idd = p.double().cpu(), a.double().cpu(), imp.double().cpu()
    ref = 0.75 * (idd * (pd - ad) ** 2).sum()
    torch.testing.assert_close(val.cpu(), ref, rtol=1e-5, atol=0)
    ref_grad = grad0.double().cpu() + 1.5 * idd * (pd - ad)
    _close(grad, ref_grad, dtype)
    # Bitwise reproducible.
    assert torch.equal(quad_penalty_(p, a, imp, None, 0.75), quad_penalty_(p, a, imp, None, 0.75))


@pytest.mark.filterwarnings("ignore:grad and param do not obey")
def test_penalty_noncontiguous_grad_and_no_task_yet(device):
    torch.manual_seed(2)
    lin = nn.Linear(4, 3).to(device)
    ewc = P.EWC(lin, strength=1.0)
    assert float(ewc.penalty()) == 0.0
    lin.weight.grad = torch.zeros(4, 3, device=device).t()  # non-contiguous grad
    lin(_On(device, seed=11).randn(2, 4)).sum().backward()
    ewc.accumulate()
    ewc.consolidate()
    with torch.no_grad():
        lin.weight.add_(0.1)
    g_before = lin.weight.grad.clone()
    ewc.penalty()
    expected = g_before + ewc.importance[0] * 0.1
    torch.testing.assert_close(lin.weight.grad, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- ops + bad input


def test_opcheck(device):
    on = _On(device, seed=12)
    w = on.randn(4, 6)
    g = on.randn(4, 6)
    tr = on.randn(4, 6)
    r = on.rand(4)
    torch.library.opcheck(plastic_update_.op, (w, g, None, None, r, 1.0, 0.0, 0.0, 0.0, 1.0, 0.1, 0.99, -1.0, 1.0, 1.0, 1))
    torch.library.opcheck(plastic_update_.op, (w, g, g.clone(), tr, None, 0.0, 0.5, 1.0, 0.9, 0.25, 0.1, 1.0,
                                               -math.inf, math.inf, 0.0, 0))
    p = on.randn(100)
    torch.library.opcheck(quad_penalty_.op, (p, on.randn(100), on.rand(100), on.zeros(100), 0.5))
    torch.library.opcheck(quad_penalty_.op, (p, on.randn(100), on.rand(100), None, 0.5))


def test_bad_input(device):
    on = _On(device)
    # Checking the values (a host sync) is on by default on CPU only: ask for it on CUDA.
    values = {} if device == "cpu" else {"validate": True}
    w = on.randn(4, 6)
    x, y = on.randn(3, 6), on.randn(3, 4)
    with pytest.raises(ValueError, match="x: expected shape"):
        P.hebb(w, on.randn(3, 5), y, lr=0.1)
    with pytest.raises(ValueError, match="y: expected shape"):
        P.hebb(w, x, on.randn(3, 5), lr=0.1)
    with pytest.raises(ValueError, match="y: expected the leading shape"):
        P.hebb(w, x, on.randn(2, 4), lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        P.oja(w, x, y, lr=-0.1)
    with pytest.raises(ValueError, match="decay"):
        P.EWC([torch.nn.Parameter(on.randn(3))], online=True, decay=1.5)
    with pytest.raises(ValueError, match="weight"):  # overlapping rows cannot be updated in place
        P.hebb(on.randn(40).as_strided((4, 6), (2, 1)), x, y, lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        P.oja(w, x, y, lr=float("nan"))
    with pytest.raises(ValueError, match="x: contains NaN"):
        P.oja(w, on.full((3, 6), float("nan")), y, lr=0.1, **values)
    with pytest.raises(ValueError, match="y: contains NaN"):
        P.hebb(w, x, on.full((3, 4), float("inf")), lr=0.1, **values)
    with pytest.raises(ValueError, match="w_min"):
        P.hebb(w, x, y, lr=0.1, w_min=1.0, w_max=0.0)
    with pytest.raises(ValueError, match="norm"):
        P.hebb(w, x, y, lr=0.1, norm=0.0)
    with pytest.raises(ValueError, match="norm_mode"):
        P.hebb(w, x, y, lr=0.1, norm=1.0, norm_mode="l1")
    with pytest.raises(ValueError, match="weight: expected a 2-d"):
        P.hebb(on.randn(6), x, y, lr=0.1)
    with pytest.raises(TypeError, match="weight: expected a floating"):
        P.hebb(on.zeros(4, 6, dtype=torch.int64), x, y, lr=0.1)
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        P.hebb(w, [1.0] * 6, y, lr=0.1)
    with pytest.raises(ValueError, match="theta: expected shape"):
        P.bcm(w, x, y, on.zeros(3), lr=0.1)
    with pytest.raises(TypeError, match="theta: expected dtype"):
        P.bcm(w, x, y, on.zeros(4, dtype=torch.float64), lr=0.1)
    with pytest.raises(ValueError, match="tau"):
        P.bcm(w, x, y, on.zeros(4), lr=0.1, tau=0.5)
    with pytest.raises(ValueError, match="trace: expected shape"):
        P.three_factor(w, x, y, on.zeros(6, 4), 1.0, lr=0.1)
    with pytest.raises(ValueError, match="modulator: expected"):
        P.three_factor(w, x, y, on.zeros(4, 6), on.ones(5), lr=0.1)
    with pytest.raises(ValueError, match="modulator"):
        P.three_factor(w, x, y, on.zeros(4, 6), float("nan"), lr=0.1)
    with pytest.raises(ValueError, match="decay"):
        P.three_factor(w, x, y, on.zeros(4, 6), 1.0, lr=0.1, decay=1.5)
    with pytest.raises(ValueError, match="pre: expected spikes"):
        P.stdp(w, on.zeros(6), on.zeros(4), lr=0.1)
    with pytest.raises(ValueError, match="post: expected the leading shape"):
        P.stdp(w, on.zeros(2, 3, 6), on.zeros(2, 2, 4), lr=0.1)
    with pytest.raises(ValueError, match="pre_trace: expected shape"):
        P.stdp(w, on.zeros(2, 3, 6), on.zeros(2, 3, 4), on.zeros(2, 6), lr=0.1)
    with pytest.raises(ValueError, match="mode"):
        P.PlasticLinear(3, 2, mode="hebbian")
    with pytest.raises(ValueError, match="in_features"):
        P.PlasticLinear(0, 2)
    with pytest.raises(ValueError, match="params"):
        P.EWC([on.zeros(3)])
    with pytest.raises(RuntimeError, match="accumulate"):
        P.EWC(nn.Linear(2, 2)).consolidate()
    with pytest.raises(TypeError, match="rule"):
        P.attach(nn.Linear(2, 2), "oja")
    with pytest.raises(ValueError, match="module"):
        P.attach(nn.ReLU(), P.Oja(0.1))
    # The compiled core rejects what the Python layer would never send.
    with pytest.raises(ValueError, match="g.*expected the shape"):
        kernels.plastic_update(desc(w, "weight"), desc(on.zeros(3, 6), "g"), None, None, None,
                          1.0, 0.0, 0.0, 0.0, 1.0, 0.1, 1.0, -1.0, 1.0, 0.0, 0, stream_of(w))
    with pytest.raises(ValueError, match="expected dtype float32"):
        kernels.plastic_update(desc(w, "weight"), desc(on.zeros(4, 6, dtype=torch.float64), "g"), None, None, None,
                          1.0, 0.0, 0.0, 0.0, 1.0, 0.1, 1.0, -1.0, 1.0, 0.0, 0, stream_of(w))


def test_custom_op_and_direct_call_agree(device):
    """The eager fast path (a direct call) and the registered custom op give bitwise the same updates."""
    on = _On(device, seed=13)
    w, x, y = _inputs("three_factor", 5, 33, 4, torch.float32, device)
    g = y.float().t() @ x.float()
    args = (g, g.clone() * 0.5, None, on.rand(5), 0.3, 0.2, 0.1, 0.9, 0.25, 0.1, 0.99,
            -0.4, 0.4, 1.5, 1)
    t1, t2 = torch.ones_like(g), torch.ones_like(g)
    a, b = w.clone(), w.clone()
    plastic_update_(a, args[0], args[1], t1, *args[3:])
    plastic_update_.op(b, args[0], args[1], t2, *args[3:])
    assert torch.equal(a, b) and torch.equal(t1, t2)
    p, an, imp = w.flatten(), on.zeros(165), on.rand(165)
    assert torch.equal(quad_penalty_(p, an, imp, None, 0.5), quad_penalty_.op(p, an, imp, None, 0.5))


@pytest.mark.parametrize("rule", RULES)
def test_workspace_gives_same_result(device, rule):
    w, x, y = _inputs(rule, 6, 10, 3, torch.float32, device)
    a, _, sa = _run_both(rule, w, x, y, {"norm": 1.0})
    b, _, sb = _run_both(rule, w, x, y, {"norm": 1.0, "workspace": torch.full((6, 10), float("nan"), device=device)})
    assert torch.equal(a, b)
    for (s1, _), (s2, _) in zip(sa, sb):
        assert torch.equal(s1, s2)


def test_bad_workspace(device):
    on = _On(device)
    w, x, y = on.randn(4, 6), on.randn(3, 6), on.randn(3, 4)
    with pytest.raises(ValueError, match="workspace: expected a contiguous torch.float32"):
        P.hebb(w, x, y, lr=0.1, workspace=on.zeros(6, 4))
    with pytest.raises(ValueError, match="workspace"):
        P.hebb(w, x, y, lr=0.1, workspace=on.zeros(4, 6, dtype=torch.float64))


@pytest.mark.parametrize("rule", ["hebb", "oja", "three_factor"])
def test_fp32_rules_allocate_no_weight_sized_product(device, rule):
    """The product of an fp32 rule goes into the weight (or the trace) through addmm_: the update's
    peak memory (torch's allocator accounting, deterministic) stays far below one weight-sized
    [out, in] buffer, with the norm constraint and the bounds on."""
    w, x, y = _inputs("oja", 256, 512, 8, torch.float32, device)
    trace = torch.zeros_like(w)
    opts = dict(lr=0.01, w_min=-0.5, w_max=0.5, norm=1.0)
    run = {"hebb": lambda: P.hebb(w, x, y, **opts), "oja": lambda: P.oja(w, x, y, **opts),
           "three_factor": lambda: P.three_factor(w, x, y, trace, 0.5, **opts)}[rule]
    run()  # CUDA: cuBLAS's workspace comes from torch's allocator on the first GEMM
    _, mem = measure(run, device)
    assert mem.peak < w.numel() * 4 // 8, mem


def test_update_without_product_refuses_trace_and_g2(device):
    on = _On(device)
    w, e = on.randn(4, 6), on.zeros(4, 6)
    with pytest.raises(ValueError, match="g: expected a float32 tensor"):
        plastic_update_(w, None, None, e, None, 1.0, 0.0, 0.0, 0.9, 1.0, 0.1, 1.0, -1.0, 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="g: expected a float32 tensor"):
        plastic_update_(w, None, e, e, None, 1.0, 0.0, 1.0, 0.9, 1.0, 0.1, 1.0, -1.0, 1.0, 0.0, 0)
    # Without a product the update is the formula with G = 0: w' = clip(s_i (keep - lr r_i) w).
    r = on.rand(4)
    got = w.clone()
    plastic_update_(got, None, None, None, r, 1.0, 0.0, 0.0, 0.0, 1.0, 0.1, 0.99, -0.5, 0.5, 0.0, 0)
    want = ((0.99 - 0.1 * r)[:, None] * w).clamp(-0.5, 0.5)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_torch_compile_fullgraph(device):
    # Under torch.compile the rules go through the custom op (validate=False: no host check).
    w, x, y = _inputs("oja", 4, 6, 3, torch.float32, device)
    trace = torch.zeros(4, 6, device=device)
    f = torch.compile(lambda w, x, y, e: P.three_factor(P.oja(w, x, y, lr=0.1, validate=False, norm=1.0), x, y, e, 0.5,
                                                        lr=0.1, validate=False), fullgraph=True)
    a, b = w.clone(), w.clone()
    ea, eb = trace.clone(), trace.clone()
    f(a, x, y, ea)
    P.three_factor(P.oja(b, x, y, lr=0.1, norm=1.0), x, y, eb, 0.5, lr=0.1)
    assert torch.equal(a, b) and torch.equal(ea, eb)


@pytest.mark.parametrize("rule", ["hebb", "anti_hebb", "oja", "bcm", "soft_hebb", "three_factor", "three_factor_per_sample"])
def test_row_blocked_update_equals_the_whole_product(monkeypatch, rule):
    """Without a workspace a large CPU weight is updated by row blocks (the GEMM of each block, then
    the kernel on its rows); a tiny block size here forces several blocks and a partial last one.
    The result must match the update from the whole product (the workspace path), traces and
    thresholds included."""
    from pyalign.plasticity import _update

    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(37, 10, generator=g) * 0.3
    x, y = torch.randn(5, 10, generator=g), torch.randn(5, 37, generator=g)
    trace0, theta0 = torch.randn(37, 10, generator=g), torch.rand(37, generator=g)
    mod = torch.randn(5, generator=g)
    opts = dict(lr=0.05, weight_decay=0.01, norm=1.0, w_min=-0.4, w_max=0.4)

    def run(blocked):
        w, trace, theta = w0.clone(), trace0.clone(), theta0.clone()
        ws = None if blocked else torch.empty_like(w)
        if rule == "bcm":
            P.bcm(w, x, y, theta, workspace=ws, **opts)
        elif rule == "soft_hebb":
            P.soft_hebb(w, x, workspace=ws, **opts)
        elif rule.startswith("three_factor"):
            P.three_factor(w, x, y, trace, mod if rule.endswith("per_sample") else 0.7, workspace=ws, **opts)
        else:
            getattr(P, rule)(w, x, y, workspace=ws, **opts)
        return w, trace, theta

    monkeypatch.setattr(_update, "_BLOCK_ELEMS", 60)  # blocks of 6 rows: 6 full ones and one of 1
    for got, want in zip(run(True), run(False)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert not torch.equal(run(True)[0], w0)  # the update did something
