"""Guarantees that hold across families: no leaks, thread safety, 64-bit indexing, no libtorch link."""
from __future__ import annotations

import ctypes
import gc
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import pyalign
from pyalign.bench.memory import measure
from pyalign.reference.logprob import token_stats


def _heap_in_use() -> int:
    """Bytes the C heap has handed out and not taken back (glibc's mallinfo2: allocator accounting,
    not the resident set); the test skips where it is unavailable."""
    class MallInfo2(ctypes.Structure):
        _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        pytest.skip("glibc's mallinfo2 is not available")
    fn.restype = MallInfo2
    info = fn()
    return info.uordblks + info.hblkhd


@pytest.mark.heap
def test_no_memory_growth_forward_backward():
    """Thousands of forward+backward calls of every family keep no tensor (torch's allocator events:
    nothing retained) and no native heap memory (mallinfo2) beyond the first calls."""
    x = torch.randn(64, 1000)
    y = torch.randint(0, 1000, (64,))

    pc, pr = torch.randn(32, requires_grad=True), torch.randn(32, requires_grad=True)
    rc, rr = torch.randn(32), torch.randn(32)
    ens = torch.randn(3, 16, 200, requires_grad=True)
    ens_labels = torch.randint(0, 200, (16,))
    w, act = torch.randn(64, 32), torch.randn(8, 32)
    h, head, hy = torch.randn(40, 16), torch.randn(300, 16), torch.randint(0, 300, (40,))
    lens = torch.full((32,), 7)

    def step():
        xr = x.clone().requires_grad_()
        lp, ent = pyalign.token_logprobs(xr, y, return_entropy=True, outputs=None)
        (lp.sum() + ent.sum()).backward()
        pyalign.token_logprobs(x, y, outputs=("entropy", "log_sum_sq_probs", "mean_logit", "is_top1"))
        loss, _ = pyalign.losses.dpo_loss(pc, pr, rc, rr, loss_type=["sigmoid", "ipo"], chosen_lengths=torch.full((32,), 4),
                                          rejected_lengths=torch.full((32,), 5))
        loss.backward()
        pyalign.uncertainty.token_uncertainty(ens, ens_labels).logprobs.sum().backward()
        pyalign.uncertainty.aggregate_rewards(ens[:, :, 0].detach(), method="quantile")
        pyalign.plasticity.oja(w, act, lr=1e-3)
        hr, wr = h.clone().requires_grad_(), head.clone().requires_grad_()
        lp, ent = pyalign.linear_token_logprobs(hr, wr, hy, return_entropy=True, chunk_size=16)
        (lp.sum() + ent.sum()).backward()
        seq, _ = pyalign.sequence_logprobs(x.view(4, 16, 1000), y.view(4, 16))
        for other in (pyalign.losses.kto_loss(pc, rc, desirable=rc > 0)[0],
                      pyalign.losses.orpo_loss(-pc.abs() - 0.1, -pr.abs() - 0.1, chosen_lengths=lens, rejected_lengths=lens)[0],
                      pyalign.losses.simpo_loss(pc, pr, chosen_lengths=lens, rejected_lengths=lens)[0],
                      pyalign.losses.reward_model_loss(pc, pr)[0], seq.sum()):
            if other.requires_grad:
                other.backward()

    def steps(k):
        for _ in range(k):
            step()
    steps(50)
    assert measure(lambda: steps(20))[1].retained == 0  # every tensor a step makes is freed again
    gc.collect()
    before = _heap_in_use()
    steps(1500)
    gc.collect()
    growth = _heap_in_use() - before
    # Each step allocates ~1 MB; a leak of even 1 KiB per step would show as 1.5 MB.
    assert growth < 1 << 20, f"the C heap grew by {growth} bytes over 1500 calls"


# One workload per kernel family, forward and backward, sized so that the CPU kernels split their
# rows/blocks over several OpenMP threads. Each returns every output and gradient it produced.
def _logprob_work(seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(256, 3001, generator=g) * 4).requires_grad_()
    y = torch.randint(0, 3001, (256,), generator=g)
    out = pyalign.token_logprobs(x, y, outputs=("entropy", "log_sum_sq_probs", "mean_logit", "is_top1"))
    (out.logprobs.sum() + out.entropy.sum()).backward()
    return (*out, x.grad)


