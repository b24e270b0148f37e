"""Hostile-but-valid inputs (random shapes incl. empty, transposed/sliced/expanded layouts,
fp32/bf16/fp16/fp64, extreme finite values, NaN/Inf mixed in): whenever a call SUCCEEDS its values
must match the plain-PyTorch reference (pyalign.reference) evaluated in float64 on the same
(rounded) inputs, and a NaN in the reference must never come back as a finite number. A refusal
must be a clean exception naming an argument. Run in a subprocess by tests/test_fuzz.py.

Tolerances: the kernels compute in fp32, so each result may carry ~1e-4 (about 1600 fp32 ulps)
times the magnitude of the terms it is built from (first-order error propagation: the sum of
|d out / d in| * |in| from float64 autograd of the reference for the losses, explicit magnitude
bounds for the reductions and rules), plus one rounding to the output dtype. Where the reference
evaluated in plain fp32 overflows although float64 does not, finiteness is not required (that
is the range fp32 math cannot represent)."""
from __future__ import annotations

import math
import os

import torch
from hypothesis import given, settings, strategies as st

from pyalign import losses, plasticity, uncertainty
from pyalign.reference import losses as ref_losses, plasticity as ref_plasticity, uncertainty as ref_unc
from strategies import CLEAN, names_argument, scalars, tensors

EXAMPLES = settings(max_examples=int(os.environ.get("PYALIGN_FUZZ_EXAMPLES", "60")), deadline=None, derandomize=True)
FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LAYOUTS_OK = ["contiguous", "transposed", "sliced", "expanded"]  # tensors() may also make overlapping rows
REL = 1e-4  # fp32 arithmetic, relative to the scale of the terms


def assert_clean(exc: BaseException, names) -> None:
    assert isinstance(exc, CLEAN), f"unclean exception {type(exc).__name__}: {exc}"
    assert names_argument(str(exc), names), f"exception does not name an argument: {exc!r}"


def out_eps(dtype) -> float:
    """Relative error of one rounding to the output dtype (unit roundoff, doubled for slack)."""
    return {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}.get(dtype, 2.0**-23)


def check(got, want, tol, want32=None, what=""):
    """Elementwise: where ``want`` (float64) is NaN, ``got`` must be non-finite; where it is finite
    (and representable in got's dtype, and fp32 evaluation does not overflow) ``got`` must be finite
    and within ``tol + rounding``."""
    assert isinstance(got, torch.Tensor), type(got)
    dt = got.dtype
    got = got.detach().double().reshape(-1)
    want = want.detach().double().reshape(-1)
    assert got.numel() == want.numel(), (what, got.shape, want.shape)
    tol = torch.as_tensor(tol, dtype=torch.float64).expand(want.shape) if not isinstance(tol, torch.Tensor) \
        else tol.detach().double().reshape(-1).expand(want.shape)
    nan = want.isnan()
    assert (~torch.isfinite(got[nan])).all(), f"{what}: finite result where the reference is NaN"
    fin = torch.isfinite(want) & torch.isfinite(want.to(dt).double())
    if want32 is not None:
        fin &= torch.isfinite(want32.detach().double().reshape(-1))
    assert torch.isfinite(got[fin]).all(), f"{what}: non-finite result where the reference is finite"
    t = tol.nan_to_num(math.inf)[fin] + out_eps(dt) * want[fin].abs() + 1e-12  # floor: fp32 denormals, exact 0
    err = (got[fin] - want[fin]).abs()
    assert (err <= t).all(), f"{what}: max err {float((err - t).max()):.3g} over tolerance; got {got} want {want}"


def sensitivity(fn, inputs):
    """|out| + sum_j |d out_i / d x_j| |x_j| for an elementwise float64 reference (first-order
    propagation of relative input/compute errors)."""
    xs = [x.detach().double().clone().requires_grad_(True) for x in inputs]
    out = fn(*xs)
    if out.numel() and out.requires_grad:
        grads = torch.autograd.grad(out.nan_to_num(0, 0, 0).sum(), xs, allow_unused=True)
    else:
        grads = [None] * len(xs)
    s = out.detach().abs().nan_to_num(0, 0, 0)
    for g, x in zip(grads, xs):
        if g is not None:
            s = s + (g * x.detach()).abs().nan_to_num(0, 0, 0)
    return out.detach(), s


