"""Hostile-input cases for every public function: each call must return a correct result or raise a
clean Python exception naming an argument. Run in a subprocess by tests/test_fuzz.py, so that a
crash (segfault, abort) is reported as a failure instead of killing the test session.
"""
from __future__ import annotations


import torch
from hypothesis import given, settings, strategies as st

import pyalign
from pyalign.reference.logprob import token_stats
from strategies import CLEAN, names_argument, scalars, tensors

EXAMPLES = settings(max_examples=int(__import__("os").environ.get("PYALIGN_FUZZ_EXAMPLES", "150")), deadline=None,
                    derandomize=True)
ARG_NAMES = ("logits", "labels", "hidden", "weight", "bias", "chunk_size", "temperature", "logit_scale", "softcap", "ignore_index", "outputs", "shift",
             "reduction", "inplace_backward", "validate", "entropy")


def assert_clean(exc: BaseException) -> None:
    assert isinstance(exc, CLEAN), f"unclean exception {type(exc).__name__}: {exc}"
    msg = str(exc)
    assert names_argument(msg, ARG_NAMES), f"exception does not name an argument: {msg!r}"


def _max_abs(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


@st.composite
def logprob_inputs(draw):
    good = draw(st.booleans())
    if good:  # well-formed shapes, hostile values/layouts
        lead = tuple(draw(st.lists(st.integers(0, 4), min_size=1, max_size=3)))
        V = draw(st.integers(1, 9))
        logits = draw(tensors(shape=lead + (V,), dtypes=[torch.float32, torch.float16, torch.bfloat16, torch.float64]))
        labels = draw(tensors(shape=lead, dtypes=[torch.int64, torch.int32]))
        labels = labels.clamp(-100, V + 1) if labels.numel() else labels
    else:
        logits = draw(tensors())
        labels = draw(tensors())
    kw = dict(temperature=draw(scalars(1.0)), logit_scale=draw(scalars(1.0)), softcap=draw(scalars(None)),
              shift=draw(st.booleans()))
    return logits, labels, kw


@EXAMPLES
@given(logprob_inputs())
def test_token_logprobs_correct_or_clean(inp):
    logits, labels, kw = inp
    try:
        stats = pyalign.token_logprobs(logits, labels, outputs=("entropy", "is_top1"), **kw)
    except BaseException as e:  # noqa: BLE001 - classifying is the point
        assert_clean(e)
        return
    ref = token_stats(logits, labels, **kw)
    got, want = stats.logprobs.double(), ref["logprobs"]
    assert got.shape == want.shape
    both_finite = torch.isfinite(want) & torch.isfinite(got)
    # Wherever the reference is finite the kernel must be too, and agree.
    assert torch.equal(torch.isfinite(want), torch.isfinite(got)) or not torch.isfinite(logits).all()
    scale = 1.0 + float(logits.double().abs().nan_to_num(0, 0, 0).max()) if logits.numel() else 1.0
    tol = 1e-4 * scale / min(1.0, kw["temperature"])
    err = (got - want)[both_finite].abs()
    assert err.numel() == 0 or float(err.max()) <= tol, float(err.max())
    if logits.numel() and torch.isfinite(logits).all():  # every statistic asked for, not only log p
        ent, want_ent = stats.entropy.double(), ref["entropy"]
        assert torch.isfinite(ent).all() and _max_abs(ent - want_ent) <= tol * 10
        assert torch.equal(stats.is_top1, ref["is_top1"])


@EXAMPLES
@given(logprob_inputs(), st.sampled_from(["sum", "mean", "max", 3]))
def test_sequence_logprobs_correct_or_clean(inp, reduction):
    logits, labels, kw = inp
    try:
        s, n = pyalign.sequence_logprobs(logits, labels, reduction=reduction, temperature=kw["temperature"],
                                         shift=kw["shift"])
    except BaseException as e:  # noqa: BLE001
        assert_clean(e)
        return
    want = token_stats(logits, labels, temperature=kw["temperature"], shift=kw["shift"])["logprobs"].sum(-1)
    got = (s if reduction == "sum" else s * n.clamp(min=1)).double()
    assert got.shape == want.shape
    assert torch.equal(torch.isfinite(got), torch.isfinite(want)) or not torch.isfinite(logits).all()
    fin = torch.isfinite(got) & torch.isfinite(want)
    scale = (1.0 + _max_abs(logits.double().nan_to_num(0, 0, 0))) * max(1, logits.shape[-2] if logits.dim() > 1 else 1)
    assert _max_abs((got - want)[fin]) <= 1e-4 * scale / min(1.0, kw["temperature"])


@EXAMPLES
@given(logprob_inputs())
def test_token_logprobs_backward_correct_or_clean(inp):
    logits, labels, kw = inp
    if not logits.dtype.is_floating_point:
        return
    x = logits.detach().clone().requires_grad_()
    try:
        lp, ent = pyalign.token_logprobs(x, labels, return_entropy=True, **kw)
        (lp.sum() + ent.sum()).backward()
    except BaseException as e:  # noqa: BLE001
        assert_clean(e)
        return
    assert x.grad is not None and x.grad.shape == x.shape
    if torch.isfinite(logits).all() and logits.numel() and logits.dtype == torch.float64:
        xr = logits.detach().clone().requires_grad_()
        ref = token_stats(xr, labels, **kw)
        (ref["logprobs"].sum() + ref["entropy"].sum()).backward()
        torch.testing.assert_close(x.grad, xr.grad, atol=1e-8 * (1 + float(logits.abs().max())), rtol=1e-6)


@st.composite
def linear_inputs(draw):
    if draw(st.booleans()):
        n, H, V = draw(st.integers(0, 5)), draw(st.integers(1, 6)), draw(st.integers(1, 9))
        dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
        hidden = draw(tensors(shape=(n, H), dtypes=[dtype]))
        weight = draw(tensors(shape=(V, H), dtypes=[dtype]))
        labels = draw(tensors(shape=(n,), dtypes=[torch.int64]))
        return hidden, weight, labels.clamp(-100, V) if labels.numel() else labels
    return draw(tensors()), draw(tensors()), draw(tensors())


@EXAMPLES
@given(linear_inputs(), scalars(1.0))
def test_linear_token_logprobs_correct_or_clean(inp, temperature):
    hidden, weight, labels = inp
    try:
        got = pyalign.linear_token_logprobs(hidden, weight, labels, temperature=temperature)
    except BaseException as e:  # noqa: BLE001
        assert_clean(e)
        return
    logits = hidden.double() @ weight.double().T
    want = token_stats(logits, labels, temperature=temperature)["logprobs"]
    if torch.isfinite(logits).all():
        scale = 1.0 + float(logits.abs().max()) if logits.numel() else 1.0
        err = (got.double() - want).abs()
        # bf16 inputs: the GEMM rounds the logits to bf16 first (as torch's bf16 matmul does).
        tol = (1e-2 if hidden.dtype == torch.bfloat16 else 1e-4) * scale / min(1.0, temperature)
        assert err.numel() == 0 or float(err.max()) <= tol, float(err.max())