def _linear_work(seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(300, 32, generator=g).requires_grad_()
    w = (torch.randn(3001, 32, generator=g) / 4).requires_grad_()
    y = torch.randint(0, 3001, (300,), generator=g)
    lp, ent = pyalign.linear_token_logprobs(h, w, y, return_entropy=True, chunk_size=64)
    (lp.sum() + ent.sum()).backward()
    return lp, ent, h.grad, w.grad


def _losses_work(seed):
    g = torch.Generator().manual_seed(seed)
    n = 20_000
    pc, pr = (torch.randn(n, generator=g) * 5).requires_grad_(), (torch.randn(n, generator=g) * 5).requires_grad_()
    rc, rr = torch.randn(n, generator=g) * 5, torch.randn(n, generator=g) * 5
    loss, m = pyalign.losses.dpo_loss(pc, pr, rc, rr, loss_type=["sigmoid", "bco_pair", "aot"], loss_weights=[1, 0.5, 0.3])
    loss.backward()
    kto, _ = pyalign.losses.kto_loss(pc, rc, desirable=torch.arange(n) % 3 == 0)
    return loss, kto, pc.grad, pr.grad, *(m[k] for k in m)


def _uncertainty_work(seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(3, 128, 2001, generator=g) * 3).requires_grad_()
    labels = torch.randint(0, 2001, (128,), generator=g)
    tu = pyalign.uncertainty.token_uncertainty(logits, labels)
    tu.logprobs.sum().backward()
    agg = pyalign.uncertainty.aggregate_rewards(torch.randn(5, 50_000, generator=g), method="quantile", q=0.3)
    return (*tu, logits.grad, *agg)


def _plasticity_work(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(512, 256, generator=g) / 16
    x = torch.randn(16, 256, generator=g)
    pyalign.plasticity.oja(w, x, lr=1e-2, weight_decay=1e-3, w_min=-0.5, w_max=0.5, norm=1.0)
    trace = torch.zeros_like(w)
    pyalign.plasticity.three_factor(w, x, x @ w.T, trace, torch.randn(16, generator=g), lr=1e-2, decay=0.9)
    p = torch.nn.Parameter(torch.randn(300_000, generator=g))
    ewc = pyalign.plasticity.EWC([p], strength=3.0)
    p.grad = torch.randn(p.shape, generator=g)
    ewc.accumulate()
    ewc.consolidate()
    with torch.no_grad():
        p.add_(torch.randn(p.shape, generator=g))
    p.grad = None
    pen = ewc.penalty()
    return w, trace, pen, p.grad


WORKLOADS = {"logprob": _logprob_work, "linear": _linear_work, "losses": _losses_work,
             "uncertainty": _uncertainty_work, "plasticity": _plasticity_work}


def _assert_bitwise(a, b, what):
    assert len(a) == len(b), what
    for i, (u, v) in enumerate(zip(a, b)):
        if u is None or v is None:
            assert u is None and v is None, f"{what}[{i}]"
            continue
        u, v = torch.as_tensor(u).detach(), torch.as_tensor(v).detach()
        assert torch.equal(u, v) or (u.is_floating_point() and torch.equal(u.isnan(), v.isnan())
                                     and torch.equal(u[~u.isnan()], v[~v.isnan()])), f"{what}[{i}] differs"


@pytest.mark.parametrize("family", list(WORKLOADS))
def test_bitwise_same_across_runs_and_thread_counts(family):
    work = WORKLOADS[family]
    n = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3, 1):
            torch.set_num_threads(threads)
            results.append(work(7))
    finally:
        torch.set_num_threads(n)
    for k, r in enumerate(results[1:], 1):
        _assert_bitwise(r, results[0], f"{family}: run {k} vs run 0 (threads 1/2/3/1)")


@pytest.mark.parametrize("family", list(WORKLOADS))
def test_same_results_from_concurrent_python_threads(family):
    work = WORKLOADS[family]
    seeds = [1, 2, 3, 4]
    expected = [work(s) for s in seeds]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            for s, got, exp in zip(seeds, pool.map(work, seeds), expected):
                _assert_bitwise(got, exp, f"{family}: seed {s} from a thread pool")


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
    return Path(pyalign._ext.kernels.__file__)


@pytest.mark.skipif(shutil.which("nm") is None, reason="binutils' nm is not installed")
def test_compiled_core_needs_no_libtorch_symbols():
    out = subprocess.run(["nm", "-D", "--undefined-only", "-C", str(_compiled_module())],
                         capture_output=True, text=True, check=True).stdout
    bad = [l for l in out.splitlines() if any(k in l for k in ("torch::", "c10::", "at::", "caffe2", "THP"))]
    assert not bad, "the compiled core needs libtorch symbols:\n" + "\n".join(bad[:20])
    assert "PyInit__pyalign" in subprocess.run(["nm", "-D", "--defined-only", str(_compiled_module())],
                                         capture_output=True, text=True, check=True).stdout


def test_compiled_core_does_not_load_libcudart_dynamically():
    ldd = shutil.which("ldd")
    if ldd is None:
        pytest.skip("ldd is not available")
    out = subprocess.run([ldd, str(_compiled_module())], capture_output=True, text=True).stdout
    assert "libcudart" not in out and "libtorch" not in out and "libc10" not in out, out


@pytest.mark.parametrize("case", ["token_logprobs", "token_uncertainty", "linear_token_logprobs"])
def test_forward_holds_no_vocabulary_sized_temporary(case):
    # Each input below is 64-128 MiB; an implementation that materializes probabilities (or the
    # logits, for the linear head) would allocate at least that much on top of its outputs
    # (measured from torch's allocator events: pyalign.bench.memory).
    g = torch.Generator().manual_seed(0)
    if case == "token_logprobs":
        x, y = torch.randn(2048, 16_000, generator=g), torch.randint(0, 16_000, (2048,), generator=g)
        fn, big = (lambda: pyalign.token_logprobs(x, y, return_entropy=True)), x
    elif case == "token_uncertainty":
        x, y = torch.randn(4, 512, 16_000, generator=g), torch.randint(0, 16_000, (512,), generator=g)
        fn, big = (lambda: pyalign.uncertainty.token_uncertainty(x, y)), x
    else:
        h, w = torch.randn(2048, 64, generator=g), torch.randn(16_000, 64, generator=g)
        y = torch.randint(0, 16_000, (2048,), generator=g)
        fn, big = (lambda: pyalign.linear_token_logprobs(h, w, y, return_entropy=True, chunk_size=128)), \
            torch.empty(2048, 16_000)
    use = measure(fn)[1]
    size = big.numel() * 4
    bound = 64 * 1024  # per-token bookkeeping only
    if case == "linear_token_logprobs":  # one 128-row logits buffer at a time, plus O(tokens) indices
        bound = 128 * 16_000 * 4 + 2048 * 64
    assert use.transient < bound, f"{case}: {use.transient} bytes of temporaries for a {size}-byte [.., V] tensor"
    assert use.retained < size / 64, use  # the outputs are per token