@st.composite
def vec(draw, n, dtype, negative=False):
    t = draw(tensors(shape=(n,), dtypes=[dtype]))
    return -t.abs() - 1e-3 if negative else t


@st.composite
def batch(draw, k, negative=False):
    n = draw(st.integers(0, 6))
    dtype = draw(st.sampled_from(FLOATS))
    return [draw(vec(n, dtype, negative)) for _ in range(k)]


def lengths(n):
    return st.lists(st.integers(0, 40), min_size=n, max_size=n).map(lambda v: torch.tensor(v, dtype=torch.int64))


def bools(n):
    return st.lists(st.booleans(), min_size=n, max_size=n).map(lambda v: torch.tensor(v, dtype=torch.bool))


# ----------------------------------------------------------------------------------------- losses
KTO_ARGS = ("policy_logps", "ref_logps", "desirable", "policy_kl_logps", "ref_kl_logps", "beta",
            "desirable_weight", "undesirable_weight", "loss_type", "weights", "reduction")


@EXAMPLES
@given(batch(4), st.data(), scalars(0.1), st.sampled_from([1.0, 1.33, 0.5]), st.sampled_from(["kto", "apo_zero_unpaired"]),
       st.booleans())
def test_kto_loss_values(ts, data, beta, uw, loss_type, with_kl):
    p, r, pkl, rkl = ts
    d = data.draw(bools(p.numel()))
    kl = dict(policy_kl_logps=pkl, ref_kl_logps=rkl) if with_kl and loss_type == "kto" else {}
    try:
        loss, _ = losses.kto_loss(p, r, d, beta=beta, undesirable_weight=uw, loss_type=loss_type, reduction="none", **kl)
    except BaseException as e:  # noqa: BLE001
        assert_clean(e, KTO_ARGS)
        return
    refkl = dict(policy_kl=pkl.double(), ref_kl=rkl.double()) if kl else {}
    want, s = sensitivity(lambda a, b: ref_losses.kto_losses(a, b, d, beta=beta, undesirable_weight=uw,
                                                              loss_type=loss_type, **refkl), [p, r])
    z0_scale = (pkl.double().abs() + rkl.double().abs()).nan_to_num(0, 0, 0).mean().nan_to_num(0) if kl else 0.0
    check(loss, want, REL * (s + beta * uw * z0_scale), what="kto")


@EXAMPLES
@given(batch(2), st.data(), scalars(0.1), st.sampled_from([0.0, 0.7, -3.0]), st.sampled_from([0, 1, 9]))
def test_bco_loss_values(ts, data, beta, mean0, count0):
    p, r = ts
    d = data.draw(bools(p.numel()))
    running = losses.BCORunningMean()
    state = running.state_dict()
    state.update(mean=mean0, count=count0) if isinstance(state, dict) else None
    try:
        running.load_state_dict(state)
        m0, c0 = float(running.mean or 0.0), int(running.count or 0)
    except BaseException:  # noqa: BLE001 - state layout unknown: start from scratch
        running = losses.BCORunningMean()
        m0, c0 = float(running.mean or 0.0), int(running.count or 0)
    try:
        loss, _ = losses.bco_loss(p, r, d, running, beta=beta, reduction="none")
    except BaseException as e:  # noqa: BLE001
        assert_clean(e, ("policy_logps", "ref_logps", "desirable", "running", "beta", "weights", "reduction"))
        return
    want, s = sensitivity(lambda a, b: ref_losses.bco_losses(a, b, d, running_mean=m0, running_count=c0,
                                                              beta=beta)[0], [p, r])
    delta_scale = abs(m0) + beta * (p.double().abs() + r.double().abs()).mean().nan_to_num(0, 0, 0).item() if p.numel() else 0
    # Where fp32 evaluation of the same formula overflows (beta * r beyond 3e38) no finite result is owed.
    want32 = ref_losses.bco_losses(p, r, d, running_mean=m0, running_count=c0, beta=beta, dtype=torch.float32)[0]
    check(loss, want, REL * (s + delta_scale), want32, what="bco")


