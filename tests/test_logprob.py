"""Log-prob kernels against the float64 PyTorch reference (pyalign.reference.logprob), on every
device: inputs are drawn on the CPU from seeded generators and moved, so a CPU case and its CUDA
twin see the same numbers."""
from __future__ import annotations

import importlib.metadata
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

import pyalign
from pyalign._ext import kernels
from pyalign.ops.logprob import token_logprobs_backward_op, token_logprobs_op
from pyalign.reference.logprob import token_stats

ALL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logit", "is_top1")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Absolute tolerance on log-probs/entropy vs the fp64 reference, for inputs that are exactly
# representable in the given dtype (the reference sees the same rounded logits). The kernels
# accumulate in fp32: errors are a few fp32 ulps of log Z, as for PyTorch's own fp32 kernel.
ATOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5, torch.float64: 1e-10}
# hypothesis tests that take the device fixture: the fixture is a constant string, so that
# hypothesis does not reset it between examples is harmless.
WITH_DEVICE = settings(suppress_health_check=[*settings.default.suppress_health_check,
                                              HealthCheck.function_scoped_fixture])


def _logits(shape, dtype, device, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def _randn(shape, device, seed=2, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device)


def _labels(shape, V, device, ignore_frac=0.2, seed=1):
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, V, shape, generator=g)
    lab[torch.rand(shape, generator=g) < ignore_frac] = -100
    return lab.to(device)


def _check(stats, ref, dtype, scale=1.0):
    atol = ATOL[dtype] * scale
    for k in ("logprobs", "entropy", "log_sum_sq_probs", "mean_logit"):
        got = getattr(stats, k)
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(got.double().cpu(), ref[k].cpu(), atol=atol, rtol=1e-5, msg=k)
    assert torch.equal(stats.is_top1.cpu(), ref["is_top1"].cpu())


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("V", [1, 2, 3, 127, 513, 32001])
def test_matches_reference(device, dtype, V):
    x = _logits((3, 5, V), dtype, device)
    y = _labels((3, 5), V, device)
    got = pyalign.token_logprobs(x, y, outputs=ALL_OUTPUTS)
    _check(got, token_stats(x, y), dtype)


