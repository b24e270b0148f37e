"""Hostile inputs for the loss, uncertainty and plasticity families: every call returns a result
that matches the float64 reference, or raises a clean exception naming an argument. Run in a
subprocess by tests/test_fuzz.py."""
from __future__ import annotations

import math
import os

import torch
from hypothesis import given, settings, strategies as st

from pyalign import losses, plasticity, uncertainty
from pyalign.reference import losses as ref_losses, plasticity as ref_plasticity, uncertainty as ref_unc
from strategies import CLEAN, names_argument, scalars, tensors

EXAMPLES = settings(max_examples=int(os.environ.get("PYALIGN_FUZZ_EXAMPLES", "150")), deadline=None, derandomize=True)
FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def assert_clean(exc: BaseException, names) -> None:
    assert isinstance(exc, CLEAN), f"unclean exception {type(exc).__name__}: {exc}"
    msg = str(exc)
    assert names_argument(msg, names), f"exception does not name an argument: {msg!r}"


def close(got, want, scale=1.0):
    got, want = got.double(), want.double()
    assert got.numel() == want.numel(), (got.shape, want.shape)
    got, want = got.reshape(-1), want.reshape(-1)
    # Where the float64 reference is finite the result must be finite too; where the reference
    # itself overflows (NaN/Inf from finite inputs) only the kernel's own finiteness is required.
    fin = torch.isfinite(want)
    assert torch.isfinite(got)[fin].all(), "non-finite result where the reference is finite"
    tol = 5e-3 * scale * (1 + want[fin].abs())  # bf16/fp16 inputs are rounded before both computations
    assert ((got[fin] - want[fin]).abs() <= tol).all(), float((got[fin] - want[fin]).abs().max())


@st.composite
def pair_inputs(draw):
    if draw(st.booleans()):
        n = draw(st.integers(0, 6))
        dtype = draw(st.sampled_from(FLOATS))
        ts = [draw(tensors(shape=(n,), dtypes=[dtype])) for _ in range(4)]
    else:
        ts = [draw(tensors(max_dims=2)) for _ in range(4)]
    return ts


DPO_ARGS = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps", "beta",
            "label_smoothing", "loss_type", "chosen_lengths", "rejected_lengths", "weights", "f_alpha", "reduction")


@EXAMPLES
@given(pair_inputs(), st.sampled_from(["sigmoid", "hinge", "bco_pair", "nca_pair", "robust", "apo_zero", "discopop"]),
       scalars(0.1), st.sampled_from([0.0, 0.2, 0.6, -1.0, math.nan]))
def test_dpo_loss_correct_or_clean(ts, loss_type, beta, smoothing):
    pc, pr, rc, rr = ts
    try:
        loss, _ = losses.dpo_loss(pc, pr, rc, rr, loss_type=loss_type, beta=beta, label_smoothing=smoothing,
                                  reduction="none")
    except BaseException as e:  # noqa: BLE001
        assert_clean(e, DPO_ARGS)
        return
    if not all(t.dtype.is_floating_point for t in ts):
        return
    want = ref_losses.dpo_losses(pc, pr, rc, rr, loss_type=loss_type, beta=beta, label_smoothing=smoothing)
    if isinstance(want, tuple):
        want = want[0]
    if not all(torch.isfinite(t).all() for t in ts):
        return  # NaN/Inf inputs: any result is acceptable but must not crash (checked above)
    close(loss, want, scale=max(1.0, abs(beta)))


@st.composite
def ensemble_inputs(draw):
    if draw(st.booleans()):
        shape = (draw(st.integers(0, 5)), draw(st.integers(0, 6)))
        dtype = draw(st.sampled_from(FLOATS))
        return draw(tensors(shape=shape, dtypes=[dtype])), draw(tensors(shape=shape, dtypes=[dtype]))
    return draw(tensors()), draw(tensors())


@EXAMPLES
@given(ensemble_inputs(), st.sampled_from(["mean", "min", "uwo", "lcb", "median", "quantile", "bogus"]),
       scalars(1.0), st.sampled_from([0, 1, 2, -1]))
def test_aggregate_rewards_correct_or_clean(inp, method, lam, ddof):
    rewards, _ = inp
    try:
        out = uncertainty.aggregate_rewards(rewards, method=method, lam=lam, ddof=ddof)
    except BaseException as e:  # noqa: BLE001
        assert_clean(e, ("rewards", "method", "lam", "ddof", "q", "member_weights"))
        return
    if torch.isfinite(rewards).all() and rewards.numel() and rewards.dim() == 2:  # the reference's [M, N] layout
        want = ref_unc.reward_stats(rewards, ddof=ddof)
        close(out.mean, want["mean"])