@EXAMPLES
@given(batch(2, negative=True), st.data(), scalars(0.1))
def test_orpo_loss_values(ts, data, beta):
    # log-probs are negative (-|x| - 1e-3): ORPO's documented clamp at m = -1e-6 never applies.
    # NaN stays (it must come back NaN through the clamp), +Inf becomes -1e4 (log-probs are <= 0).
    pc, pr = (torch.where(t.isnan(), t, t.nan_to_num(-1.0, -1e4, -math.inf)) for t in ts)
    lc, lr = data.draw(lengths(pc.numel())), data.draw(lengths(pc.numel()))
    lc, lr = lc.clamp(min=1), lr.clamp(min=1)
    try:
        loss, _ = losses.orpo_loss(pc, pr, chosen_lengths=lc, rejected_lengths=lr, beta=beta, reduction="none")
    except BaseException as e:  # noqa: BLE001
        assert_clean(e, ("policy_chosen_logps", "policy_rejected_logps", "chosen_lengths", "rejected_lengths",
                         "beta", "weights", "reduction"))
        return
    want, s = sensitivity(lambda a, b: ref_losses.orpo_losses(a, b, lc, lr, beta=beta)[0], [pc, pr])
    check(loss, want, REL * s, what="orpo")


CPO_ARGS = ("policy_chosen_logps", "policy_rejected_logps", "loss_type", "beta", "label_smoothing", "gamma", "alpha",
            "cpo_alpha", "chosen_lengths", "rejected_lengths", "weights", "reduction")


@EXAMPLES
@given(batch(2), st.data(), st.sampled_from(["sigmoid", "hinge", "ipo", "simpo"]), scalars(0.1),
       st.sampled_from([0.0, 0.2]), st.sampled_from([0.0, 0.5, -0.25]), st.sampled_from([0.0, 1.0]))
def test_cpo_loss_values(ts, data, loss_type, beta, smoothing, alpha, cpo_alpha):
    pc, pr = ts
    lc, lr = data.draw(lengths(pc.numel())).clamp(min=1), data.draw(lengths(pc.numel())).clamp(min=1)
    try:
        loss, _ = losses.cpo_loss(pc, pr, loss_type=loss_type, beta=beta, label_smoothing=smoothing, alpha=alpha,
                                  cpo_alpha=cpo_alpha, chosen_lengths=lc, rejected_lengths=lr, reduction="none")
    except BaseException as e:  # noqa: BLE001
        assert_clean(e, CPO_ARGS)
        return
    f = lambda a, b: ref_losses.cpo_losses(a, b, loss_type=loss_type, beta=beta, label_smoothing=smoothing,
                                           alpha=alpha, cpo_alpha=cpo_alpha, lc=lc, lr=lr)[0]
    want, s = sensitivity(f, [pc, pr])
    want32 = f(pc.float(), pr.float()) if loss_type == "ipo" or alpha else None  # squares / exp(40) overflow fp32
    check(loss, want, REL * s, want32, what=f"cpo/{loss_type}")


@EXAMPLES
@given(batch(2), st.data(), scalars(2.0), st.sampled_from([0.5, 0.0, 1.4]), st.sampled_from([0.0, 0.3]))
def test_simpo_loss_values(ts, data, beta, gamma, alpha):
    pc, pr = ts
    lc, lr = data.draw(lengths(pc.numel())).clamp(min=1), data.draw(lengths(pc.numel())).clamp(min=1)
    try:
        loss, _ = losses.simpo_loss(pc, pr, chosen_lengths=lc, rejected_lengths=lr, beta=beta, gamma=gamma,
                                    alpha=alpha, reduction="none")
    except BaseException as e:  # noqa: BLE001
        assert_clean(e, CPO_ARGS)
        return
    f = lambda a, b: ref_losses.cpo_losses(a, b, loss_type="simpo", beta=beta, gamma=gamma, alpha=alpha,
                                           cpo_alpha=0.0, lc=lc, lr=lr)[0]
    want, s = sensitivity(f, [pc, pr])
    check(loss, want, REL * s, f(pc.float(), pr.float()) if alpha else None, what="simpo")