@settings(WITH_DEVICE)
@given(
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    V=st.integers(1, 700),
    dtype=st.sampled_from(DTYPES),
    temperature=st.floats(0.25, 4.0),
    softcap=st.one_of(st.none(), st.floats(1.0, 50.0)),
    logit_scale=st.floats(0.1, 3.0),
    scale=st.sampled_from([0.1, 3.0, 30.0]),
    ignore_frac=st.sampled_from([0.0, 0.3, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_shapes_and_options(device, lead, V, dtype, temperature, softcap, logit_scale, scale, ignore_frac,
                                       seed):
    x = _logits((*lead, V), dtype, device, scale=scale, seed=seed)
    y = _labels(tuple(lead), V, device, ignore_frac=ignore_frac, seed=seed + 1)
    kw = dict(temperature=temperature, softcap=softcap, logit_scale=logit_scale)
    got = pyalign.token_logprobs(x, y, outputs=ALL_OUTPUTS, **kw)
    ref = token_stats(x, y, **kw)
    # Entropy/log-prob error scales with the magnitude of the transformed logits.
    mag = max(1.0, scale * logit_scale * 5 / temperature if softcap is None else softcap / temperature)
    _check(got, ref, dtype, scale=mag)


def test_extreme_and_masked_logits(device):
    V = 1000
    x = _logits((6, V), torch.float32, device, scale=1e4)
    x[1, ::2] = -math.inf                       # masked vocabulary entries
    x[2, :] = 1e4                               # all equal, huge
    x[3, :] = -1e4
    y = torch.tensor([5, 4, 0, 999, -100, 7], device=device)
    x[5, 7] = -math.inf                         # the label itself masked -> -inf
    got = pyalign.token_logprobs(x, y, outputs=ALL_OUTPUTS)
    ref = token_stats(x, y)
    torch.testing.assert_close(got.logprobs.double().cpu(), ref["logprobs"].cpu(), atol=1e-3, rtol=1e-6)
    torch.testing.assert_close(got.entropy.double().cpu(), ref["entropy"].cpu(), atol=1e-3, rtol=1e-5)
    assert got.logprobs[5] == -math.inf
    assert torch.isfinite(got.entropy).all()
    assert abs(float(got.entropy[2]) - math.log(V)) < 1e-4


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_match_reference(device, dtype):
    V = 301
    x = _logits((4, 6, V), dtype, device)
    y = _labels((4, 6), V, device)
    kw = dict(temperature=0.8, softcap=20.0, logit_scale=1.3)
    gl = _randn((4, 6), device, seed=2)
    ge = _randn((4, 6), device, seed=3)

    xa = x.clone().requires_grad_()
    lp, ent = pyalign.token_logprobs(xa, y, return_entropy=True, **kw)
    ((lp * gl).sum() + (ent * ge).sum()).backward()

    xr = x.double().clone().requires_grad_()
    ref = token_stats(xr, y, **kw)
    ((ref["logprobs"] * gl.double()).sum() + (ref["entropy"] * ge.double()).sum()).backward()
    assert xa.grad.dtype == dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(xa.grad.double().cpu(), xr.grad.cpu(), atol=tol, rtol=tol)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_gradcheck_fp64(device, softcap):
    V = 7
    x = _logits((2, 3, V), torch.float64, device).requires_grad_()
    y = torch.tensor([[0, 6, -100], [3, 3, 1]], device=device)

    def f(x):
        lp, ent = pyalign.token_logprobs(x, y, return_entropy=True, temperature=0.7, softcap=softcap)
        return lp, ent

    assert torch.autograd.gradcheck(f, (x,))


def test_shift_matches_manual_slice(device):
    V = 50
    x = _logits((2, 7, V), torch.float32, device)
    y = _labels((2, 7), V, device)
    xs = x.clone().requires_grad_()
    lp, ent = pyalign.token_logprobs(xs, y, shift=True, return_entropy=True)
    assert lp.shape == (2, 6)
    (lp.sum() + ent.sum()).backward()
    xm = x.clone().requires_grad_()
    lp2, ent2 = pyalign.token_logprobs(xm[:, :-1], y[:, 1:], return_entropy=True)
    (lp2.sum() + ent2.sum()).backward()
    assert torch.equal(lp, lp2) and torch.equal(ent, ent2)
    assert torch.equal(xs.grad, xm.grad)
    assert (xs.grad[:, -1] == 0).all()


def test_non_contiguous_leading_dims_read_in_place(device):
    V = 64
    base = _logits((4, 10, V), torch.float32, device)
    x = base[:, ::3]              # strided sequence dim, unit vocab stride
    y = _labels((4, 4), V, device)
    got = pyalign.token_logprobs(x, y)
    torch.testing.assert_close(got.double().cpu(), token_stats(x, y)["logprobs"].cpu(), atol=2e-5, rtol=0)
    xt = base.transpose(1, 2)[:, :, :5]  # vocab stride != 1: one documented contiguous copy
    yt = _labels((4, V), 5, device)
    got = pyalign.token_logprobs(xt, yt)
    torch.testing.assert_close(got.double().cpu(), token_stats(xt, yt)["logprobs"].cpu(), atol=2e-5, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_backward_same_gradient(device, dtype):
    V = 257
    x = _logits((3, 9, V), dtype, device)
    y = _labels((3, 9), V, device)
    g = _randn((3, 8), device)
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    # A non-leaf logits tensor (as from an LM head) is what in-place backward targets.
    la, ea = pyalign.token_logprobs(a * 1, y, shift=True, return_entropy=True)
    ((la * g).sum() + ea.sum()).backward()
    lb_in = b * 1
    lb, eb = pyalign.token_logprobs(lb_in, y, shift=True, return_entropy=True, inplace_backward=True)
    ((lb * g).sum() + eb.sum()).backward()
    assert torch.equal(a.grad, b.grad)


def test_sequence_logprobs(device):
    V = 40
    x = _logits((3, 6, V), torch.float32, device)
    y = _labels((3, 6), V, device)
    y[2] = -100                                # a row without any valid token
    tok = pyalign.token_logprobs(x, y)
    s, n = pyalign.sequence_logprobs(x, y)
    m, _ = pyalign.sequence_logprobs(x, y, reduction="mean")
    valid = y != -100
    assert torch.equal(n, valid.sum(-1))
    torch.testing.assert_close(s, (tok * valid).sum(-1))
    assert m[2] == 0 and s[2] == 0 and torch.isfinite(m).all()
    torch.testing.assert_close(m[:2], s[:2] / n[:2])


def test_label_int32_and_ignore_everywhere(device):
    x = _logits((5, 11), torch.float32, device)
    y = torch.full((5,), -7, dtype=torch.int32, device=device)
    lp, ent = pyalign.token_logprobs(x, y, ignore_index=-7, return_entropy=True)
    assert (lp == 0).all() and (ent == 0).all()
    y2 = torch.arange(5, dtype=torch.int32, device=device)
    torch.testing.assert_close(pyalign.token_logprobs(x, y2), pyalign.token_logprobs(x, y2.long()))


def test_deterministic_and_thread_independent():
    # CPU only: varies the OpenMP thread count of the CPU kernels.
    x = _logits((64, 5003), torch.float32, "cpu")
    y = _labels((64,), 5003, "cpu")
    a = pyalign.token_logprobs(x, y, outputs=ALL_OUTPUTS)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        b = pyalign.token_logprobs(x, y, outputs=ALL_OUTPUTS)
    finally:
        torch.set_num_threads(n)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_torch_compile_fullgraph_no_graph_break(device):
    V = 33
    x = _logits((2, 5, V), torch.float32, device).requires_grad_()
    y = _labels((2, 5), V, device)

    def f(x, y):
        lp, ent = pyalign.token_logprobs(x, y, shift=True, return_entropy=True, temperature=0.9)
        return (lp.sum(-1) - 0.1 * ent.mean(-1)).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, y)
    out.backward()
    g = x.grad.clone()
    x.grad = None
    f(x, y).backward()
    torch.testing.assert_close(out, f(x, y))
    torch.testing.assert_close(g, x.grad)


def test_opcheck(device):
    x = _logits((3, 4, 9), torch.float32, device).requires_grad_()
    y = _labels((3, 4), 9, device)
    torch.library.opcheck(token_logprobs_op.op, (x, y, -100, 1.0, 1.0, 0.0, False, 15, False))
    torch.library.opcheck(token_logprobs_op.op, (x, y, -100, 0.5, 2.0, 4.0, True, 1, False))
    lse = torch.zeros(12, device=device)
    torch.library.opcheck(token_logprobs_backward_op.op, (torch.ones(12, device=device), None, x.detach(), y, lse, None,
                                                       -100, 1.0, 1.0, 0.0, False))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(labels=torch.zeros(3, 4)), TypeError, "labels"),
        (dict(labels=torch.zeros(3, dtype=torch.long)), ValueError, "labels"),
        (dict(logits=torch.zeros(3, 4, 5, dtype=torch.int64)), TypeError, "logits"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(softcap=-1.0), ValueError, "softcap"),
        (dict(logit_scale=0.0), ValueError, "logit_scale"),
        (dict(outputs=("bogus",)), ValueError, "outputs"),
        (dict(logits=torch.zeros(3, 4, 0)), ValueError, "logits"),
        (dict(labels=torch.full((3, 4), 5, dtype=torch.long)), ValueError, "labels"),
        (dict(labels=torch.full((3, 4), -2, dtype=torch.long)), ValueError, "labels"),
        (dict(logits="nope"), TypeError, "logits"),
    ],
)
def test_bad_input(device, kwargs, exc, match):
    args = dict(logits=torch.zeros(3, 4, 5), labels=torch.zeros(3, 4, dtype=torch.long))
    args.update(kwargs)
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    logits, labels = args.pop("logits"), args.pop("labels")
    with pytest.raises(exc, match=match):
        pyalign.token_logprobs(logits, labels, **args)


