"""The GEMMs of the fused linear head (pyalign.ops.linear.gemm): how many each path makes (3 per
chunk for the forward-gradient cross-entropy, 2 for a frozen head, none in their backwards; on CPU
fp32 through oneDNN, fp64 through BLAS, on CUDA through cuBLAS), the fp32 accumulation of a
low-precision dW, and the CPU fp32 oneDNN path against BLAS (CPU only: oneDNN is a CPU library)."""
from __future__ import annotations

import pytest
import torch

import pyalign
import pyalign.ops.linear.gemm as gemm
from linear_helpers import ALL, GemmCounter, make, max_err
from pyalign.logprob import linear_cross_entropy, linear_token_logprobs
from pyalign.ops.linear.gemm import accumulate_dw

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def _head_run(hidden, weight, b, labels, chunk, ce=False):
    """Outputs and (hidden, weight, bias) gradients of per-token stats (or the mean cross-entropy)."""
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    if ce:
        outs = [linear_cross_entropy(*leaves[:2], labels, bias=leaves[2], chunk_size=chunk, z_loss_scale=0.01)]
        loss = outs[0]
    else:
        r = linear_token_logprobs(*leaves[:2], labels, bias=leaves[2], outputs=ALL, chunk_size=chunk)
        outs = [r.logprobs, r.entropy, r.log_sum_sq_probs, r.mean_logit, r.is_top1]
        w = torch.linspace(-1, 1, r.logprobs.numel(), device=r.logprobs.device).view_as(r.logprobs)
        loss = (r.logprobs * w).sum() + r.entropy.sum()
    return outs + list(torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_grad_path_is_taken(monkeypatch, device, dtype, bias):
    """3 GEMMs per token chunk in the forward and none in the backward (the recompute path: 1 + 3);
    ignored tokens are dropped before the GEMMs (the chunk count is that of the kept tokens)."""
    hidden, weight, b, labels = make((24,), 8, 17, dtype, device, bias=bias, ignore=0.0, seed=5)
    labels[:6] = -100  # 18 kept tokens: 3 chunks of 6
    leaves = [None if t is None else t.clone().requires_grad_() for t in (hidden, weight, b)]
    counter = GemmCounter(monkeypatch)
    loss = linear_cross_entropy(*leaves[:2], labels, bias=leaves[2], chunk_size=6, z_loss_scale=0.1)
    assert counter.n == 9
    loss.backward()
    assert counter.n == 9
    with pyalign.overrides(forward_gradients=False):
        counter.n = 0
        fresh = [None if t is None else t.clone().requires_grad_() for t in (hidden, weight, b)]
        loss2 = linear_cross_entropy(*fresh[:2], labels, bias=fresh[2], chunk_size=6, z_loss_scale=0.1)
        assert counter.n == 3
        loss2.backward()
        assert counter.n == 12
    # no gradient wanted (grad mode off, or no input requires grad): the plain forward, 1 GEMM per
    # chunk, no graph and so nothing saved
    for grad_mode, args in ((False, leaves[:2]), (True, (hidden, weight))):
        counter.n = 0
        with torch.set_grad_enabled(grad_mode):
            out = linear_cross_entropy(*args, labels, chunk_size=6)
        assert counter.n == 3 and out.grad_fn is None
    # reduction="none" keeps the recompute path
    counter.n = 0
    out = linear_cross_entropy(*leaves[:2], labels, chunk_size=6, reduction="none")
    out.sum().backward()
    assert counter.n == 12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_frozen_head_gemm_count(monkeypatch, device, dtype, bias):
    """2 GEMMs per kept chunk in the forward and none in the backward (the recompute path: 1 + 2);
    a head that requires grad, grad mode off, or a requested entropy keep the ordinary op."""
    hidden, weight, b, labels = make((24,), 8, 17, dtype, device, bias=bias, ignore=0.0, seed=5)
    labels[:6] = -100  # 18 kept tokens: 3 chunks of 6
    counter = GemmCounter(monkeypatch)
    h = hidden.clone().requires_grad_()
    lp = linear_token_logprobs(h, weight, labels, bias=b, chunk_size=6)
    assert counter.n == 6
    lp.sum().backward()
    assert counter.n == 6
    cases = [((h, weight.clone().requires_grad_()), {}, True, 3),  # weight requires grad
             ((h, weight), {"return_entropy": True}, True, 3),  # entropy requested
             ((h, weight), {}, False, 3)]  # grad mode off
    for (hh, ww), kw, grad_mode, n in cases:
        counter.n = 0
        with torch.set_grad_enabled(grad_mode):
            linear_token_logprobs(hh, ww, labels, chunk_size=6, **kw)
        assert counter.n == n, kw


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_accumulate_dw_is_fp32_exact(device, dtype):
    """The low-precision chunk product is accumulated in fp32 without rounding to bf16/fp16 (on CPU
    through fp32 copies of the blocks, on CUDA through fp32-output GEMMs)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(37, 300, generator=g).to(dtype).to(device)
    h = torch.randn(37, 24, generator=g).to(dtype).to(device)
    acc = torch.zeros(300, 24, device=device)
    accumulate_dw(acc, a, h)
    exact = a.cpu().double().t() @ h.cpu().double()
    assert max_err(acc, exact) < 1e-5
    assert max_err(acc, (a.t() @ h).float()) > 1e-4  # what rounding to the low precision would have given


@needs_onednn
@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # from mkldnn.flags()
@pytest.mark.parametrize("ce", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_gemms_match_blas(monkeypatch, ce, bias):
    """The oneDNN path (CPU fp32 default) is taken and agrees with the BLAS path (torch.mm) to
    fp32 rounding, forward and backward; with oneDNN disabled through torch.backends.mkldnn no
    oneDNN call is made and the result is the BLAS path's, bitwise."""
    hidden, weight, b, labels = make((3, 41), 24, 700, torch.float32, "cpu", bias=bias, seed=3)
    if b is None:
        b = torch.zeros(700)
    with pyalign.overrides(gemm="blas"):
        blas = _head_run(hidden, weight, b, labels, 32, ce)
    counter = GemmCounter(monkeypatch)
    calls = []
    orig = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(1) or orig(*a))
    fast = _head_run(hidden, weight, b, labels, 32, ce)
    assert len(calls) > 0 and counter.n > 0
    for x, y in zip(fast, blas):
        if x.dtype == torch.bool:
            assert (x == y).float().mean() >= 0.99
        else:
            assert max_err(x, y) <= 2e-5 * (1 + y.abs().max().item())
    calls.clear()
    with torch.backends.mkldnn.flags(enabled=False):
        off = _head_run(hidden, weight, b, labels, 32, ce)
    assert not calls
    for x, y in zip(off, blas):
        assert torch.equal(x, y)


@needs_onednn
def test_onednn_failure_falls_back_to_blas(monkeypatch):
    """Where oneDNN's linear op refuses (an old or unusual torch build), the BLAS path gives the
    result and the op is not tried again."""
    hidden, weight, b, labels = make((50,), 16, 300, torch.float32, "cpu", seed=4)
    with pyalign.overrides(gemm="blas"):
        blas = _head_run(hidden, weight, b, labels, 16)
    calls = []

    def refuse(*a):
        calls.append(1)
        raise RuntimeError("no oneDNN kernel for this input")
    monkeypatch.setattr(gemm, "_ONEDNN_WORKS", None)
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", refuse)
    got = _head_run(hidden, weight, b, labels, 16)
    assert len(calls) == 1 and gemm._ONEDNN_WORKS is False
    for x, y in zip(got, blas):
        assert torch.equal(x, y)