@EXAMPLES
@given(batch(3), st.sampled_from([None, "tensor", 0.5]), st.sampled_from([None, 0.01]))
def test_reward_model_loss_values(ts, margin_kind, center):
    rc, rr, m = ts
    margin = m if margin_kind == "tensor" else margin_kind
    try:
        loss, _ = losses.reward_model_loss(rc, rr, margin=margin, center_rewards_coefficient=center, reduction="none")
    except BaseException as e:  # noqa: BLE001
        assert_clean(e, ("rewards_chosen", "rewards_rejected", "margin", "center_rewards_coefficient", "weights",
                         "reduction"))
        return
    c = center or 0.0
    if margin_kind == "tensor":
        f = lambda a, b, mm: ref_losses.rm_losses(a, b, margin=mm, center=c)
        want, s = sensitivity(f, [rc, rr, m])
        want32 = f(rc.float(), rr.float(), m.float())
    else:
        mm = None if margin is None else torch.full_like(rc, margin, dtype=torch.float64)
        f = lambda a, b: ref_losses.rm_losses(a, b, margin=None if mm is None else mm.to(a.dtype), center=c)
        want, s = sensitivity(f, [rc, rr])
        want32 = f(rc.float(), rr.float())
    check(loss, want, REL * s, want32, what="reward_model")


# ------------------------------------------------------------------------------------ uncertainty
@st.composite
def ensemble(draw, k=1):
    shape = (draw(st.integers(1, 5)), draw(st.integers(0, 6)))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
    return [draw(tensors(shape=shape, dtypes=[dtype])) for _ in range(k)]


AGG_ARGS = ("rewards", "method", "lam", "q", "ddof", "member_weights", "variances")


@EXAMPLES
@given(ensemble(), st.sampled_from(["mean", "min", "uwo", "lcb", "median", "quantile"]), scalars(1.0),
       st.sampled_from([0.1, 0.5, 0.9]), st.sampled_from([0, 1]), st.booleans(), st.integers(0, 2**16))
def test_aggregate_rewards_values(inp, method, lam, q, ddof, weighted, seed):
    (r,) = inp
    M = r.shape[0]
    w = torch.rand(M, generator=torch.Generator().manual_seed(seed)) + 0.1 if weighted else None
    try:
        out = uncertainty.aggregate_rewards(r, method=method, lam=lam, q=q, ddof=ddof, member_weights=w)
    except BaseException as e:  # noqa: BLE001
        assert_clean(e, AGG_ARGS)
        return
    unweighted = method in ("median", "quantile")
    qq = (0.5 if method == "median" else q) if r.shape[1] else None  # torch.quantile refuses empty input
    ref = ref_unc.reward_stats(r, weights=None if unweighted else w, ddof=ddof, q=qq)
    if M == 1 and ddof == 0:  # documented: the variance of one member is 0 (the reference gives inf - inf)
        ref["var"] = torch.zeros_like(ref["var"])
    r64 = r.double()
    A = r64.abs().nan_to_num(0, 0, 0).amax(0) if M else torch.zeros(r.shape[1:], dtype=torch.float64)
    ref32 = ref_unc.reward_stats(r.float(), weights=None if unweighted else w, ddof=ddof, dtype=torch.float32)
    check(out.mean, ref["mean"], REL * A, what="mean")
    check(out.min, ref["min"], REL * A, what="min")
    check(out.max, ref["max"], REL * A, what="max")
    tol_var = REL * A * A * (1 + ddof * M)
    want = {"mean": ref["mean"], "min": ref["min"], "uwo": ref["mean"] - lam * ref["var"],
            "lcb": ref["mean"] - lam * ref["var"].sqrt(), "median": ref.get("quantile"),
            "quantile": ref.get("quantile")}[method]
    check(out.variance, ref["var"], tol_var, ref32["var"], what="variance")
    # std = sqrt(var) is ill-conditioned at 0: compare std^2 with the variance's tolerance.
    check(out.std.double() ** 2, ref["var"], tol_var + 2 * out_eps(out.std.dtype) * ref["var"].abs(), ref32["var"],
          what="std^2")
    if want is None:
        return  # empty: no quantile
    want = {"mean": ref["mean"], "min": ref["min"], "uwo": ref["mean"] - lam * ref["var"],
            "lcb": ref["mean"] - lam * ref["var"].sqrt(), "median": ref.get("quantile"),
            "quantile": ref.get("quantile")}[method]
    tol = REL * A * (1 + abs(lam) * A) if method == "uwo" else REL * A
    if method == "lcb":  # the std's error: |d sqrt(v)| <= sqrt(|dv|)
        tol = REL * A + abs(lam) * (tol_var + out_eps(out.std.dtype) * ref["var"].abs()).sqrt()
    check(out.reward, want, tol, ref32["var"] if method in ("uwo", "lcb") else None, what=f"reward/{method}")