def test_inplace_backward_rejects_expanded_logits(device):
    x = torch.zeros(1, 5, device=device).expand(4, 5)
    with pytest.raises(ValueError, match="logits"):
        pyalign.token_logprobs(x, torch.zeros(4, dtype=torch.long, device=device), inplace_backward=True)


@pytest.mark.parametrize("stride", [(2, 1), (1, 1), (0, 1)])
def test_overlapping_logits(device, stride):
    # Rows that share elements: read correctly, refused for in-place writes, gradients accumulate.
    base = _randn(40, device, dtype=torch.float64)
    labels = torch.tensor([0, 4, 2, 1], device=device)
    with pytest.raises(ValueError, match="logits.*overlap"):
        pyalign.token_logprobs(base.as_strided((4, 5), stride), labels, inplace_backward=True)
    leaf = base.clone().requires_grad_()
    lp, ent = pyalign.token_logprobs(leaf.as_strided((4, 5), stride), labels, return_entropy=True)
    (lp.sum() + ent.sum()).backward()
    ref_leaf = base.cpu().clone().requires_grad_()
    ref = token_stats(ref_leaf.as_strided((4, 5), stride), labels.cpu())
    (ref["logprobs"].sum() + ref["entropy"].sum()).backward()
    torch.testing.assert_close(lp.cpu(), ref["logprobs"].to(lp.dtype), atol=1e-10, rtol=0)
    torch.testing.assert_close(leaf.grad.cpu(), ref_leaf.grad, atol=1e-10, rtol=0)


