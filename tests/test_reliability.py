"""Guarantees that hold across families: no leaks, thread safety, 64-bit indexing, no libtorch link."""
from __future__ import annotations

import gc
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import pyalign
from pyalign.reference.logprob import token_stats


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024


def test_no_memory_growth_forward_backward():
    x = torch.randn(64, 1000)
    y = torch.randint(0, 1000, (64,))

    pc, pr = torch.randn(32, requires_grad=True), torch.randn(32, requires_grad=True)
    rc, rr = torch.randn(32), torch.randn(32)
    ens = torch.randn(3, 16, 200, requires_grad=True)
    ens_labels = torch.randint(0, 200, (16,))
    w, act = torch.randn(64, 32), torch.randn(8, 32)

    def step():
        xr = x.clone().requires_grad_()
        lp, ent = pyalign.token_logprobs(xr, y, return_entropy=True, outputs=None)
        (lp.sum() + ent.sum()).backward()
        pyalign.token_logprobs(x, y, outputs=("entropy", "log_sum_sq_probs", "mean_logit", "is_top1"))
        loss, _ = pyalign.losses.dpo_loss(pc, pr, rc, rr, loss_type=["sigmoid", "ipo"], chosen_lengths=torch.full((32,), 4),
                                          rejected_lengths=torch.full((32,), 5))
        loss.backward()
        pyalign.uncertainty.token_uncertainty(ens, ens_labels).logprobs.sum().backward()
        pyalign.plasticity.oja(w, act, lr=1e-3)

    for _ in range(50):
        step()
    gc.collect()
    before = _rss_mb()
    for _ in range(1500):
        step()
    gc.collect()
    growth = _rss_mb() - before
    # Each step allocates ~1 MB; a leak of even one such buffer per step would show as > 700 MB.
    assert growth < 40, f"RSS grew by {growth:.1f} MB over 1500 calls"


def test_same_results_from_concurrent_python_threads():
    xs = [torch.randn(128, 4001) for _ in range(4)]
    ys = [torch.randint(0, 4001, (128,)) for _ in range(4)]
    expected = [pyalign.token_logprobs(x, y, return_entropy=True) for x, y in zip(xs, ys)]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(5):
            got = list(pool.map(lambda a: pyalign.token_logprobs(a[0], a[1], return_entropy=True), zip(xs, ys)))
            for (lp, ent), (elp, eent) in zip(got, expected):
                assert torch.equal(lp, elp) and torch.equal(ent, eent)


@pytest.mark.slow
def test_logprobs_beyond_2_31_elements():
    # 65,600 x 32,768 bf16 = 2.15e9 elements (4.3 GB): offsets past 2^31 must not wrap.
    rows, V = 65_600, 32_768
    x = torch.empty(rows, V, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    for i in range(0, rows, 4096):  # fill in blocks to keep the float32 temporary small
        x[i:i + 4096] = torch.randn(min(4096, rows - i), V, generator=g).to(torch.bfloat16)
    y = torch.randint(0, V, (rows,), generator=g)
    y[-1] = V - 1
    x.requires_grad_(True)
    lp, ent = pyalign.token_logprobs(x, y, return_entropy=True)
    check = torch.tensor([0, 1, 2**31 // V - 1, 2**31 // V, 2**31 // V + 1, rows - 2, rows - 1])
    xc = x.detach()[check].double().requires_grad_()
    ref = token_stats(xc, y[check])
    torch.testing.assert_close(lp.detach()[check].double(), ref["logprobs"].detach(), atol=2e-5, rtol=0)
    torch.testing.assert_close(ent.detach()[check].double(), ref["entropy"].detach(), atol=2e-5, rtol=0)
    # Backward: gradient rows past 2^31 elements land where they belong.
    (lp.sum() + ent.sum()).backward()
    (ref["logprobs"].sum() + ref["entropy"].sum()).backward()
    torch.testing.assert_close(x.grad[check].double(), xc.grad, atol=2e-2, rtol=2e-2)


def _compiled_module() -> Path:
    return Path(pyalign._ext._C.__file__)


@pytest.mark.skipif(shutil.which("nm") is None, reason="binutils' nm is not installed")
def test_compiled_core_needs_no_libtorch_symbols():
    out = subprocess.run(["nm", "-D", "--undefined-only", "-C", str(_compiled_module())],
                         capture_output=True, text=True, check=True).stdout
    bad = [l for l in out.splitlines() if any(k in l for k in ("torch::", "c10::", "at::", "caffe2", "THP"))]
    assert not bad, "pyalign._C needs libtorch symbols:\n" + "\n".join(bad[:20])
    assert "PyInit__C" in subprocess.run(["nm", "-D", "--defined-only", str(_compiled_module())],
                                         capture_output=True, text=True, check=True).stdout


def test_compiled_core_does_not_load_libcudart_dynamically():
    ldd = shutil.which("ldd")
    if ldd is None:
        pytest.skip("ldd is not available")
    out = subprocess.run([ldd, str(_compiled_module())], capture_output=True, text=True).stdout
    assert "libcudart" not in out and "libtorch" not in out and "libc10" not in out, out