@EXAMPLES
@given(ensemble(2), scalars(1.0))
def test_preference_uncertainty_values(inp, beta):
    rc, rr = inp
    try:
        out = uncertainty.preference_uncertainty(rc, rr, beta=beta)
    except BaseException as e:  # noqa: BLE001
        assert_clean(e, ("r_chosen", "r_rejected", "beta", "member_weights"))
        return
    ref = ref_unc.preference_uncertainty(rc, rr, beta=beta)
    # p = sigmoid(x) moves by <= |dx|/4 and the binary entropy h(p) by |x| p (1-p) |dx| <= 0.23 |dx|.
    A = (abs(beta) * (rc.double().abs() + rr.double().abs())).nan_to_num(0, 0, 0).amax(0)
    tol = REL * (1 + A)
    for name in ("prob", "prob_variance", "total", "aleatoric", "epistemic"):
        check(getattr(out, name), ref[name], 2 * tol, what=name)


@EXAMPLES
@given(st.integers(1, 5), st.integers(0, 6), st.sampled_from(FLOATS), st.data(),
       st.sampled_from(["mutual_information", "margin_std"]), st.sampled_from([None, 0.5]), st.sampled_from([0.0, 0.2]))
def test_uncertainty_weights_identical_members(M, N, dtype, data, source, temperature, min_weight):
    # Members that agree carry no epistemic uncertainty: every pair gets weight 1.
    c = data.draw(tensors(shape=(1, N), dtypes=[dtype])).clamp(-1e4, 1e4).nan_to_num(0.0)
    r = data.draw(tensors(shape=(1, N), dtypes=[dtype])).clamp(-1e4, 1e4).nan_to_num(0.0)
    rc, rr = c.expand(M, N), r.expand(M, N).contiguous()  # one expanded (stride 0), one materialized
    try:
        w = uncertainty.uncertainty_weights(rc, rr, source=source, temperature=temperature, min_weight=min_weight)
    except BaseException as e:  # noqa: BLE001
        assert_clean(e, ("r_chosen", "r_rejected", "source", "temperature", "min_weight", "beta", "member_weights"))
        return
    assert w.shape == (N,), w.shape
    assert torch.isfinite(w).all() and ((w.double() - 1).abs() <= 1e-5).all(), w


@st.composite
def calib_inputs(draw):
    n = draw(st.integers(0, 8))
    dtype = draw(st.sampled_from(FLOATS))
    if draw(st.booleans()):
        logits = draw(tensors(shape=(n,), dtypes=[torch.float64])).clamp(-30, 30).nan_to_num(0.0)
        return torch.sigmoid(logits).to(dtype), draw(bools(n)).long()
    C = draw(st.integers(2, 4))
    logits = draw(tensors(shape=(n, C), dtypes=[torch.float64])).clamp(-30, 30).nan_to_num(0.0)
    probs = torch.softmax(logits, -1).to(dtype)
    t = draw(st.lists(st.integers(0, C - 1), min_size=n, max_size=n))
    return probs, torch.tensor(t, dtype=torch.int64)


@EXAMPLES
@given(calib_inputs(), st.sampled_from([1, 3, 7, 15]))
def test_calibration_values(inp, n_bins):
    probs, targets = inp
    try:
        out = uncertainty.calibration(probs, targets, n_bins=n_bins)
    except BaseException as e:  # noqa: BLE001
        assert_clean(e, ("probs", "targets", "n_bins", "strategy"))
        return
    if not probs.shape[0]:
        return  # no samples: the reference divides by zero
    ece, mce = ref_unc.calibration(probs, targets, n_bins=n_bins)
    check(out.ece, torch.tensor(ece), REL, what="ece")
    check(out.mce, torch.tensor(mce), REL, what="mce")
    p = probs.double()
    pt = torch.where(targets == 1, p, 1 - p) if p.dim() == 1 else p.gather(1, targets[:, None]).squeeze(1)
    check(out.nll, -pt.clamp(min=1e-12).log().mean(), REL * 28, what="nll")  # |log 1e-12| < 28


