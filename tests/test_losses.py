"""Preference losses against plain-PyTorch references written from the papers' formulas.

Tolerances: float64 inputs are compared at 1e-9 relative. For float32/bfloat16/float16 inputs the
kernel computes in float32; its error against the float64 reference evaluated on the same rounded
inputs must be at most twice the error of the same formula evaluated eagerly by PyTorch in float32
on those inputs (gradients rounded to the input dtype on all sides), plus a floor of 1e-6 relative
to the value's scale and, for gradients, one unit of rounding to the input dtype.

Every test that can run on CUDA takes the ``device`` fixture; inputs are drawn on the CPU from seeded
generators and moved, so a CPU case and its CUDA twin see the same numbers.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import pyalign
from pyalign import losses as L
from pyalign._ext import desc, kernels, stream_of
from pyalign.ops.losses import DPO_TYPES, F_DIVERGENCES, PARAM_NAMES, params_list, preference_loss_op
from pyalign.reference import losses as R

SMOOTH = {"sigmoid": 0.1, "robust": 0.2, "exo_pair": 1e-3, "aot": 0.1, "aot_unpaired": 0.1}
F_DIV_TYPES = ["sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"]
REF_FREE_TYPES = ["sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"]
# hypothesis tests that take the device fixture: the fixture is a constant string, so that
# hypothesis does not reset it between examples is harmless.
WITH_DEVICE = settings(suppress_health_check=[*settings.default.suppress_health_check,
                                              HealthCheck.function_scoped_fixture])


def make_batch(n, *, seed=0, dtype=torch.float64, device="cpu", spread=3.0):
    """Summed log-probs of chosen/rejected completions, a nearby reference, lengths, weights."""
    g = torch.Generator().manual_seed(seed)
    lc = torch.randint(1, 60, (n,), generator=g)
    lr = torch.randint(1, 60, (n,), generator=g)
    rc = -(torch.rand(n, generator=g, dtype=torch.float64) * 1.5 + 0.2) * lc
    rr = -(torch.rand(n, generator=g, dtype=torch.float64) * 1.5 + 0.2) * lr
    pc = rc + torch.randn(n, generator=g, dtype=torch.float64) * spread
    pr = rr + torch.randn(n, generator=g, dtype=torch.float64) * spread
    w = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    cast = lambda t: t.to(dtype=dtype, device=device)
    return dict(pc=cast(pc), pr=cast(pr), rc=cast(rc), rr=cast(rr), lc=lc.to(device), lr=lr.to(device), w=cast(w))


def randn(n, device, seed):
    """A seeded float64 normal vector on ``device`` (an upstream gradient, say)."""
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device)


def leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def grads_of(loss, ts, upstream=None):
    if upstream is None:
        upstream = torch.ones_like(loss)
    gs = torch.autograd.grad(loss, ts, upstream, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(gs, ts)]


def close(actual, expected, rtol=1e-9, atol=1e-12):
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol)


def check_metrics(m, expected, rtol=1e-9, atol=1e-12):
    for k, v in expected.items():
        close(m[k], torch.as_tensor(v, dtype=torch.float64), rtol, atol)


# ------------------------------------------------------------------------------------------
# DPO family vs the reference (float64)

def run_dpo_both(b, loss_type, *, ref=True, weights=True, reduction="mean", upstream=None, **kw):
    """pyalign and the reference on the same leaves; returns ((loss, grads, metrics), (loss, grads))."""
    names = ["pc", "pr", "rc", "rr", "w"] if ref else ["pc", "pr", "w"]
    xs = leaves(*[b[k] for k in names])
    d = dict(zip(names, xs))
    w = d["w"] if weights else None
    args = (d["pc"], d["pr"], d.get("rc"), d.get("rr"))
    loss, m = L.dpo_loss(*args, loss_type=loss_type, chosen_lengths=b["lc"], rejected_lengths=b["lr"],
                         weights=w, reduction=reduction, **kw)
    g = grads_of(loss, xs, upstream)
    ys = leaves(*[b[k] for k in names])
    e = dict(zip(names, ys))
    per = R.dpo_losses(e["pc"], e["pr"], e.get("rc"), e.get("rr"), loss_type=loss_type,
                       chosen_lengths=b["lc"], rejected_lengths=b["lr"], **kw)
    ref_loss = R.reduce(per, e["w"] if weights else None, reduction)
    rg = grads_of(ref_loss, ys, upstream)
    return (loss, g, m), (ref_loss, rg)


@pytest.mark.parametrize("loss_type", DPO_TYPES)
def test_dpo_each_type_matches_reference(device, loss_type):
    b = make_batch(13, seed=1, device=device)
    kw = dict(label_smoothing=SMOOTH.get(loss_type, 0.0), beta=0.3)
    (loss, g, m), (rl, rg) = run_dpo_both(b, loss_type, **kw)
    assert loss.dtype == torch.float64 and loss.shape == ()
    close(loss, rl)
    for a, e in zip(g, rg):
        close(a, e)
    check_metrics(m, R.dpo_metrics(b["pc"], b["pr"], b["rc"], b["rr"], beta=0.3))
    assert set(m) == {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                      "logps/chosen", "logps/rejected"}


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "apo_down", "discopop", "sft"])
def test_dpo_reductions_and_weights(device, reduction, loss_type):
    b = make_batch(9, seed=2, device=device)
    up = randn(9, device, seed=102) if reduction == "none" else None
    (loss, g, _), (rl, rg) = run_dpo_both(b, loss_type, reduction=reduction, upstream=up, beta=0.2)
    assert loss.shape == ((9,) if reduction == "none" else ())
    close(loss, rl)
    for a, e in zip(g, rg):  # includes d loss / d weights
        close(a, e)


@pytest.mark.parametrize("f_divergence", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("loss_type", F_DIV_TYPES)
def test_dpo_f_divergences(device, f_divergence, loss_type):
    b = make_batch(11, seed=3, device=device, spread=1.0)
    kw = dict(label_smoothing=SMOOTH.get(loss_type, 0.0), f_divergence=f_divergence, f_alpha=0.3, beta=0.5)
    (loss, g, _), (rl, rg) = run_dpo_both(b, loss_type, **kw)
    close(loss, rl)
    for a, e in zip(g, rg):
        close(a, e)


@pytest.mark.parametrize("f_divergence", F_DIVERGENCES)
def test_f_divergence_scores_vanish_at_zero_log_ratio(device, f_divergence):
    """TRL's f'(u) are zero at u = 1 (constants kept), so with policy == reference the length-
    normalized losses do not depend on the lengths: ipo = 1/(4 beta^2), sigmoid_norm = log 2. With
    the constants dropped (-1 for forward KL, -log 2 for JS, 1/(a-1) for alpha) they would be
    (c/L_c - c/L_r - 1/(2 beta))^2 and -log sigmoid(beta c (1/L_c - 1/L_r))."""
    b = make_batch(9, seed=30, device=device)
    beta = 0.4
    kw = dict(f_divergence=f_divergence, f_alpha=0.3, beta=beta, chosen_lengths=b["lc"], rejected_lengths=b["lr"],
              reduction="none")
    ipo, _ = L.dpo_loss(b["rc"], b["rr"], b["rc"], b["rr"], loss_type="ipo", **kw)
    close(ipo, torch.full_like(ipo, 1 / (4 * beta ** 2)), rtol=1e-12, atol=0)
    sn, _ = L.dpo_loss(b["rc"], b["rr"], b["rc"], b["rr"], loss_type="sigmoid_norm", **kw)
    close(sn, torch.full_like(sn, math.log(2)), rtol=1e-12, atol=0)


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm"])
def test_f_divergence_length_normalized_losses_written_out(device, loss_type):
    """ipo / sigmoid_norm with each f-divergence against the scores written out from TRL's
    definitions (forward KL 1 - 1/u, JS log(2u/(1+u)), alpha (u^(a-1) - 1)/(a-1), u = exp(r))."""
    b = make_batch(12, seed=31, device=device, spread=1.0)
    beta, a = 0.3, 0.3
    scores = {
        "reverse_kl": lambda r: r,
        "forward_kl": lambda r: 1 - 1 / torch.exp(r),
        "js_divergence": lambda r: torch.log(2 * torch.exp(r) / (1 + torch.exp(r))),
        "alpha_divergence": lambda r: (torch.exp(r) ** (a - 1) - 1) / (a - 1),
    }
    Lc, Lr = b["lc"].double(), b["lr"].double()
    for fd, f in scores.items():
        x = (f(b["pc"] - b["rc"]) / Lc - f(b["pr"] - b["rr"]) / Lr)
        want = (x - 1 / (2 * beta)) ** 2 if loss_type == "ipo" else -torch.nn.functional.logsigmoid(beta * x)
        got, _ = L.dpo_loss(b["pc"], b["pr"], b["rc"], b["rr"], loss_type=loss_type, f_divergence=fd, f_alpha=a,
                            beta=beta, chosen_lengths=b["lc"], rejected_lengths=b["lr"], reduction="none")
        close(got, want, rtol=1e-10, atol=1e-13)


def test_alpha_divergence_limit_is_reverse_kl(device):
    b = make_batch(7, seed=4, device=device)
    l1, _ = L.dpo_loss(b["pc"], b["pr"], b["rc"], b["rr"], f_divergence="alpha_divergence", f_alpha=1.0)
    l2, _ = L.dpo_loss(b["pc"], b["pr"], b["rc"], b["rr"])
    close(l1, l2, rtol=0, atol=0)


@pytest.mark.parametrize("loss_type", REF_FREE_TYPES)
def test_dpo_reference_free(device, loss_type):
    b = make_batch(10, seed=5, device=device)
    (loss, g, m), (rl, rg) = run_dpo_both(b, loss_type, ref=False, label_smoothing=SMOOTH.get(loss_type, 0.0),
                                          beta=0.05)
    close(loss, rl)
    for a, e in zip(g, rg):
        close(a, e)
    check_metrics(m, R.dpo_metrics(b["pc"], b["pr"], beta=0.05))


def test_dpo_loss_lists_mpo_rpo_and_aot_mixture(device):
    b = make_batch(17, seed=6, device=device)
    # MPO: sigmoid + bco_pair + sft with weights.
    (loss, g, _), (rl, rg) = run_dpo_both(b, ["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], beta=0.1)
    close(loss, rl)
    for a, e in zip(g, rg):
        close(a, e)
    # aot and aot_unpaired mixed with a per-pair loss, per-pair weights: the cross-pair gradients.
    (loss, g, _), (rl, rg) = run_dpo_both(b, ["aot", "sigmoid", "aot_unpaired"], loss_weights=[0.5, 1.0, 2.0],
                                          label_smoothing=0.05, beta=0.2, reduction="sum")
    close(loss, rl)
    for a, e in zip(g, rg):
        close(a, e)
    # rpo_alpha is the sft term.
    l1, _ = L.dpo_loss(b["pc"], b["pr"], b["rc"], b["rr"], rpo_alpha=0.7, chosen_lengths=b["lc"])
    l2, _ = L.dpo_loss(b["pc"], b["pr"], b["rc"], b["rr"], loss_type=["sigmoid", "sft"], loss_weights=[1, 0.7],
                       chosen_lengths=b["lc"])
    close(l1, l2, rtol=0, atol=0)


@settings(WITH_DEVICE)
@given(n=st.integers(1, 64), type_idx=st.integers(0, len(DPO_TYPES) - 1), seed=st.integers(0, 10_000),
       beta=st.floats(0.01, 5.0), spread=st.floats(0.01, 30.0), reduction=st.sampled_from(["mean", "sum"]),
       weighted=st.booleans())
def test_dpo_hypothesis(device, n, type_idx, seed, beta, spread, reduction, weighted):
    t = DPO_TYPES[type_idx]
    b = make_batch(n, seed=seed, spread=spread, device=device)
    (loss, g, _), (rl, rg) = run_dpo_both(b, t, beta=beta, reduction=reduction, weights=weighted,
                                          label_smoothing=SMOOTH.get(t, 0.0))
    scale = max(1.0, rl.abs().item())
    close(loss, rl, rtol=1e-9, atol=1e-11 * scale)
    for a, e in zip(g, rg):
        close(a, e, rtol=1e-8, atol=1e-11 * max(1.0, e.abs().max().item()))


def _errors(fn_kernel, fn_ref, inputs, dtype):
    """Kernel, fp64 truth and eager fp32 on the same (already rounded) inputs: (loss, grads) each.

    The truth is the reference evaluated in fp64 on the inputs as the kernel sees them (rounded to
    ``dtype``), so input rounding is not counted as error; gradients of all three are rounded to
    ``dtype``, as autograd returns them in the input's dtype."""
    def run(fn, cast_dtype):
        xs = leaves(*[x.to(cast_dtype) for x in inputs])
        out = fn(xs, cast_dtype)
        gs = grads_of(out, xs)
        return out.double(), [gg.to(dtype).double() for gg in gs]
    k_out, k_g = fn_kernel(inputs)
    t_out, t_g = run(fn_ref, torch.float64)
    e_out, e_g = run(fn_ref, torch.float32)
    return (k_out, k_g), (t_out, t_g), (e_out, e_g), dtype