def test_device_mismatch_names_the_argument(device):
    r = lambda *shape: torch.randn(*shape, device=device)
    with pytest.raises(ValueError, match="labels.*device|labels: expected a tensor on"):
        pyalign.token_logprobs(r(3, 5), torch.zeros(3, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="policy_rejected_logps|rejected"):
        pyalign.losses.dpo_loss(r(4), torch.randn(4, device="meta"), r(4), r(4))
    with pytest.raises(ValueError, match="labels"):
        pyalign.uncertainty.token_uncertainty(r(2, 3, 5), torch.zeros(3, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="x"):
        pyalign.plasticity.hebb(r(4, 6), torch.randn(3, 6, device="meta"), r(3, 4), lr=0.1)
    with pytest.raises(ValueError, match="weight"):
        pyalign.linear_token_logprobs(r(3, 4), torch.randn(5, 4, device="meta"),
                                      torch.zeros(3, dtype=torch.long, device=device))


def test_cpu_only_build_message():
    if pyalign.has_cuda():
        pytest.skip("this build has CUDA kernels")
    # A fake CUDA descriptor must be refused by the compiled core, not dereferenced.
    cuda_desc = lambda shape, code, name: (None, 0, code, shape, tuple([1] * len(shape)), 0, name)
    with pytest.raises(ValueError, match="CUDA"):
        kernels.logprob_forward(cuda_desc((2, 3), 0, "logits"), cuda_desc((2,), 5, "labels"),
                           cuda_desc((2,), 0, "logp"), cuda_desc((2,), 0, "lse"), None, None, None, None,
                           1.0, 1.0, 0.0, -100, 0)


def test_empty_batch(device):
    x = torch.zeros(0, 7, device=device)
    y = torch.zeros(0, dtype=torch.long, device=device)
    assert pyalign.token_logprobs(x, y).shape == (0,)


def test_version_and_flags():
    assert pyalign.__version__ == kernels.__version__ == importlib.metadata.version("pyalign")
    assert isinstance(pyalign.has_cuda(), bool)
    # cuda_available() is exactly "CUDA kernels built and a device present", as torch sees it.
    assert pyalign.cuda_available() == (pyalign.has_cuda() and torch.cuda.device_count() > 0)
    assert pyalign.cpu_isa() in ("baseline", "avx2", "avx512")


# ---- cross_entropy over logits; differentiable lse and mean_logit ----


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cross_entropy_matches_torch(device, reduction, weighted, dtype):
    x = _logits((3, 5, 29), dtype, device)
    y = _labels((3, 5), 29, device)
    w = (torch.rand(29, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.5).to(device) if weighted else None
    for eps, zs, tf in ((0.0, 0.0, {}), (0.2, 0.05, {"softcap": 5.0, "temperature": 0.8}), (1.0, 0.0, {"logit_scale": 0.5})):
        for inplace in (False, True):
            a = x.clone().requires_grad_()
            xin = a * 1 if inplace else a  # in-place backward consumes a non-leaf copy
            got = pyalign.cross_entropy(xin, y, reduction=reduction, label_smoothing=eps, z_loss_scale=zs,
                                        class_weights=w, inplace_backward=inplace, **tf)
            up = torch.linspace(0.5, 1.5, got.numel(), dtype=got.dtype, device=device).view(got.shape)
            (g,) = torch.autograd.grad(got, a, up)
            r = x.detach().double().requires_grad_()
            z = r * tf.get("logit_scale", 1.0)
            if "softcap" in tf:
                z = tf["softcap"] * torch.tanh(z / tf["softcap"])
            z = z / tf.get("temperature", 1.0)
            want = F.cross_entropy(z.reshape(-1, 29), y.reshape(-1), weight=w, reduction=reduction, label_smoothing=eps)
            valid = (y != -100).reshape(-1)
            zl = zs * torch.logsumexp(z.reshape(-1, 29), -1) ** 2 * valid
            zl = zl.sum() / valid.sum() if reduction == "mean" else (zl.sum() if reduction == "sum" else zl)
            want = (want + zl).view(got.shape)
            (wg,) = torch.autograd.grad(want, r, up.double())
            tol = 1e-10 if dtype == torch.float64 else 2e-5
            assert (got.double() - want).abs().max().item() <= tol * (1 + want.abs().max().item())
            assert (g.double() - wg).abs().max().item() <= tol * (1 + wg.abs().max().item())


def test_cross_entropy_gradcheck_fp64(device):
    x = _logits((2, 4, 7), torch.float64, device).requires_grad_()
    y = _labels((2, 4), 7, device)
    w = (torch.rand(7, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.5).to(device)
    assert torch.autograd.gradcheck(lambda t: pyalign.cross_entropy(t, y, label_smoothing=0.3, z_loss_scale=0.1,
                                                                    class_weights=w, softcap=2.0, shift=True), (x,))


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_lse_and_mean_logit_gradients(device, softcap):
    x = _logits((3, 6, 17), torch.float64, device).requires_grad_()
    y = _labels((3, 6), 17, device)
    out = pyalign.token_logprobs(x, y, outputs=("lse", "mean_logit"), softcap=softcap, temperature=1.3)
    r = x.detach().clone().requires_grad_()
    z = r if softcap is None else softcap * torch.tanh(r / softcap)
    z = z / 1.3
    valid = y != -100
    lse, mean = torch.logsumexp(z, -1) * valid, z.mean(-1) * valid
    assert (out.lse - lse).abs().max().item() < 1e-12 and (out.mean_logit - mean).abs().max().item() < 1e-12
    (g,) = torch.autograd.grad((out.lse ** 2).sum() + 0.3 * out.mean_logit.sum() - out.logprobs.sum(), x)
    (wg,) = torch.autograd.grad((lse ** 2).sum() + 0.3 * mean.sum() - (z.log_softmax(-1).gather(
        -1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid).sum(), r)
    assert (g - wg).abs().max().item() < 1e-10

    def lse_and_mean(t):
        o = pyalign.token_logprobs(t, y, outputs=("lse", "mean_logit"), softcap=softcap)
        return o.lse, o.mean_logit
    assert torch.autograd.gradcheck(lse_and_mean, (x,))


def test_opcheck_lse_mean_gradients(device):
    x = _logits((3, 4, 9), torch.float32, device).requires_grad_()
    y = _labels((3, 4), 9, device)
    w = (torch.rand(9, generator=torch.Generator().manual_seed(3)) + 0.5).to(device)
    torch.library.opcheck(token_logprobs_op.op, (x, y, -100, 1.0, 1.0, 0.0, False, 4, False, w))
    ones = lambda: torch.ones(12, device=device)
    lse = torch.zeros(12, device=device)
    torch.library.opcheck(token_logprobs_backward_op.op, (ones(), None, x.detach(), y, lse, None, -100, 1.0, 1.0,
                                                       0.0, False, ones(), ones(), w))


def test_mean_weights_bad_shape_is_a_clear_error(device):
    x = _logits((2, 9), torch.float32, device)
    y = _labels((2,), 9, device)
    with pytest.raises(Exception, match="mean_weights"):
        token_logprobs_op(x, y, -100, 1.0, 1.0, 0.0, False, 4, False, torch.ones(8, device=device))
    with pytest.raises(Exception, match="mean_weights"):
        token_logprobs_op(x, y, -100, 1.0, 1.0, 0.0, False, 4, False, torch.ones(9, dtype=torch.float64, device=device))


@pytest.mark.parametrize("V", [3, 700, 1500])
def test_nan_logit_is_never_dropped(device, V):
    # A NaN whose neighbours (the CPU's chunk, a CUDA thread's slice) are all -inf or NaN must
    # still reach the row's statistics: the result is NaN, never a finite number.
    x = _logits((3, V), torch.float32, device, scale=1.0)
    x[0, 1] = float("nan")
    x[1, : min(V, 600)] = -float("inf")
    x[1, 1] = float("nan")
    x[2, :] = float("nan")
    y = torch.zeros(3, dtype=torch.long, device=device) + V - 1
    lp, ent = pyalign.token_logprobs(x, y, return_entropy=True)
    assert lp.isnan().all() and ent.isnan().all(), (lp, ent)