@EXAMPLES
@given(st.integers(0, 12), st.sampled_from(FLOATS), st.data(), st.sampled_from([0.01, 0.05, 0.1, 0.2, 0.5, 0.9]))
def test_conformal_quantile_values(n, dtype, data, alpha):
    s = data.draw(tensors(shape=(n,), dtypes=[dtype]))
    try:
        got = uncertainty.conformal_quantile(s, alpha)
    except BaseException as e:  # noqa: BLE001
        assert_clean(e, ("scores", "alpha"))
        return
    if s.isnan().any():
        return  # NaN scores have no order (any result or a refusal; a crash was excluded above)
    k = math.ceil((n + 1) * (1 - alpha))
    want = math.inf if k > n else float(torch.sort(s.double()).values[max(k, 1) - 1])
    assert got.numel() == 1 and float(got) == want, (float(got), want, k, n)


# ------------------------------------------------------------------------------------- plasticity
RULE_ARGS = ("weight", "x", "y", "u", "theta", "trace", "modulator", "pre", "post", "pre_trace", "post_trace", "lr",
             "tau", "temperature", "decay", "weight_decay", "w_min", "w_max", "norm", "norm_mode")


@st.composite
def rule_inputs(draw, with_y=True):
    o, i, b = draw(st.integers(0, 5)), draw(st.integers(0, 5)), draw(st.integers(1, 4))
    dtype = draw(st.sampled_from(FLOATS))
    w = draw(tensors(shape=(o, i), dtypes=[dtype]))
    x = draw(tensors(shape=(b, i), dtypes=[dtype]))
    y = draw(tensors(shape=(b, o), dtypes=[dtype])) if with_y and draw(st.booleans()) else None
    return w, x, y


CONSTRAINTS = st.sampled_from([{}, {"w_min": -0.5}, {"w_min": -1.0, "w_max": 1.0}, {"norm": 1.0},
                               {"norm": 2.0, "norm_mode": "fixed"}, {"weight_decay": 0.1}])


def mag(*ts):
    return max([float(t.double().abs().nan_to_num(0, 0, 0).max()) for t in ts if t is not None and t.numel()] + [0.0])


def rule_check(w_after, want64, want32, w_before, scale, what):
    check(w_after, want64, REL * (mag(w_before) + scale), want32, what=what)


@EXAMPLES
@given(rule_inputs(), scalars(0.01), CONSTRAINTS)
def test_sanger_values(inp, lr, cons):
    w, x, y = inp
    w0 = w.clone()
    try:
        plasticity.sanger(w, x, y, lr=lr, **cons)
    except BaseException as e:  # noqa: BLE001
        assert_clean(e, RULE_ARGS)
        return
    f = lambda d: ref_plasticity.sanger(w0.to(d), x.to(d), None if y is None else y.to(d), lr=lr, **cons)
    Aw, Ax = mag(w0), mag(x)
    Ay = mag(y) if y is not None else Aw * Ax * max(1, w0.shape[1])
    rule_check(w, f(torch.float64), f(torch.float32), w0, abs(lr) * (Ay * Ax + w0.shape[0] * Ay * Ay * Aw), "sanger")


@EXAMPLES
@given(rule_inputs(), st.data(), scalars(0.01), st.sampled_from([100.0, 2.0]), CONSTRAINTS)
def test_bcm_values(inp, data, lr, tau, cons):
    w, x, y = inp
    if y is None:
        y = data.draw(tensors(shape=(x.shape[0], w.shape[0]), dtypes=[w.dtype]))
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    theta = data.draw(tensors(shape=(w.shape[0],), dtypes=[torch.float64])).abs().to(acc).contiguous()
    w0, th0 = w.clone(), theta.clone()
    try:
        plasticity.bcm(w, x, y, theta, lr=lr, tau=tau, **cons)
    except BaseException as e:  # noqa: BLE001
        assert_clean(e, RULE_ARGS)
        return
    f = lambda d: ref_plasticity.bcm(w0.to(d), x.to(d), y.to(d), th0.to(d), lr=lr, tau=tau, **cons)
    (w64, t64), (w32, t32) = f(torch.float64), f(torch.float32)
    Ax, Ay, At = mag(x), mag(y), mag(th0)
    rule_check(w, w64, w32, w0, abs(lr) * Ay * (Ay + At) * Ax, "bcm weight")
    check(theta, t64, REL * (At + Ay * Ay), t32, what="bcm theta")