def assert_within_eager(kernel, truth, eager, dtype):
    """Error against the fp64 truth at most twice eager fp32 PyTorch's, plus a floor: 1e-6 of the
    value's scale, and for gradients one unit of rounding to ``dtype`` at that scale (the kernel's
    fp32 gradient and eager's may round to neighbouring ``dtype`` values)."""
    (k_out, k_g), (t_out, t_g), (e_out, e_g) = kernel, truth, eager
    ulp = torch.finfo(dtype).eps

    def ok(k, t, e, what, rounded):
        tmax = t.abs().max().item()
        floor = 1e-6 * max(1.0, tmax) + (ulp * tmax if rounded else 0.0)
        err_k = (k.double().cpu() - t.double().cpu()).abs().max().item()
        err_e = (e.double().cpu() - t.double().cpu()).abs().max().item()
        assert err_k <= 2 * err_e + floor, (what, err_k, err_e, floor)
    ok(k_out, t_out, e_out, "loss", False)
    for i, (k, t, e) in enumerate(zip(k_g, t_g, e_g)):
        ok(k, t, e, f"grad {i}", True)


LOW_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("loss_type", DPO_TYPES)
def test_dpo_low_precision(device, dtype, loss_type):
    b = make_batch(24, seed=7, dtype=dtype, device=device)
    ins = [b["pc"], b["pr"], b["rc"], b["rr"], b["w"]]
    kw = dict(loss_type=loss_type, beta=0.2, label_smoothing=SMOOTH.get(loss_type, 0.0))

    def kernel(inputs):
        xs = leaves(*inputs)
        loss, _ = L.dpo_loss(*xs[:4], weights=xs[4], chosen_lengths=b["lc"], rejected_lengths=b["lr"], **kw)
        assert loss.dtype == torch.float32
        gs = grads_of(loss, xs)
        assert all(gg.dtype == dtype for gg in gs)
        return loss, gs

    def ref(xs, dt):
        per = R.dpo_losses(*xs[:4], chosen_lengths=b["lc"], rejected_lengths=b["lr"], dtype=dt,
                           **{k: v for k, v in kw.items() if k != "loss_type"}, loss_type=loss_type)
        return R.reduce(per, xs[4])

    assert_within_eager(*_errors(kernel, ref, ins, dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm", "sigmoid"])
@pytest.mark.parametrize("f_divergence", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_dpo_f_divergence_low_precision(device, dtype, loss_type, f_divergence):
    b = make_batch(24, seed=32, dtype=dtype, device=device, spread=1.0)
    ins = [b["pc"], b["pr"], b["rc"], b["rr"]]
    kw = dict(beta=0.2, f_divergence=f_divergence, f_alpha=0.3, chosen_lengths=b["lc"], rejected_lengths=b["lr"])

    def kernel(inputs):
        xs = leaves(*inputs)
        loss, _ = L.dpo_loss(*xs, loss_type=loss_type, **kw)
        return loss, grads_of(loss, xs)

    assert_within_eager(*_errors(kernel, lambda xs, dt: R.dpo_losses(*xs, loss_type=loss_type, dtype=dt, **kw).mean(),
                                 ins, dtype))


def _family_case(family, b, dtype, device):
    """(inputs, kernel loss fn, reference loss fn(xs, dt)) for the non-DPO families."""
    lc, lr = b["lc"], b["lr"]
    desirable = torch.arange(lc.shape[0], device=device) % 3 != 1
    if family == "kto":
        kl = dict(policy_kl_logps=b["pr"], ref_kl_logps=b["rr"] - 0.3)
        ins = [b["pc"], b["rc"], b["w"]]
        ours = lambda xs: L.kto_loss(xs[0], xs[1], desirable, weights=xs[2], beta=0.2, desirable_weight=1.3,
                                     undesirable_weight=0.7, **kl)[0]
        ref = lambda xs, dt: R.reduce(R.kto_losses(xs[0], xs[1], desirable, policy_kl=kl["policy_kl_logps"],
                                                   ref_kl=kl["ref_kl_logps"], beta=0.2, desirable_weight=1.3,
                                                   undesirable_weight=0.7, dtype=dt), xs[2])
    elif family == "apo_zero_unpaired":
        ins = [b["pc"], b["rc"]]
        ours = lambda xs: L.kto_loss(xs[0], xs[1], desirable, beta=0.2, loss_type=family)[0]
        ref = lambda xs, dt: R.kto_losses(xs[0], xs[1], desirable, beta=0.2, loss_type=family, dtype=dt).mean()
    elif family == "bco":
        ins = [b["pc"], b["rc"]]

        def ours(xs):
            run = L.BCORunningMean()
            run.state = torch.tensor([0.3, 2.0], device=device)
            return L.bco_loss(xs[0], xs[1], desirable, run, beta=0.2)[0]
        ref = lambda xs, dt: R.bco_losses(xs[0], xs[1], desirable, running_mean=0.3, running_count=2, beta=0.2,
                                          dtype=dt)[0].mean()
    elif family == "orpo":
        ins = [-b["pc"].abs() - 1e-2, -b["pr"].abs() - 1e-2, b["w"]]
        ours = lambda xs: L.orpo_loss(xs[0], xs[1], chosen_lengths=lc, rejected_lengths=lr, beta=0.25, weights=xs[2])[0]
        ref = lambda xs, dt: R.reduce(R.orpo_losses(xs[0], xs[1], lc, lr, beta=0.25, dtype=dt)[0], xs[2])
    elif family in ("cpo", "cpo_hinge", "cpo_ipo", "simpo", "alphapo"):
        lt = {"cpo": "sigmoid", "cpo_hinge": "hinge", "cpo_ipo": "ipo", "simpo": "simpo", "alphapo": "simpo"}[family]
        kw = dict(loss_type=lt, beta=2.0 if lt == "simpo" else 0.1, gamma=0.8, alpha=0.25 if family == "alphapo" else 0.0,
                  cpo_alpha=0.6, label_smoothing=0.1 if lt in ("sigmoid", "simpo") else 0.0)
        ins = [b["pc"], b["pr"]]
        ours = lambda xs: L.cpo_loss(xs[0], xs[1], chosen_lengths=lc, rejected_lengths=lr, **kw)[0]
        ref = lambda xs, dt: R.cpo_losses(xs[0], xs[1], lc=lc, lr=lr, dtype=dt, **kw)[0].mean()
    else:  # rm
        ins = [b["pc"] / 10, b["pr"] / 10, (b["rc"] / 50).abs(), b["w"]]
        ours = lambda xs: L.reward_model_loss(xs[0], xs[1], margin=xs[2], center_rewards_coefficient=0.01,
                                              weights=xs[3])[0]
        ref = lambda xs, dt: R.reduce(R.rm_losses(xs[0], xs[1], margin=xs[2], center=0.01, dtype=dt), xs[3])
    return [x.to(dtype) for x in ins], ours, ref


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("family", ["kto", "apo_zero_unpaired", "bco", "orpo", "cpo", "cpo_hinge", "cpo_ipo", "simpo",
                                    "alphapo", "rm"])
def test_other_families_low_precision(device, dtype, family):
    b = make_batch(24, seed=33, device=device)
    ins, ours, ref = _family_case(family, b, dtype, device)

    def kernel(inputs):
        xs = leaves(*inputs)
        loss = ours(xs)
        assert loss.dtype == torch.float32
        gs = grads_of(loss, xs)
        assert all(gg.dtype == dtype for gg in gs)
        return loss, gs

    assert_within_eager(*_errors(kernel, ref, ins, dtype))


# ------------------------------------------------------------------------------------------
# Properties

def test_sigmoid_loss_decreases_in_margin(device):
    margins = torch.linspace(-50, 50, 201, dtype=torch.float64, device=device)
    zero = torch.zeros_like(margins)
    loss, _ = L.dpo_loss(margins, zero, zero, zero, beta=0.1, reduction="none")
    assert bool((loss[1:] < loss[:-1]).all())
    # and its gradient w.r.t. the chosen log-prob is negative everywhere
    x = margins.clone().requires_grad_(True)
    l2, _ = L.dpo_loss(x, zero, zero, zero, beta=0.1, reduction="sum")
    (gx,) = torch.autograd.grad(l2, x)
    assert bool((gx < 0).all())


def test_robust_with_zero_smoothing_equals_sigmoid(device):
    b = make_batch(31, seed=8, device=device)
    xs = leaves(b["pc"], b["pr"], b["rc"], b["rr"])
    l1, _ = L.dpo_loss(*xs, loss_type="robust", label_smoothing=0.0, reduction="none")
    l2, _ = L.dpo_loss(*xs, loss_type="sigmoid", label_smoothing=0.0, reduction="none")
    close(l1, l2, rtol=1e-15, atol=0)
    g1 = grads_of(l1.sum(), xs)
    g2 = grads_of(l2.sum(), xs)
    for a, e in zip(g1, g2):
        close(a, e, rtol=1e-15, atol=0)


def test_ipo_minimal_at_normalized_margin_half_inverse_beta(device):
    beta = 0.25
    target = 1 / (2 * beta)
    lc = torch.tensor([7], device=device)
    lr = torch.tensor([3], device=device)
    offsets = [i / 20 for i in range(-20, 21)]
    vals = []
    for o in offsets:
        # choose the rejected score so that sc/7 - sr/3 = target + o
        pc = torch.tensor([-14.0], dtype=torch.float64, device=device)
        pr = ((pc / 7 - (target + o)) * 3).requires_grad_(True)
        zero = torch.zeros(1, dtype=torch.float64, device=device)
        loss, _ = L.dpo_loss(pc, pr, zero, zero, loss_type="ipo", beta=beta, chosen_lengths=lc, rejected_lengths=lr)
        vals.append(loss.item())
        if o == 0:
            (g,) = torch.autograd.grad(loss, pr)
            assert abs(g.item()) < 1e-12 and loss.item() < 1e-24
    k = int(torch.tensor(vals).argmin())
    assert offsets[k] == 0.0
    assert all(v > 0 for i, v in enumerate(vals) if i != k)


def test_kto_symmetric_with_equal_weights_and_zero_kl(device):
    b = make_batch(20, seed=9, device=device)
    desirable = torch.arange(20, device=device) % 3 == 0
    r = b["pc"] - b["rc"]
    zero = torch.zeros_like(r)
    l1, _ = L.kto_loss(r, zero, desirable, beta=0.3, reduction="none")
    l2, _ = L.kto_loss(-r, zero, ~desirable, beta=0.3, reduction="none")
    close(l1, l2, rtol=1e-15, atol=0)


# ------------------------------------------------------------------------------------------
# Stability, determinism, consistency of the two call paths

@pytest.mark.parametrize("loss_type", DPO_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dpo_finite_at_extreme_margins(device, loss_type, dtype):
    big = 6e4 if dtype == torch.float16 else 1e5  # beta * margin up to 1e4 (fp16: 6e3)
    pc = torch.tensor([big, -big, 0.0, big, -big], dtype=dtype, device=device)
    pr = torch.tensor([-big, big, 0.0, 0.0, 0.0], dtype=dtype, device=device)
    zero = torch.zeros(5, dtype=dtype, device=device)
    lengths = torch.ones(5, dtype=torch.int64, device=device)
    for fd in (["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] if loss_type in F_DIV_TYPES
               else ["reverse_kl"]):
        xs = leaves(pc, pr, zero, zero)
        loss, m = L.dpo_loss(*xs, loss_type=loss_type, beta=0.1, label_smoothing=SMOOTH.get(loss_type, 0.0),
                             chosen_lengths=lengths, rejected_lengths=lengths, f_divergence=fd)
        gs = grads_of(loss, xs)
        assert torch.isfinite(loss), (fd, loss)
        if dtype == torch.float16 and fd != "reverse_kl":
            # Exponential scores (capped at exp(40)) have true gradients beyond fp16's range, and
            # autograd returns the gradient in the input dtype: check the kernel's fp32 gradient.
            params = _params(label_smoothing=SMOOTH.get(loss_type, 0.0))
            _, g32, _, _ = preference_loss_op.impl(pc, pr, zero, zero, lengths, lengths, None, None, None, None, None,
                                                   "dpo", [DPO_TYPES.index(loss_type)], [1.0], params, fd, "mean")
            assert g32.dtype == torch.float32 and bool(torch.isfinite(g32).all()), (fd, g32)
            continue
        assert all(bool(torch.isfinite(gg.float()).all()) for gg in gs), (fd, gs)


def test_orpo_finite_near_zero_logps(device):
    for dtype in (torch.float64, torch.float32, torch.float16):
        pc = torch.tensor([0.0, -1e-9, -1e-4, -3.0], dtype=dtype, device=device)
        pr = torch.tensor([-1e-7, 0.0, -2.0, -1e-6], dtype=dtype, device=device)
        ones = torch.ones(4, device=device)
        xs = leaves(pc, pr)
        loss, m = L.orpo_loss(*xs, chosen_lengths=ones, rejected_lengths=ones)
        gs = grads_of(loss, xs)
        assert torch.isfinite(loss) and all(bool(torch.isfinite(g.float()).all()) for g in gs)
        assert all(math.isfinite(v) for v in m.to_floats().values())


def test_deterministic(device):
    b = make_batch(5000, seed=10, dtype=torch.float32, device=device)
    outs = []
    for _ in range(2):
        xs = leaves(b["pc"], b["pr"], b["rc"], b["rr"], b["w"])
        loss, m = L.dpo_loss(*xs[:4], loss_type=["sigmoid", "aot", "discopop"], weights=xs[4], label_smoothing=0.1)
        outs.append([loss, m.values, *grads_of(loss, xs)])
    for a, e in zip(*outs):
        assert torch.equal(a, e)


def test_large_batch_blocks_match_reference(device):
    """Batches above one CPU block (2048) are split across threads: same result as the reference."""
    b = make_batch(9000, seed=27, device=device)
    (loss, g, m), (rl, rg) = run_dpo_both(b, ["sigmoid", "aot", "ipo"], beta=0.2, label_smoothing=0.1)
    close(loss, rl)
    for a, e in zip(g, rg):
        close(a, e)
    check_metrics(m, R.dpo_metrics(b["pc"], b["pr"], b["rc"], b["rr"], beta=0.2))


def test_cpu_result_independent_of_thread_count(tmp_path):
    script = (
        "import sys, torch\n"
        "from pyalign import losses as L\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x = [torch.randn(20000, generator=g) * 3 - 30 for _ in range(4)]\n"
        "l, m = L.dpo_loss(*x, loss_type=['sigmoid', 'aot'], label_smoothing=0.1)\n"
        "torch.save((l, m.values), sys.argv[1])\n")
    outs = []
    for threads in ("1", "2"):
        path = tmp_path / f"t{threads}.pt"
        env = {**os.environ, "OMP_NUM_THREADS": threads}
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, env=env, cwd=tmp_path)
        outs.append(torch.load(path))
    for a, e in zip(*outs):
        assert torch.equal(a, e)


def test_direct_path_equals_custom_op(device):
    """The eager fast path (pyalign.ops._op: no dispatcher) and the registered custom op give bitwise the
    same outputs and gradients."""
    b = make_batch(12, seed=11, device=device)
    args = (b["pc"], b["pr"], b["rc"], b["rr"], b["lc"], b["lr"], b["w"], None, None, None, None, "dpo",
            [DPO_TYPES.index("ipo"), DPO_TYPES.index("aot")], [1.0, 0.5], _params(label_smoothing=0.1),
            "reverse_kl", "mean")
    x1 = leaves(*args[:4])
    o1 = preference_loss_op.op(*x1, *args[4:])
    x2 = leaves(*args[:4])
    o2 = preference_loss_op(*x2, *args[4:])
    assert o2[0].grad_fn is not None and "preference_loss" in type(o2[0].grad_fn).__name__
    for a, e in zip(o1, o2):
        assert torch.equal(a, e)
    for a, e in zip(grads_of(o1[0], x1), grads_of(o2[0], x2)):
        assert torch.equal(a, e)


def test_nan_input_gives_nan_not_crash(device):
    b = make_batch(6, seed=12, device=device)
    pc = b["pc"].clone()
    pc[2] = float("nan")
    loss, _ = L.dpo_loss(pc, b["pr"], b["rc"], b["rr"], loss_type=["aot", "aot_unpaired"])
    assert torch.isnan(loss)
    ties = torch.zeros(6, dtype=torch.float64, device=device)  # all tied: a valid permutation still
    loss, _ = L.dpo_loss(ties, ties, ties, ties, loss_type="aot")
    close(loss, torch.tensor(math.log(2), dtype=torch.float64))


# ------------------------------------------------------------------------------------------
# KTO, BCO, ORPO, CPO/SimPO/AlphaPO, reward model

@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_kto_matches_reference(device, loss_type, reduction):
    b = make_batch(15, seed=13, device=device)
    desirable = torch.arange(15, device=device) % 4 != 1
    kl = dict(policy_kl=b["pr"] + 0.5, ref_kl=b["rr"]) if loss_type == "kto" else {}
    xs = leaves(b["pc"], b["rc"], b["w"])
    loss, m = L.kto_loss(xs[0], xs[1], desirable, weights=xs[2], beta=0.2, desirable_weight=1.3,
                         undesirable_weight=0.7, loss_type=loss_type, reduction=reduction,
                         policy_kl_logps=kl.get("policy_kl"), ref_kl_logps=kl.get("ref_kl"))
    up = randn(15, device, seed=115) if reduction == "none" else None
    g = grads_of(loss, xs, up)
    ys = leaves(b["pc"], b["rc"], b["w"])
    per = R.kto_losses(ys[0], ys[1], desirable, beta=0.2, desirable_weight=1.3, undesirable_weight=0.7,
                       loss_type=loss_type, **kl)
    rl = R.reduce(per, ys[2], reduction)
    close(loss, rl)
    for a, e in zip(g, grads_of(rl, ys, up)):
        close(a, e)
    rew = 0.2 * (b["pc"] - b["rc"])
    exp = {"rewards/chosen": rew[desirable].mean(), "rewards/rejected": rew[~desirable].mean(),
           "logps/chosen": b["pc"][desirable].mean(), "logps/rejected": b["pc"][~desirable].mean(),
           "count/chosen": desirable.sum(), "count/rejected": (~desirable).sum()}
    exp["rewards/margins"] = exp["rewards/chosen"] - exp["rewards/rejected"]
    if loss_type == "kto":
        exp["kl"] = (kl["policy_kl"] - kl["ref_kl"]).mean().clamp(min=0)
    check_metrics(m, exp)


def test_kto_kl_is_clamped_and_detached(device):
    b = make_batch(8, seed=14, device=device)
    desirable = torch.arange(8, device=device) % 2 == 0
    pk = (b["pr"] - 5.0).requires_grad_(True)  # negative KL estimate -> clamped to 0
    l1, m = L.kto_loss(b["pc"], b["rc"], desirable, policy_kl_logps=pk, ref_kl_logps=b["rr"])
    l0, _ = L.kto_loss(b["pc"], b["rc"], desirable)
    close(l1, l0, rtol=0, atol=0)
    assert m["kl"].item() == 0.0
    assert not l1.requires_grad


def test_kto_empty_class_metrics_are_nan(device):
    b = make_batch(5, seed=15, device=device)
    loss, m = L.kto_loss(b["pc"], b["rc"], torch.ones(5, dtype=torch.bool, device=device))
    f = m.to_floats()
    assert math.isnan(f["rewards/rejected"]) and math.isfinite(f["rewards/chosen"]) and math.isfinite(loss.item())


def test_bco_running_mean_and_loss(device):
    run = L.BCORunningMean()
    mean, count = 0.0, 0
    for seed in (16, 17, 18):
        b = make_batch(10, seed=seed, device=device)
        desirable = torch.arange(10, device=device) % 3 != 0
        xs = leaves(b["pc"], b["rc"])
        loss, m = L.bco_loss(xs[0], xs[1], desirable, run, beta=0.1)
        g = grads_of(loss, xs)
        ys = leaves(b["pc"], b["rc"])
        per, delta = R.bco_losses(ys[0], ys[1], desirable, running_mean=mean, running_count=count, beta=0.1)
        rl = per.mean()
        close(loss, rl)
        for a, e in zip(g, grads_of(rl, ys)):
            close(a, e)
        mean, count = delta.item(), count + 1
        close(m["delta"], torch.tensor(mean, dtype=torch.float64))
        assert run.count.item() == count and abs(run.mean.item() - mean) < 1e-12


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_orpo_matches_reference(device, reduction):
    b = make_batch(14, seed=19, device=device)
    xs = leaves(b["pc"], b["pr"], b["w"])
    loss, m = L.orpo_loss(xs[0], xs[1], chosen_lengths=b["lc"], rejected_lengths=b["lr"], beta=0.25,
                          weights=xs[2], reduction=reduction)
    up = randn(14, device, seed=114) if reduction == "none" else None
    g = grads_of(loss, xs, up)
    ys = leaves(b["pc"], b["pr"], b["w"])
    per, lo = R.orpo_losses(ys[0], ys[1], b["lc"], b["lr"], beta=0.25)
    rl = R.reduce(per, ys[2], reduction)
    close(loss, rl)
    for a, e in zip(g, grads_of(rl, ys, up)):
        close(a, e)
    mc, mr = b["pc"] / b["lc"], b["pr"] / b["lr"]
    check_metrics(m, {"rewards/chosen": 0.25 * mc.mean(), "rewards/rejected": 0.25 * mr.mean(),
                      "rewards/accuracies": (mc > mr).double().mean(), "nll_loss": (-mc).mean(),
                      "log_odds_chosen": lo.mean(), "log_odds_ratio": torch.nn.functional.logsigmoid(lo).mean(),
                      "logps/chosen": b["pc"].mean()})


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "simpo"])
@pytest.mark.parametrize("alpha", [0.0, 0.25, -0.5])
def test_cpo_simpo_alphapo_match_reference(device, loss_type, alpha):
    b = make_batch(12, seed=20, device=device, spread=1.0)
    eps = 0.1 if loss_type in ("sigmoid", "simpo") else 0.0
    beta = 2.0 if loss_type == "simpo" else 0.1
    xs = leaves(b["pc"], b["pr"])
    loss, m = L.cpo_loss(*xs, loss_type=loss_type, beta=beta, label_smoothing=eps, gamma=0.8, alpha=alpha,
                         cpo_alpha=0.6, chosen_lengths=b["lc"], rejected_lengths=b["lr"])
    g = grads_of(loss, xs)
    ys = leaves(b["pc"], b["pr"])
    per, rc, rr = R.cpo_losses(*ys, loss_type=loss_type, beta=beta, label_smoothing=eps, gamma=0.8, alpha=alpha,
                               cpo_alpha=0.6, lc=b["lc"], lr=b["lr"])
    rl = per.mean()
    close(loss, rl)
    for a, e in zip(g, grads_of(rl, ys)):
        close(a, e)
    check_metrics(m, {"rewards/chosen": beta * rc.detach().mean(), "rewards/rejected": beta * rr.detach().mean(),
                      "rewards/accuracies": (rc > rr).double().mean(),
                      "nll_loss": (-b["pc"] / b["lc"]).mean()})


def test_simpo_is_cpo_simpo_without_nll(device):
    b = make_batch(9, seed=21, device=device)
    l1, _ = L.simpo_loss(b["pc"], b["pr"], chosen_lengths=b["lc"], rejected_lengths=b["lr"], beta=2.0, gamma=1.0)
    l2, _ = L.cpo_loss(b["pc"], b["pr"], loss_type="simpo", beta=2.0, gamma=1.0, cpo_alpha=0.0,
                       chosen_lengths=b["lc"], rejected_lengths=b["lr"])
    close(l1, l2, rtol=0, atol=0)
    # SimPO eq. 6 written out
    mc, mr = b["pc"] / b["lc"], b["pr"] / b["lr"]
    close(l1, -torch.nn.functional.logsigmoid(2.0 * (mc - mr) - 1.0).mean())


@pytest.mark.parametrize("margin_kind", [None, "tensor", "float"])
def test_reward_model_matches_reference(device, margin_kind):
    g0 = torch.Generator().manual_seed(22)
    rc = torch.randn(16, generator=g0, dtype=torch.float64).to(device)
    rr = torch.randn(16, generator=g0, dtype=torch.float64).to(device)
    mt = torch.rand(16, generator=g0, dtype=torch.float64).to(device)
    xs = leaves(rc, rr, mt)
    margin = xs[2] if margin_kind == "tensor" else (0.3 if margin_kind == "float" else None)
    loss, m = L.reward_model_loss(xs[0], xs[1], margin=margin, center_rewards_coefficient=0.01)
    g = grads_of(loss, xs)
    ys = leaves(rc, rr, mt)
    rmargin = ys[2] if margin_kind == "tensor" else (torch.full((16,), 0.3, dtype=torch.float64, device=device)
                                                      if margin_kind == "float" else None)
    rl = R.rm_losses(ys[0], ys[1], margin=rmargin, center=0.01).mean()
    close(loss, rl)
    for a, e in zip(g, grads_of(rl, ys)):
        close(a, e)
    check_metrics(m, {"rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(), "rewards/margins": (rc - rr).mean(),
                      "rewards/accuracies": (rc > rr).double().mean()})


@settings(WITH_DEVICE)
@given(n=st.integers(1, 64), family=st.sampled_from(["kto", "apo_zero_unpaired", "orpo", "cpo", "simpo", "rm"]),
       seed=st.integers(0, 10_000), beta=st.floats(0.01, 5.0), spread=st.floats(0.01, 30.0),
       reduction=st.sampled_from(["none", "mean", "sum"]))
def test_other_families_hypothesis(device, n, family, seed, beta, spread, reduction):
    b = make_batch(n, seed=seed, spread=spread, device=device)
    if family == "orpo":  # log-probs of whole completions are <= 0 (ORPO takes log(1 - p))
        b["pc"], b["pr"] = -b["pc"].abs() - 1e-3, -b["pr"].abs() - 1e-3
    desirable = (torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.5).to(device)
    names = ["pc", "pr", "rc", "rr", "w"]
    xs, ys = leaves(*[b[k] for k in names]), leaves(*[b[k] for k in names])
    up = randn(n, device, seed=seed + 1) if reduction == "none" else None
    lc, lr = b["lc"], b["lr"]
    if family in ("kto", "apo_zero_unpaired"):
        kl = dict(policy_kl_logps=b["pr"], ref_kl_logps=b["rr"]) if family == "kto" else {}
        loss, _ = L.kto_loss(xs[0], xs[2], desirable, beta=beta, loss_type=family,
                             weights=xs[4], reduction=reduction, **kl)
        per = R.kto_losses(ys[0], ys[2], desirable, beta=beta, loss_type=family,
                           policy_kl=kl.get("policy_kl_logps"), ref_kl=kl.get("ref_kl_logps"))
    elif family == "orpo":
        loss, _ = L.orpo_loss(xs[0], xs[1], chosen_lengths=lc, rejected_lengths=lr, beta=beta, weights=xs[4],
                              reduction=reduction)
        per = R.orpo_losses(ys[0], ys[1], lc, lr, beta=beta)[0]
    elif family in ("cpo", "simpo"):
        lt = "sigmoid" if family == "cpo" else "simpo"
        loss, _ = L.cpo_loss(xs[0], xs[1], loss_type=lt, beta=beta, alpha=0.1, cpo_alpha=0.3, chosen_lengths=lc,
                             rejected_lengths=lr, weights=xs[4], reduction=reduction)
        per = R.cpo_losses(ys[0], ys[1], loss_type=lt, beta=beta, alpha=0.1, cpo_alpha=0.3, lc=lc, lr=lr)[0]
    else:
        loss, _ = L.reward_model_loss(xs[0] / 10, xs[1] / 10, margin=xs[2] / 50, center_rewards_coefficient=beta,
                                      weights=xs[4], reduction=reduction)
        per = R.rm_losses(ys[0] / 10, ys[1] / 10, margin=ys[2] / 50, center=beta)
    rl = R.reduce(per, ys[4], reduction)
    close(loss, rl, rtol=1e-9, atol=1e-11 * max(1.0, rl.abs().max().item()))
    for a, e in zip(grads_of(loss, xs, up), grads_of(rl, ys, up)):
        close(a, e, rtol=1e-8, atol=1e-11 * max(1.0, e.abs().max().item()))


# ------------------------------------------------------------------------------------------
# gradcheck (float64) and opcheck

def test_gradcheck_all_families(device):
    b = make_batch(6, seed=23, device=device)
    desirable = torch.tensor([True, False, True, True, False, False], device=device)
    cases = [
        lambda pc, pr, rc, rr, w: L.dpo_loss(pc, pr, rc, rr, loss_type=["sigmoid", "ipo", "exo_pair"],
                                             label_smoothing=0.01, chosen_lengths=b["lc"], rejected_lengths=b["lr"],
                                             weights=w)[0],
        lambda pc, pr, rc, rr, w: L.dpo_loss(pc, pr, rc, rr, loss_type=["aot", "aot_unpaired", "discopop"],
                                             weights=w, beta=0.5, reduction="sum")[0],
        lambda pc, pr, rc, rr, w: L.dpo_loss(pc, pr, rc, rr, loss_type="nca_pair", f_divergence="reverse_kl",
                                             weights=w, reduction="none")[0],
        lambda pc, pr, rc, rr, w: L.dpo_loss(pc, pr, rc, rr, loss_type="robust", label_smoothing=0.2,
                                             f_divergence="js_divergence", weights=w)[0],
        lambda pc, pr, rc, rr, w: L.kto_loss(pc, rc, desirable, policy_kl_logps=pr.detach(),
                                             ref_kl_logps=rr.detach(), weights=w)[0],
        lambda pc, pr, rc, rr, w: L.orpo_loss(pc, pr, chosen_lengths=b["lc"], rejected_lengths=b["lr"], weights=w)[0],
        lambda pc, pr, rc, rr, w: L.simpo_loss(pc, pr, chosen_lengths=b["lc"], rejected_lengths=b["lr"], alpha=0.3,
                                               cpo_alpha=0.5, weights=w)[0],
        lambda pc, pr, rc, rr, w: L.reward_model_loss(pc / 40, pr / 40, margin=rc / 40,
                                                      center_rewards_coefficient=0.1, weights=w)[0],
    ]
    xs = leaves(b["pc"], b["pr"], b["rc"], b["rr"], b["w"])
    for fn in cases:
        assert torch.autograd.gradcheck(fn, xs, eps=1e-6, atol=1e-6, rtol=1e-5)
    # BCO's shift is detached (a running mean): with a huge running count it does not move when
    # gradcheck perturbs the inputs, so finite differences see only the differentiable path.
    def bco(pc, rc, w):
        r = L.BCORunningMean()
        r.state = torch.tensor([0.3, 1e12], dtype=torch.float64, device=device)
        return L.bco_loss(pc, rc, desirable, r, weights=w)[0]
    assert torch.autograd.gradcheck(bco, (xs[0], xs[2], xs[4]), eps=1e-6, atol=1e-6, rtol=1e-5)


def _params(**over):
    base = dict(beta=0.1, label_smoothing=0.0, f_alpha=0.5, tau=0.05, gamma=0.5, alpha=0.0, cpo_alpha=0.0,
                desirable_weight=1.0, undesirable_weight=1.0, center=0.0)
    base.update(over)
    return params_list(**base)


def _op_args(family, device, **over):
    b = make_batch(5, seed=24, device=device)
    base = dict(a=b["pc"], b=b["pr"], c=b["rc"], d=b["rr"], la=b["lc"], lb=b["lr"], w=b["w"], label=None,
                kla=None, klb=None, state=None, family=family, types=[0], type_weights=[1.0],
                params=_params(), fdiv="reverse_kl", reduction="mean")
    base.update(over)
    rows = base.get("grad_rows", 31)
    for bit, k in enumerate(("a", "b", "c", "d", "w")):
        if base[k] is not None:
            base[k] = base[k].detach().clone().requires_grad_(bool(rows >> bit & 1))
    return tuple(base.values())


_ROW_CASES = {  # (family, types, weights, reduction, dtype): the tiled fp32 loops and the element loop
    "sigmoid": ("dpo", [0], [1.0], "mean", torch.float32),
    "mpo": ("dpo", [0, 12, 14], [0.8, 0.2, 1.0], "sum", torch.float32),
    "aot": ("dpo", [0, 9], [1.0, 0.5], "mean", torch.float32),
    "dro": ("dpo", [3], [1.0], "dro", torch.float32),
    "ipo_fp64": ("dpo", [3], [1.0], "none", torch.float64),
    "kto": ("kto", [0], [1.0], "mean", torch.float32),
    "orpo": ("orpo", [0], [1.0], "mean", torch.float32),
}


@pytest.mark.parametrize("case", sorted(_ROW_CASES))
def test_grad_rows_form_only_the_asked_gradients(device, case):
    """Each subset of gradients (``grad_rows``) gives bitwise the rows of the full call, in input
    order, with the same loss and metrics; the public losses ask for those of the inputs that require
    grad (none with grad disabled)."""
    family, types, weights, reduction, dtype = _ROW_CASES[case]
    b = make_batch(300, seed=5, dtype=dtype, device=device)
    unpaired = family == "kto"
    paired_ref = family == "dpo"
    a, bb = b["pc"], None if unpaired else b["pr"]
    c = b["rc"] if paired_ref or unpaired else None
    d = b["rr"] if paired_ref else None
    label = (b["lc"] > 30) if unpaired else None
    args = lambda rows: (a, bb, c, d, None if unpaired else b["lc"], None if unpaired else b["lr"], b["w"], label,
                         None, None, None, family, types, weights, _params(), "reverse_kl", reduction, 0.7 if
                         reduction == "dro" else 1.0, rows)
    full = preference_loss_op.impl(*args(31))
    present = [t is not None for t in (a, bb, c, d, b["w"])]
    for rows in (0, 1, 2, 3, 0b10001, 0b01100, 0b10000, 31):
        out = preference_loss_op.impl(*args(rows))
        assert out[1].shape == (bin(rows).count("1"), 300)
        for x, y in ((out[0], full[0]), (out[2], full[2])):
            assert torch.equal(x, y)
        wanted = [k for k in range(5) if rows >> k & 1]
        for r, k in enumerate(wanted):
            assert torch.equal(out[1][r], full[1][k]), (rows, k)
            if present[k] and k < 4:  # a present input's row is a real gradient, not left zero
                assert bool(full[1][k].abs().sum() > 0), k


def test_public_losses_ask_for_the_gradients_they_need(device):
    from torch.utils._python_dispatch import TorchDispatchMode
    from pyalign.ops.losses import needed_grad_rows

    b = make_batch(8, seed=2, device=device)
    pc, pr = leaves(b["pc"], b["pr"])
    assert needed_grad_rows(pc, pr, b["rc"], b["rr"], None) == 0b00011
    assert needed_grad_rows(pc, None, b["rc"], None, leaves(b["w"])[0]) == 0b10001
    with torch.no_grad():
        assert needed_grad_rows(pc, pr, b["rc"], b["rr"], None) == 0

    class Record(TorchDispatchMode):  # the op's own arguments (a dispatch mode takes the op path)
        rows = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "preference_loss" in str(func):
                Record.rows.append(args[-1])
            return func(*args, **(kwargs or {}))

    with Record():
        loss, _ = L.dpo_loss(pc, pr, b["rc"], b["rr"], beta=0.1)
    assert Record.rows == [0b00011]
    # the policy's gradients are right without the reference's
    pc2, pr2 = leaves(b["pc"], b["pr"])
    ref = R.dpo_losses(pc2, pr2, b["rc"], b["rr"], beta=0.1).mean()
    for x, y in zip(grads_of(loss, [pc, pr]), grads_of(ref, [pc2, pr2])):
        close(x, y)


def test_backward_refuses_a_gradient_the_forward_did_not_form(device):
    b = make_batch(6, seed=3, device=device)
    pc, pr, rc, rr = leaves(b["pc"], b["pr"], b["rc"], b["rr"])
    out = preference_loss_op(pc, pr, rc, rr, None, None, None, None, None, None, None, "dpo", [0], [1.0], _params(),
                             "reverse_kl", "mean", 1.0, 0b00011)
    with pytest.raises(RuntimeError, match="grad_rows=3, which does not form it"):
        torch.autograd.grad(out[0], [pc, rc])


@pytest.mark.parametrize("case", ["dpo_mean", "dpo_none", "dpo_dro", "dpo_aot", "dpo_rows", "kto", "bco", "orpo",
                                  "cpo", "rm"])
def test_opcheck(device, case):
    lab = torch.tensor([True, False, True, False, True], device=device)
    cfg = {
        "dpo_mean": dict(family="dpo", types=[0, 3, 14], type_weights=[1.0, 0.5, 0.2]),
        "dpo_none": dict(family="dpo", types=[13], reduction="none"),
        "dpo_dro": dict(family="dpo", types=[0, 3], type_weights=[1.0, 0.5], reduction="dro", dro_temperature=0.4),
        "dpo_aot": dict(family="dpo", types=[9, 10], type_weights=[1.0, 1.0], reduction="sum"),
        # the policy log-probs and the weights need gradients, the reference does not
        "dpo_rows": dict(family="dpo", types=[0, 3], type_weights=[1.0, 0.5], dro_temperature=1.0, grad_rows=0b10011),
        "kto": dict(family="kto", b=None, d=None, la=None, lb=None, label=lab),
        "bco": dict(family="bco", b=None, d=None, la=None, lb=None, label=lab,
                    state=torch.tensor([0.1, 3.0], dtype=torch.float64, device=device)),
        "orpo": dict(family="orpo", c=None, d=None),
        "cpo": dict(family="cpo", c=None, d=None, types=[3]),
        "rm": dict(family="rm", d=None, la=None, lb=None),
    }[case]
    args = _op_args(cfg.pop("family"), device, **cfg)
    torch.library.opcheck(preference_loss_op.op, args)


def test_torch_compile_fullgraph(device):
    b = make_batch(8, seed=25, dtype=torch.float32, device=device)

    def f(pc, pr, rc, rr, w):
        loss, m = L.dpo_loss(pc, pr, rc, rr, loss_type=["sigmoid", "sft"], chosen_lengths=b["lc"], weights=w)
        return loss, m.values

    xs = leaves(b["pc"], b["pr"], b["rc"], b["rr"], b["w"])
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    l1, m1 = cf(*xs)
    g1 = grads_of(l1, xs)
    ys = leaves(b["pc"], b["pr"], b["rc"], b["rr"], b["w"])
    l2, m2 = f(*ys)
    g2 = grads_of(l2, ys)
    assert torch.equal(l1, l2) and torch.equal(m1, m2)
    for a, e in zip(g1, g2):
        assert torch.equal(a, e)


# ------------------------------------------------------------------------------------------
# Bad input

def test_bad_inputs(device):
    b = make_batch(4, seed=26, device=device)
    ones = lambda *shape, **kw: torch.ones(*shape, **kw, device=device)
    zeros = lambda *shape, **kw: torch.zeros(*shape, **kw, device=device)
    pc, pr, rc, rr = b["pc"], b["pr"], b["rc"], b["rr"]
    lc, lr = b["lc"], b["lr"]
    cases = [
        (ValueError, "unknown loss type 'dpo'.*sigmoid, sigmoid_norm", lambda: L.dpo_loss(pc, pr, rc, rr, loss_type="dpo")),
        (ValueError, "unknown loss type", lambda: L.dpo_loss(pc, pr, rc, rr, loss_type=["sigmoid", "nope"])),
        (ValueError, "exo_pair.*\\(0.0, 1.0\\).*1e-3", lambda: L.dpo_loss(pc, pr, rc, rr, loss_type="exo_pair")),
        (ValueError, "robust.*\\[0.0, 0.5\\)", lambda: L.dpo_loss(pc, pr, rc, rr, loss_type="robust", label_smoothing=0.5)),
        (ValueError, "sigmoid.*\\[0.0, 0.5\\]", lambda: L.dpo_loss(pc, pr, rc, rr, label_smoothing=0.7)),
        (ValueError, "label_smoothing.*do not use it", lambda: L.dpo_loss(pc, pr, rc, rr, loss_type="hinge", label_smoothing=0.1)),
        (ValueError, "ipo.*length", lambda: L.dpo_loss(pc, pr, rc, rr, loss_type="ipo")),
        (ValueError, "sigmoid_norm.*length", lambda: L.dpo_loss(pc, pr, rc, rr, loss_type="sigmoid_norm", chosen_lengths=lc)),
        (ValueError, "apo_zero need reference", lambda: L.dpo_loss(pc, pr, loss_type="apo_zero")),
        (ValueError, "aot need reference", lambda: L.dpo_loss(pc, pr, loss_type=["sigmoid", "aot"])),
        (ValueError, "both reference log-probs or neither", lambda: L.dpo_loss(pc, pr, rc)),
        (ValueError, "policy_rejected_logps: expected 4 elements", lambda: L.dpo_loss(pc, pr[:3], rc, rr)),
        (ValueError, "ref_rejected_logps: expected 4", lambda: L.dpo_loss(pc, pr, rc, rr[:2])),
        (ValueError, "chosen_lengths: expected 4", lambda: L.dpo_loss(pc, pr, rc, rr, loss_type="ipo", chosen_lengths=lc[:1], rejected_lengths=lr)),
        (ValueError, "weights: expected 4", lambda: L.dpo_loss(pc, pr, rc, rr, weights=b["w"][:3])),
        (ValueError, "1-d tensor", lambda: L.dpo_loss(pc[None], pr[None])),
        (ValueError, "at least one element", lambda: L.dpo_loss(pc[:0], pr[:0])),
        (TypeError, "policy_chosen_logps: expected a floating tensor", lambda: L.dpo_loss(lc, pr)),
        (TypeError, "expected a torch.Tensor", lambda: L.dpo_loss([1.0], pr)),
        (ValueError, "reduction: expected one of", lambda: L.dpo_loss(pc, pr, reduction="avg")),
        (ValueError, "'none' is not defined for aot", lambda: L.dpo_loss(pc, pr, rc, rr, loss_type="aot", reduction="none")),
        (ValueError, "f_divergence: expected one of", lambda: L.dpo_loss(pc, pr, rc, rr, f_divergence="kl")),
        (ValueError, "forward_kl.*only defined.*nca_pair", lambda: L.dpo_loss(pc, pr, rc, rr, loss_type="nca_pair", f_divergence="forward_kl")),
        (ValueError, "loss_weights: expected 2", lambda: L.dpo_loss(pc, pr, loss_type=["sigmoid", "hinge"], loss_weights=[1.0])),
        (ValueError, "beta: expected a finite number > 0", lambda: L.dpo_loss(pc, pr, beta=0.0)),
        (ValueError, "beta: expected a finite number > 0", lambda: L.dpo_loss(pc, pr, beta=float("nan"))),
        (ValueError, "discopop_tau", lambda: L.dpo_loss(pc, pr, rc, rr, loss_type="discopop", discopop_tau=-1.0)),
        (ValueError, "rpo_alpha", lambda: L.dpo_loss(pc, pr, rpo_alpha=float("inf"))),
        (TypeError, "desirable: expected a bool", lambda: L.kto_loss(pc, rc, ones(4))),
        (ValueError, "desirable: expected 4", lambda: L.kto_loss(pc, rc, ones(3, dtype=torch.bool))),
        (ValueError, "ref_logps: this loss needs reference", lambda: L.kto_loss(pc, None, ones(4, dtype=torch.bool))),
        (ValueError, "no KL term", lambda: L.kto_loss(pc, rc, ones(4, dtype=torch.bool), loss_type="apo_zero_unpaired",
                                                      policy_kl_logps=pr, ref_kl_logps=rr)),
        (ValueError, "both KL-batch", lambda: L.kto_loss(pc, rc, ones(4, dtype=torch.bool), policy_kl_logps=pr)),
        (ValueError, "loss_type: expected one of 'kto'", lambda: L.kto_loss(pc, rc, ones(4, dtype=torch.bool), loss_type="sigmoid")),
        (TypeError, "running: expected a pyalign.losses.BCORunningMean", lambda: L.bco_loss(pc, rc, ones(4, dtype=torch.bool), None)),
        (ValueError, "orpo_loss is length-normalized", lambda: L.orpo_loss(pc, pr, chosen_lengths=None, rejected_lengths=lr)),
        (ValueError, "'simpo' is length-normalized", lambda: L.cpo_loss(pc, pr, loss_type="simpo")),
        (ValueError, "hinge' does not use it", lambda: L.cpo_loss(pc, pr, loss_type="hinge", label_smoothing=0.1)),
        (ValueError, "loss_type: expected one of 'sigmoid', 'hinge', 'ipo', 'simpo'", lambda: L.cpo_loss(pc, pr, loss_type="orpo")),
        (ValueError, "margin: expected 4", lambda: L.reward_model_loss(pc, pr, margin=zeros(3))),
        (ValueError, "center_rewards_coefficient", lambda: L.reward_model_loss(pc, pr, center_rewards_coefficient=float("nan"))),
    ]
    for exc, pattern, fn in cases:
        with pytest.raises(exc, match=pattern):
            fn()


def test_bad_inputs_reaching_the_binding(device):
    """The compiled core validates by itself: a wrong call raises an error naming the argument, never
    crashes."""
    zeros = lambda *shape: torch.zeros(*shape, device=device)
    empty = lambda *shape: torch.empty(*shape, device=device)
    a = zeros(4)
    loss = empty(())
    grads = empty(5, 4)
    metrics = empty(pyalign._ext.CONTRACT["metric_slots"])
    p = _params()
    stream = stream_of(a)

    def call(b=a, grads=grads, types=(0,), family="dpo", fdiv="reverse_kl", reduction="mean", params=p, rows=31):
        kernels.loss_forward(desc(a, "policy_chosen_logps"), desc(b, "policy_rejected_logps"), None, None, None, None,
                             None, None, None, None, None, desc(loss, "loss"), desc(grads, "grads"),
                             desc(metrics, "metrics"), None, None, family, list(types), [1.0] * len(types), params,
                             fdiv, reduction, rows, stream)
    with pytest.raises(ValueError, match="'policy_rejected_logps'.*expected a 1-d tensor of 4 elements"):
        call(b=zeros(3))
    with pytest.raises(ValueError, match=r"'grads' \(float32, shape \[5, 3\]\): expected a contiguous float32 tensor "
                                         r"of shape \[5, 4\]"):
        call(grads=empty(5, 3))
    with pytest.raises(ValueError, match=r"shape \[2, 4\]"):  # grad_rows 0b00011: a and b's rows only
        call(rows=3)
    with pytest.raises(ValueError, match="grad_rows: expected a bit mask of the 5 gradient inputs"):
        call(rows=32)
    with pytest.raises(ValueError, match="aot losses need reference"):
        call(types=[9])
    with pytest.raises(ValueError, match="types: code 99 is not a loss type of family dpo"):
        call(types=[99])
    with pytest.raises(ValueError, match="family: unknown name 'dp'; expected one of dpo, kto"):
        call(family="dp")
    with pytest.raises(ValueError, match="reduction: unknown name 'avg'"):
        call(reduction="avg")
    with pytest.raises(ValueError, match="params: expected 10 values"):
        call(params=p[:3])
    bco_state = zeros(2)
    with pytest.raises(ValueError, match="'state_out': the output \\[2\\] is required"):
        kernels.loss_forward(desc(a, "policy_logps"), None, desc(a, "ref_logps"), None, None, None, None,
                             desc(a > 0, "desirable"), None, None, desc(bco_state, "state"), desc(loss, "loss"),
                             desc(grads, "grads"), desc(metrics, "metrics"), None, None, "bco", [0], [1.0], p,
                             "reverse_kl", "mean", 31, stream)


def test_loss_parameters_are_bound_by_name(device):
    assert PARAM_NAMES == tuple(pyalign._ext.CONTRACT["loss_params"]) and "beta" in PARAM_NAMES
    with pytest.raises(TypeError, match="unknown \\['betta'\\]"):
        _params(betta=1.0)
    # each name reaches its own field: only beta changes the sigmoid loss, only center the reward-model one
    b = make_batch(6, seed=3, device=device)
    args = lambda family, params: (b["pc"], b["pr"], b["rc"], b["rr"], None, None, None, None, None, None, None,
                                   family, [0], [1.0], params, "reverse_kl", "mean")
    base = preference_loss_op(*args("dpo", _params()))[0]
    assert preference_loss_op(*args("dpo", _params(center=5.0)))[0] == base
    assert preference_loss_op(*args("dpo", _params(beta=0.3)))[0] != base
    rm = lambda **kw: preference_loss_op(b["pc"], b["pr"], None, None, None, None, None, None, None, None, None, "rm",
                                         [0], [1.0], _params(**kw), "reverse_kl", "mean")[0]
    assert rm(beta=0.7) == rm() != rm(center=0.5)


# ------------------------------------------------------------------------------------------
# fused_linear_dpo_loss against materialized logits (fp64)

def _linear_batch(device, *, B=3, T=7, H=6, V=13, seed=40):
    g = torch.Generator().manual_seed(seed)
    f = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(device)
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :2] = -100                       # prompt tokens
    labels[1, 5:] = -100                       # a shorter chosen completion
    labels[B + 2, 3:] = -100                   # a shorter rejected completion
    return dict(hidden=f(2 * B, T, H), weight=f(V, H) / 2, bias=f(V) / 3, labels=labels.to(device),
                ref_hidden=f(2 * B, T, H), ref_weight=f(V, H) / 2, ref_bias=f(V) / 3)


def _eager_seq_logps(hidden, weight, bias, labels, temperature=1.0):
    """Sequence log-probs from the full logits: shift, log_softmax, gather, masked sum."""
    logits = hidden[:, :-1] @ weight.T
    if bias is not None:
        logits = logits + bias
    lp = torch.log_softmax(logits / temperature, dim=-1)
    lab = labels[:, 1:]
    mask = lab != -100
    tok = lp.gather(-1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (tok * mask).sum(-1), mask.sum(-1)


@pytest.mark.parametrize("ref_kind", ["ref_hidden", "ref_hidden_own_head", "tensor", "pair", "none"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_fused_linear_dpo_matches_eager(device, ref_kind, loss_type):
    d = _linear_batch(device)
    beta, temperature = 0.3, 0.8
    h, w, bias = leaves(d["hidden"], d["weight"], d["bias"])
    # Reference log-probs handed in as tensors may require grad: they must receive none.
    ref_full, _ = _eager_seq_logps(d["ref_hidden"], d["ref_weight"], d["ref_bias"], d["labels"], temperature)
    ref_leaf = ref_full.detach().clone().requires_grad_(True)
    ref_pair = [x.detach().clone().requires_grad_(True) for x in ref_full.chunk(2)]
    kw = dict(bias=bias, loss_type=loss_type, beta=beta, temperature=temperature)
    if ref_kind == "ref_hidden":
        kw["ref_hidden"] = d["ref_hidden"]
    elif ref_kind == "ref_hidden_own_head":
        kw.update(ref_hidden=d["ref_hidden"], ref_weight=d["ref_weight"], ref_bias=d["ref_bias"])
    elif ref_kind == "tensor":
        kw["ref_logps"] = ref_leaf
    elif ref_kind == "pair":
        kw["ref_logps"] = tuple(ref_pair)
    loss, m = L.fused_linear_dpo_loss(h, w, d["labels"], **kw)
    gh, gw, gb = torch.autograd.grad(loss, (h, w, bias))
    if ref_kind == "tensor":
        assert torch.autograd.grad(L.fused_linear_dpo_loss(h, w, d["labels"], **kw)[0], ref_leaf,
                                   allow_unused=True)[0] is None
    if ref_kind == "pair":
        assert torch.autograd.grad(L.fused_linear_dpo_loss(h, w, d["labels"], **kw)[0], ref_pair,
                                   allow_unused=True) == (None, None)

    # Eager fp64: full logits, then the DPO formula written out.
    eh, ew, eb = leaves(d["hidden"], d["weight"], d["bias"])
    logps, counts = _eager_seq_logps(eh, ew, eb, d["labels"], temperature)
    pc, pr = logps.chunk(2)
    lc, lr = counts.chunk(2)
    if ref_kind == "ref_hidden":
        with torch.no_grad():
            ref = _eager_seq_logps(d["ref_hidden"], d["weight"], d["bias"], d["labels"], temperature)[0]
    elif ref_kind == "none":
        ref = torch.zeros_like(logps)
    else:
        ref = ref_full
    rc, rr = ref.detach().chunk(2)
    if loss_type == "sigmoid":
        want_per = -torch.nn.functional.logsigmoid(beta * ((pc - rc) - (pr - rr)))
    else:
        want_per = (((pc - rc) / lc.clamp(min=1) - (pr - rr) / lr.clamp(min=1)) - 1 / (2 * beta)) ** 2
    want = want_per.mean()
    wh, ww, wb = torch.autograd.grad(want, (eh, ew, eb))
    close(loss, want, rtol=1e-10, atol=1e-12)
    for a, e in ((gh, wh), (gw, ww), (gb, wb)):
        close(a, e, rtol=1e-9, atol=1e-12)
    close(m["rewards/chosen"], (beta * (pc - rc)).mean(), rtol=1e-10, atol=1e-12)
    close(m["logps/rejected"], pr.mean(), rtol=1e-10, atol=1e-12)


def test_fused_linear_dpo_float32_matches_eager_fp64(device):
    d = _linear_batch(device, seed=41, V=50)
    h, w = leaves(d["hidden"].float(), d["weight"].float())
    ref = _eager_seq_logps(d["ref_hidden"], d["ref_weight"], None, d["labels"])[0]
    loss, _ = L.fused_linear_dpo_loss(h, w, d["labels"], ref_logps=ref.float(), beta=0.5)
    gh, gw = torch.autograd.grad(loss, (h, w))
    eh, ew = leaves(d["hidden"].float().double(), d["weight"].float().double())
    pc, pr = _eager_seq_logps(eh, ew, None, d["labels"])[0].chunk(2)
    rc, rr = ref.float().double().chunk(2)
    want = -torch.nn.functional.logsigmoid(0.5 * ((pc - rc) - (pr - rr))).mean()
    wh, ww = torch.autograd.grad(want, (eh, ew))
    assert loss.dtype == torch.float32
    close(loss, want, rtol=1e-5, atol=1e-6)
    close(gh, wh, rtol=1e-4, atol=1e-6)
    close(gw, ww, rtol=1e-4, atol=1e-6)


def test_fused_linear_dpo_bad_inputs(device):
    d = _linear_batch(device)
    zeros = lambda *shape, **kw: torch.zeros(*shape, **kw, device=device)
    h, w, y = d["hidden"], d["weight"], d["labels"]
    cases = [
        ("hidden: expected \\[2B, T, H\\]", dict(), lambda: L.fused_linear_dpo_loss(h[:5], w, y[:5])),
        ("ref_logps / ref_hidden: give", dict(ref_logps=zeros(6), ref_hidden=d["ref_hidden"]), None),
        ("ref_logps: expected a tensor of shape \\(6,\\)", dict(ref_logps=zeros(5, dtype=torch.float64)), None),
        ("ref_logps: expected a \\[2B\\] tensor or a pair", dict(ref_logps=(zeros(3),)), None),
        ("ref_logps\\[1\\]: expected a tensor of shape \\(3,\\)", dict(ref_logps=(zeros(3), zeros(4))), None),
        ("ref_weight / ref_bias: only used with ref_hidden", dict(ref_weight=d["ref_weight"]), None),
        ("ref_hidden: expected \\[2B, T, H_ref\\]", dict(ref_hidden=d["ref_hidden"][:, :4]), None),
    ]
    for pattern, kw, fn in cases:
        with pytest.raises(ValueError, match=pattern):
            fn() if fn else L.fused_linear_dpo_loss(h, w, y, **kw)
    assert "fused_linear_dpo_loss" in L.__all__


# ------------------------------------------------------------------------------------------
# The CPU's tiled element loop (fp32 calls with one loss type of a paired family)

TILED_DPO = [t for t in DPO_TYPES if t not in ("aot", "aot_unpaired")]


@pytest.mark.parametrize("loss_type", TILED_DPO)
def test_tiled_dpo_large_ragged_batch_matches_reference(loss_type):
    """9000 pairs: several CPU blocks of 2048 and a ragged last tile; fp32 inputs run the tiled loop,
    checked against the float64 reference (loss, every gradient, the metrics)."""
    b = make_batch(9000, seed=41, dtype=torch.float32)
    kw = dict(label_smoothing=SMOOTH.get(loss_type, 0.0), beta=0.3)
    (loss, g, m), (rl, rg) = run_dpo_both(b, loss_type, **kw)
    assert loss.dtype == torch.float32
    close(loss, rl, rtol=2e-5, atol=1e-6)
    for a, e in zip(g, rg):
        close(a, e, rtol=2e-4, atol=1e-8)
    check_metrics(m, R.dpo_metrics(b["pc"].double(), b["pr"].double(), b["rc"].double(), b["rr"].double(), beta=0.3),
                  rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["orpo", "cpo", "cpo_hinge", "cpo_ipo", "simpo", "alphapo", "rm"])
def test_tiled_families_large_ragged_batch_match_reference(family):
    b = make_batch(4500, seed=42)
    ins, ours, ref = _family_case(family, b, torch.float32, "cpu")
    xs = leaves(*ins)
    loss = ours(xs)
    gs = grads_of(loss, xs)
    ys = leaves(*[x.double() for x in ins])
    rl = ref(ys, torch.float64)
    close(loss, rl, rtol=2e-5, atol=1e-6)
    for a, e in zip(gs, grads_of(rl, ys)):
        close(a, e, rtol=2e-4, atol=1e-9)


def test_tiled_strided_and_bf16_inputs_equal_contiguous():
    """Strided fp32 and bf16 inputs are read into the same float tiles: the same bits as contiguous fp32
    inputs of the same values."""
    b = make_batch(3000, seed=43, dtype=torch.float32)
    names = ("pc", "pr", "rc", "rr")
    base = L.dpo_loss(*[b[k] for k in names], loss_type="ipo", chosen_lengths=b["lc"], rejected_lengths=b["lr"])
    strided = [torch.stack([b[k], torch.zeros_like(b[k])], 1)[:, 0] for k in names]
    assert not strided[0].is_contiguous()
    got = L.dpo_loss(*strided, loss_type="ipo", chosen_lengths=b["lc"], rejected_lengths=b["lr"])
    assert torch.equal(got[0], base[0]) and torch.equal(got[1].values, base[1].values)
    low = [b[k].bfloat16() for k in names]
    got = L.dpo_loss(*low, loss_type="ipo", chosen_lengths=b["lc"], rejected_lengths=b["lr"])
    ref = L.dpo_loss(*[x.float() for x in low], loss_type="ipo", chosen_lengths=b["lc"], rejected_lengths=b["lr"])
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1].values, ref[1].values)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_tiled_integer_lengths_equal_float_lengths(dtype):
    """Lengths of any real dtype are read into the same float tiles (int64 and int32 by a vector
    conversion): the same bits as the float32 lengths of the same values."""
    b = make_batch(3000, seed=44, dtype=torch.float32)
    x = [b[k] for k in ("pc", "pr", "rc", "rr")]
    lc, lr = (b[k].clamp(max=1) if dtype == torch.bool else b[k] for k in ("lc", "lr"))
    for lt in ("ipo", "sigmoid_norm", "sft"):
        base = L.dpo_loss(*x, loss_type=lt, chosen_lengths=lc.float(), rejected_lengths=lr.float())
        got = L.dpo_loss(*x, loss_type=lt, chosen_lengths=lc.to(dtype), rejected_lengths=lr.to(dtype))
        assert torch.equal(got[0], base[0]) and torch.equal(got[1].values, base[1].values)


def test_handed_over_gradients_survive_retain_graph_and_a_scaled_backward():
    """Eager calls hand the forward's gradients over to the first backward: a second backward
    (retain_graph), a scaled one and a per-pair upstream gradient must still give the exact gradients,
    and a first gradient changed in place must leave a second one intact."""
    b = make_batch(300, seed=45, dtype=torch.float32)
    pc, pr, w = leaves(b["pc"], b["pr"], b["w"])
    loss, _ = L.dpo_loss(pc, pr, b["rc"], b["rr"], weights=w)
    loss.backward(retain_graph=True)
    g1 = [t.grad.clone() for t in (pc, pr, w)]
    loss.backward(retain_graph=True)
    assert all(torch.equal(t.grad, 2 * g) for t, g in zip((pc, pr, w), g1))
    for t in (pc, pr, w):
        t.grad = None
    (3 * loss).backward()
    assert all(torch.equal(t.grad, 3 * g) for t, g in zip((pc, pr, w), g1))
    assert all(g.abs().sum() > 0 for g in g1)
    loss, _ = L.dpo_loss(pc, pr, b["rc"], b["rr"])
    first = torch.autograd.grad(loss, (pc, pr), retain_graph=True)
    kept = [g.clone() for g in first]
    for g in first:
        g.mul_(0)
    assert all(torch.equal(g, k) for g, k in zip(torch.autograd.grad(loss, (pc, pr)), kept))
    # An upstream gradient that requires grad (create_graph) stays in the gradient's graph, even at 1.
    loss, _ = L.dpo_loss(pc, pr, b["rc"], b["rr"])
    up = torch.tensor(1.0, requires_grad=True)
    gc, = torch.autograd.grad(loss, pc, up, create_graph=True)
    d_up, = torch.autograd.grad(gc.sum(), up)
    assert torch.equal(d_up, kept[0].sum())
    per_pair, _ = L.dpo_loss(pc, pr, b["rc"], b["rr"], reduction="none")
    up = torch.rand(300, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(per_pair, (pc, pr), up, retain_graph=True)
    expected = torch.autograd.grad(per_pair.mul(up).sum(), (pc, pr))
    assert all(torch.equal(a, e) for a, e in zip(got, expected))


def test_tiled_result_independent_of_threads_and_isa(tmp_path):
    """The tiled loop's sums (and the KL-DRO reduction's) sit in fixed lanes: the same bits with 1 or
    2 threads and on every ISA clone the CPU runs (the AVX-512, AVX2 and baseline code)."""
    script = (
        "import sys, torch\n"
        "from pyalign import losses as L\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x = [(torch.randn(20000, generator=g) * 3 - 30).requires_grad_() for _ in range(4)]\n"
        "w = torch.rand(20000, generator=g) + 0.5\n"
        "out = []\n"
        "for lt in ('sigmoid', 'hinge', 'robust'):\n"
        "    l, m = L.dpo_loss(*x, loss_type=lt, label_smoothing=0.1 if lt == 'robust' else 0.0, weights=w)\n"
        "    out += [l.detach(), m.values, *torch.autograd.grad(l, x[:2])]\n"
        "l, m = L.reward_model_loss(x[0], x[1], center_rewards_coefficient=0.01)\n"
        "out += [l.detach(), m.values]\n"
        "l, _ = L.dpo_loss(*x, weights=w, reduction='dro', dro_temperature=0.3)\n"
        "out += [l.detach(), *torch.autograd.grad(l, x[:2])]\n"
        "torch.save(out, sys.argv[1])\n")
    levels = ("baseline", "avx2", "avx512")
    isas = levels[:levels.index(kernels.cpu_isa_supported()) + 1]
    outs = []
    for k, (threads, isa) in enumerate([("1", None), ("2", None)] + [("1", i) for i in isas]):
        path = tmp_path / f"t{k}.pt"
        env = {**os.environ, "OMP_NUM_THREADS": threads}
        if isa:
            env["PYALIGN_CPU_ISA"] = isa
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, env=env, cwd=tmp_path)
        outs.append(torch.load(path))
    for other in outs[1:]:
        for a, e in zip(outs[0], other):
            assert torch.equal(a, e)