@EXAMPLES
@given(ensemble_inputs(), scalars(1.0))
def test_preference_uncertainty_correct_or_clean(inp, beta):
    rc, rr = inp
    try:
        out = uncertainty.preference_uncertainty(rc, rr, beta=beta)
    except BaseException as e:  # noqa: BLE001
        assert_clean(e, ("r_chosen", "r_rejected", "beta", "member_weights"))
        return
    assert (out.epistemic.double().nan_to_num(0) >= -1e-6).all()
    if torch.isfinite(rc).all() and torch.isfinite(rr).all() and rc.numel() and rc.dim() == 2:
        want = ref_unc.preference_uncertainty(rc, rr, beta=beta)
        close(out.prob, want["prob"])
        close(out.epistemic, want["epistemic"], scale=10.0)


@st.composite
def token_ensemble(draw):
    if draw(st.booleans()):
        m, n, V = draw(st.integers(1, 3)), draw(st.integers(0, 4)), draw(st.integers(1, 7))
        logits = draw(tensors(shape=(m, n, V), dtypes=FLOATS))
        labels = draw(tensors(shape=(n,), dtypes=[torch.int64, torch.int32]))
        return logits, labels.clamp(-100, V + 1) if labels.numel() else labels
    return draw(tensors(max_dims=4)), draw(tensors())


@EXAMPLES
@given(token_ensemble(), scalars(1.0))
def test_token_uncertainty_correct_or_clean(inp, temperature):
    logits, labels = inp
    try:
        out = uncertainty.token_uncertainty(logits, labels, temperature=temperature)
    except BaseException as e:  # noqa: BLE001
        assert_clean(e, ("logits", "labels", "temperature", "ignore_index"))
        return
    if torch.isfinite(logits).all():
        want = ref_unc.token_uncertainty(logits, labels, temperature=temperature)
        close(out.total_entropy, want["total_entropy"], scale=10.0)
        close(out.mutual_information, want["mutual_information"], scale=10.0)


@st.composite
def rule_inputs(draw):
    if draw(st.booleans()):
        o, i, b = draw(st.integers(0, 5)), draw(st.integers(0, 5)), draw(st.integers(0, 4))
        dtype = draw(st.sampled_from(FLOATS))
        w = draw(tensors(shape=(o, i), dtypes=[dtype]))
        return w, draw(tensors(shape=(b, i), dtypes=FLOATS)), draw(tensors(shape=(b, o), dtypes=FLOATS))
    return draw(tensors()), draw(tensors()), draw(tensors())


RULE_ARGS = ("weight", "x", "y", "lr", "weight_decay", "w_min", "w_max", "norm", "norm_mode")


@EXAMPLES
@given(rule_inputs(), st.sampled_from(["hebb", "anti_hebb", "oja"]), scalars(0.01),
       st.sampled_from([None, -1.0, 0.5]), st.sampled_from([None, 1.0, -1.0, math.nan]))
def test_rules_correct_or_clean(inp, rule, lr, w_min, norm):
    w, x, y = inp
    w_before = w.clone() if isinstance(w, torch.Tensor) else w
    try:
        getattr(plasticity, rule)(w, x, y, lr=lr, w_min=w_min, norm=norm)
    except BaseException as e:  # noqa: BLE001
        assert_clean(e, RULE_ARGS)
        if isinstance(w, torch.Tensor) and w.dtype.is_floating_point:  # a refused update leaves the weight alone
            assert torch.equal(w.nan_to_num(0), w_before.nan_to_num(0))
        return
    # Activity beyond 1e15 overflows fp32 intermediates (y^2 in Oja) exactly as the eager fp32
    # formula does; the comparison covers the range where fp32 math is meaningful.
    if all(torch.isfinite(t).all() and t.double().abs().max() < 1e15 for t in (w_before, x, y) if t.numel()) \
            and w.dtype.is_floating_point:
        want = getattr(ref_plasticity, rule)(w_before.double(), x.double(), y.double(), lr=lr, w_min=w_min, norm=norm)
        close(w, want.to(w.dtype), scale=10.0)  # rounded like the weight: fp16 overflow is inf in both