@EXAMPLES
@given(rule_inputs(), scalars(0.01), st.sampled_from([1.0, 0.3, 5.0]), CONSTRAINTS)
def test_soft_hebb_values(inp, lr, temperature, cons):
    w, x, u = inp
    w0 = w.clone()
    try:
        plasticity.soft_hebb(w, x, u, lr=lr, temperature=temperature, **cons)
    except BaseException as e:  # noqa: BLE001
        assert_clean(e, RULE_ARGS)
        return
    f = lambda d: ref_plasticity.soft_hebb(w0.to(d), x.to(d), None if u is None else u.to(d), lr=lr,
                                           temperature=temperature, **cons)
    Aw, Ax = mag(w0), mag(x)
    Au = mag(u) if u is not None else Aw * Ax * max(1, w0.shape[1])
    # softmax(u / T) moves by ~ |du| / T, with |du| ~ REL * Au.
    rule_check(w, f(torch.float64), f(torch.float32), w0,
               abs(lr) * (Ax + Au * Aw) * (1 + Au / temperature), "soft_hebb")


@st.composite
def spikes(draw):
    T, B, i, o = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(0, 4)), draw(st.integers(0, 4))
    dtype = draw(st.sampled_from(FLOATS))
    w = draw(tensors(shape=(o, i), dtypes=[dtype]))
    pre = (draw(tensors(shape=(T, B, i), dtypes=[torch.float64])) > 0).to(dtype)
    post = (draw(tensors(shape=(T, B, o), dtypes=[torch.float64])) > 0).to(dtype)
    if draw(st.booleans()):  # a single step [B, n]
        pre, post = pre[0], post[0]
    return w, pre, post


@EXAMPLES
@given(spikes(), scalars(0.01), st.sampled_from([(0.0, 0.0), (0.5, 0.3)]), st.sampled_from([1.0, 0.7]), CONSTRAINTS)
def test_stdp_values(inp, lr, triplet, a_minus, cons):
    w, pre, post = inp
    w0 = w.clone()
    try:
        traces = plasticity.stdp(w, pre, post, lr=lr, a_minus=a_minus, a3_plus=triplet[0], a3_minus=triplet[1], **cons)
    except BaseException as e:  # noqa: BLE001
        assert_clean(e, RULE_ARGS)
        return
    f = lambda d: ref_plasticity.stdp(w0.to(d), pre.to(d), post.to(d), lr=lr, a_minus=a_minus, a3_plus=triplet[0],
                                      a3_minus=triplet[1], **cons)
    w64, w32 = f(torch.float64), f(torch.float32)
    T = pre.shape[0] if pre.dim() == 3 else 1
    rule_check(w, w64[0], w32[0], w0, abs(lr) * T * T * 2 * (1 + a_minus) * 4, "stdp weight")
    if not triplet[0] and not triplet[1]:
        check(traces[0], w64[1], REL * T, what="stdp pre_trace")
        check(traces[1], w64[2], REL * T, what="stdp post_trace")


@EXAMPLES
@given(rule_inputs(), st.data(), scalars(0.01), st.sampled_from([0.9, 0.0]), st.sampled_from(["scalar", "tensor"]),
       CONSTRAINTS)
def test_three_factor_values(inp, data, lr, decay, mod_kind, cons):
    w, x, y = inp
    if y is None:
        y = data.draw(tensors(shape=(x.shape[0], w.shape[0]), dtypes=[w.dtype]))
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    trace = data.draw(tensors(shape=tuple(w.shape), dtypes=[torch.float64])).to(acc).contiguous()
    mod = data.draw(tensors(shape=(x.shape[0],), dtypes=[torch.float32])) if mod_kind == "tensor" \
        else data.draw(st.sampled_from([1.0, -0.5, 0.0, 2.0]))
    w0, tr0 = w.clone(), trace.clone()
    try:
        plasticity.three_factor(w, x, y, trace, mod, lr=lr, decay=decay, **cons)
    except BaseException as e:  # noqa: BLE001
        assert_clean(e, RULE_ARGS)
        return
    f = lambda d: ref_plasticity.three_factor(w0.to(d), x.to(d), y.to(d), tr0.to(d),
                                              mod.to(d) if isinstance(mod, torch.Tensor) else mod, lr=lr,
                                              decay=decay, **cons)
    (w64, t64), (w32, t32) = f(torch.float64), f(torch.float32)
    Am = mag(mod) if isinstance(mod, torch.Tensor) else abs(mod)
    At, Ah = mag(tr0), mag(x) * mag(y)
    rule_check(w, w64, w32, w0, abs(lr) * Am * (At + Ah), "three_factor weight")
    check(trace, t64, REL * (At + Ah), t32, what="three_factor trace")
