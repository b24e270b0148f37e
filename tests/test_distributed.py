"""Vocab-parallel log-probs and distillation (pyalign.distributed) on 2 and 4 gloo processes (loopback
file store), compared with the single-process results, forward and backward."""
from __future__ import annotations

import os
import sys
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

import pyalign
from pyalign import distill
from pyalign.distributed import (vocab_parallel_distillation_loss, vocab_parallel_linear_token_logprobs,
                                 vocab_parallel_linear_distillation_loss, vocab_parallel_token_logprobs,
                                 vocab_parallel_topk_distillation_loss)
from pyalign.logprob import linear_token_logprobs, token_logprobs

STATS = ("logprobs", "entropy", "log_sum_sq_probs", "mean_logit", "is_top1", "lse")
ALL = ("entropy", "log_sum_sq_probs", "mean_logit", "is_top1", "lse")


def _loss(r, coeffs):
    """A loss through every differentiable output: log-probs, entropy, lse (a z-loss) and mean_logit."""
    c1, c2, c3, c4 = coeffs
    return (r.logprobs * c1).sum() + (r.entropy * c2).sum() + (r.lse ** 2 * c3).sum() + (r.mean_logit * c4).sum()


def _plain_loss(r, coeffs):
    """Plain sums: the upstream gradients arrive expanded (stride 0), so the backward makes dense
    copies of them (which must stay alive while the kernel reads them)."""
    return r.logprobs.sum() + r.lse.sum()


def _coeffs(shape, g):
    return [torch.randn(shape, generator=g) for _ in range(4)]
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2}


def _bounds(V, world, uneven):
    """Shard sizes: equal-ish, or deliberately uneven (still all >= 1)."""
    if uneven:
        sizes = [1 + (V - world) * (k + 1) // (world * (world + 1) // 2) for k in range(world)]
        sizes[-1] += V - sum(sizes)
    else:
        sizes = [V // world + (1 if k < V % world else 0) for k in range(world)]
    starts = [sum(sizes[:k]) for k in range(world)]
    return starts, sizes


def _close(a, b, tol, what):
    if a.dtype == torch.bool:
        assert torch.equal(a, b), what
    else:
        a, b = a.double(), b.double()
        assert torch.equal(torch.isfinite(a), torch.isfinite(b)), f"{what}: non-finite entries differ"
        same = (a == b) | ~torch.isfinite(b)
        err = torch.where(same, 0.0, (a - b).abs()).max().item() if a.numel() else 0.0
        scale = 1 + torch.where(torch.isfinite(b), b.abs(), 0.0).max().item() if b.numel() else 1
        assert err <= tol * scale, f"{what}: max error {err} > {tol} * {scale}"


def _case_logits(rank, world, dtype, *, shift, uneven, opts, masked_shard=False, give_start=True, loss=_loss):
    g = torch.Generator().manual_seed(11)
    V = 37
    logits = (torch.randn(3, 5, V, generator=g, dtype=torch.float64) * 3).to(dtype)
    labels = torch.randint(0, V, (3, 5), generator=g)
    labels[0, 2] = labels[2, 4] = -100
    starts, sizes = _bounds(V, world, uneven)
    if masked_shard:  # one row entirely -inf on the last shard
        logits[1, 1, starts[-1]:] = -float("inf")
        labels[1, 1] = starts[0]
    s0, n = starts[rank], sizes[rank]
    tol = TOL[dtype]

    full = logits.clone().requires_grad_()
    ref = token_logprobs(full, labels, shift=shift, outputs=ALL, **opts)
    coeffs = _coeffs(ref.logprobs.shape, g)
    loss(ref, coeffs).backward()

    shard = logits[..., s0:s0 + n].clone().requires_grad_()
    got = vocab_parallel_token_logprobs(shard, labels, vocab_start=s0 if give_start else None, shift=shift,
                                        outputs=ALL, **opts)
    for name in STATS:
        _close(getattr(got, name), getattr(ref, name), tol, f"{name} (rank {rank}/{world}, {dtype})")
    loss(got, coeffs).backward()
    _close(shard.grad, full.grad[..., s0:s0 + n], tol, f"grad (rank {rank}/{world}, {dtype})")


def _case_linear(rank, world, dtype, *, bias, shift, opts, needs=(True, True, True), weight_dtype=None,
                 path=None, blocks=None):
    """``weight_dtype``: a head dtype other than ``dtype`` (mixed dtypes); ``path``/``blocks``: force
    the backward loop order and the vocab-blocked sizes (pyalign.overrides), here and in the
    single-process reference."""
    with pyalign.overrides(backward_order=path, vocab_blocks=blocks):
        _case_linear_run(rank, world, dtype, bias=bias, shift=shift, opts=opts, needs=needs, weight_dtype=weight_dtype)


def _case_linear_run(rank, world, dtype, *, bias, shift, opts, needs, weight_dtype):
    g = torch.Generator().manual_seed(5)
    V, H = 29, 8
    wdt = weight_dtype or dtype
    hidden = torch.randn(2, 6, H, generator=g, dtype=torch.float64).to(dtype)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64).to(wdt)
    b = torch.randn(V, generator=g, dtype=torch.float64).to(wdt) if bias else None
    labels = torch.randint(0, V, (2, 6), generator=g)
    labels[1, :3] = -100
    starts, sizes = _bounds(V, world, True)
    s0, n = starts[rank], sizes[rank]
    tol = TOL[dtype]

    def leaves(h, w, bb):
        return (h.clone().requires_grad_(needs[0]), w.clone().requires_grad_(needs[1]),
                None if bb is None else bb.clone().requires_grad_(needs[2]))

    h1, w1_, b1 = leaves(hidden, weight, b)
    ref = linear_token_logprobs(h1, w1_, labels, bias=b1, shift=shift, outputs=ALL, chunk_size=4, **opts)
    coeffs = _coeffs(ref.logprobs.shape, g)
    _loss(ref, coeffs).backward()

    h2, w2_, b2 = leaves(hidden, weight[s0:s0 + n], None if b is None else b[s0:s0 + n])
    got = vocab_parallel_linear_token_logprobs(h2, w2_, labels, bias_shard=b2, shift=shift, outputs=ALL,
                                               chunk_size=3, vocab_start=s0, **opts)
    for name in STATS:
        _close(getattr(got, name), getattr(ref, name), tol, f"linear {name} (rank {rank}/{world})")
    _loss(got, coeffs).backward()
    if needs[0]:
        assert h2.grad.dtype == dtype
        _close(h2.grad, h1.grad, tol, "linear dhidden")
    if needs[1]:
        assert w2_.grad.dtype == wdt
        _close(w2_.grad, w1_.grad[s0:s0 + n], tol, "linear dweight")
    if bias and needs[2]:
        _close(b2.grad, b1.grad[s0:s0 + n], tol, "linear dbias")


def _expect_error(fn, match):
    with pytest.raises(ValueError, match=match):
        fn()


def _bad_inputs(rank, world):
    V = 12
    g = torch.Generator().manual_seed(3)  # the same logits and labels on every rank
    logits = torch.randn(4, V, generator=g)
    labels = torch.randint(0, V, (4,), generator=g)
    starts, sizes = _bounds(V, world, False)
    s0, n = starts[rank], sizes[rank]
    shard = logits[:, s0:s0 + n]
    # Overlapping shards: every rank claims to start at 0 (rank 0 is right, the others are not).
    _expect_error(lambda: vocab_parallel_token_logprobs(shard, labels, vocab_start=0), "do not tile")
    # A gap: the last rank starts one past where it should.
    wrong = s0 + (1 if rank == world - 1 else 0)
    _expect_error(lambda: vocab_parallel_token_logprobs(shard, labels, vocab_start=wrong), "do not tile")
    # A label outside every shard.
    bad = labels.clone()
    bad[2] = V
    _expect_error(lambda: vocab_parallel_token_logprobs(shard, bad, vocab_start=s0), "outside")
    # Unvalidated (the CUDA default, no host sync), such a label reads NaN, never a finite number.
    lp = vocab_parallel_token_logprobs(shard, bad, vocab_start=s0, validate=False)
    assert lp[2].isnan() and torch.isfinite(lp[[0, 1, 3]]).all(), lp
    # Local argument errors (raised before any collective).
    with pytest.raises(ValueError, match="labels"):
        vocab_parallel_token_logprobs(shard, labels[:3], vocab_start=s0)
    with pytest.raises(ValueError, match="weight_shard"):
        vocab_parallel_linear_token_logprobs(torch.randn(4, 8), torch.randn(n, 7), labels, vocab_start=s0)
    with pytest.raises(ValueError, match="vocab_start"):
        vocab_parallel_token_logprobs(shard, labels, vocab_start=-1)
    # the top-k teacher: shards that do not tile, an id outside [0, V), a repeated id
    lp, ids = torch.log_softmax(logits, -1).topk(3, dim=-1)
    _expect_error(lambda: vocab_parallel_topk_distillation_loss(shard, lp, ids, vocab_start=0), "do not tile")
    out_of_range = ids.clone()
    out_of_range[1, 0] = V
    _expect_error(lambda: vocab_parallel_topk_distillation_loss(shard, lp, out_of_range, vocab_start=s0), "ids in")
    repeated = ids.clone()
    repeated[0, 1] = repeated[0, 0]
    _expect_error(lambda: vocab_parallel_topk_distillation_loss(shard, lp, repeated, vocab_start=s0), "distinct")
    with pytest.raises(ValueError, match="teacher_topk_ids: expected the shape"):
        vocab_parallel_topk_distillation_loss(shard, lp, ids[:, :2], vocab_start=s0)


def _case_fsdp_head(rank, world):
    """An FSDP2-sharded LM head (fully_shard on a CPU mesh; its weight and bias are DTensors, Shard(0))
    through linear_token_logprobs and fused_linear_policy_loss: each rank's loss on its own batch, and
    the sharded gradients equal the single-process gradient of the ranks' mean loss, sliced."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from pyalign import rl

    V, H, B, T = 11, 6, 2, 5
    torch.manual_seed(0)
    head = torch.nn.Linear(H, V).double()
    w0, b0 = head.weight.detach().clone(), head.bias.detach().clone()
    fully_shard(head, mesh=init_device_mesh("cpu", (world,)))
    assert isinstance(head.weight, DTensor)

    def batch(r):
        g = torch.Generator().manual_seed(10 + r)
        return (torch.randn(B, T, H, generator=g, dtype=torch.float64), torch.randint(0, V, (B, T), generator=g),
                -torch.rand(B, T, generator=g, dtype=torch.float64) * 3, torch.randn(B, generator=g, dtype=torch.float64))

    losses = {
        "logprobs": lambda h, w, b, y, old, adv: (linear_token_logprobs(h, w, y, bias=b) ** 2).sum(),
        "policy": lambda h, w, b, y, old, adv: rl.fused_linear_policy_loss(h, w, y, old, adv, bias=b, loss_type="grpo",
                                                                          entropy_coef=0.1)[0],
    }
    for name, loss_fn in losses.items():
        h, y, old, adv = batch(rank)
        hh = h.clone().requires_grad_()
        loss = loss_fn(hh, head.weight, head.bias, y, old, adv)
        gh, gw, gb = torch.autograd.grad(loss, (hh, head.weight, head.bias))
        assert isinstance(gw, DTensor) and isinstance(gb, DTensor)
        # single process: the mean over ranks of each rank's loss, with the unsharded head
        w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
        mean = sum(loss_fn(*batch(r)[:1], w, b, *batch(r)[1:]) for r in range(world)) / world
        want_w, want_b = torch.autograd.grad(mean, (w, b))
        _close(gw.full_tensor(), want_w, 1e-10, f"{name}: weight gradient")
        _close(gb.full_tensor(), want_b, 1e-10, f"{name}: bias gradient")
        hw = h.clone().requires_grad_()  # hidden's gradient: this rank's own loss
        _close(gh, torch.autograd.grad(loss_fn(hw, w0, b0, y, old, adv), hw)[0], 1e-10, f"{name}: hidden gradient")


def _case_distill(rank, world, dtype, *, uneven, opts, teacher_grad):
    """vocab_parallel_distillation_loss on each rank's columns against distillation_loss on the whole
    logits: the loss, and the gradients sliced (the student's, and the teacher's when asked for)."""
    g = torch.Generator().manual_seed(13)
    V = 31
    s = (torch.randn(3, 4, V, generator=g, dtype=torch.float64) * 3).to(dtype)
    t = (torch.randn(3, 4, V, generator=g, dtype=torch.float64) * 3).to(dtype)
    labels = torch.randint(0, V, (3, 4), generator=g)
    labels[0, 1] = labels[2, :2] = -100
    starts, sizes = _bounds(V, world, uneven)
    s0, n = starts[rank], sizes[rank]
    tol = TOL[dtype]
    fs, ft = s.clone().requires_grad_(), t.clone().requires_grad_(teacher_grad)
    ref = distill.distillation_loss(fs, ft, labels, **opts)
    ref.backward()
    ss, ts = s[..., s0:s0 + n].clone().requires_grad_(), t[..., s0:s0 + n].clone().requires_grad_(teacher_grad)
    got = vocab_parallel_distillation_loss(ss, ts, labels, **opts)
    _close(got.detach(), ref.detach(), tol, f"distill loss (rank {rank}/{world}, {opts})")
    got.backward()
    _close(ss.grad, fs.grad[..., s0:s0 + n], tol, f"distill student grad (rank {rank}/{world}, {opts})")
    if teacher_grad:
        _close(ts.grad, ft.grad[..., s0:s0 + n], tol, f"distill teacher grad (rank {rank}/{world}, {opts})")
    rows = vocab_parallel_distillation_loss(ss.detach(), ts.detach(), labels, **{**opts, "reduction": "none"})
    _close(rows, distill.distillation_loss(s, t, labels, **{**opts, "reduction": "none"}), tol, "distill rows")


def _case_distill_topk(rank, world, dtype, *, uneven, opts, k=5, give_start=True):
    """vocab_parallel_topk_distillation_loss on each rank's columns against topk_distillation_loss on the
    whole logits: the loss, the per-position rows and the student gradient sliced. The teacher's ids
    fall in several ranks' shards (and K = V once: no tail)."""
    g = torch.Generator().manual_seed(17)
    V = 23
    s = (torch.randn(3, 4, V, generator=g, dtype=torch.float64) * 3).to(dtype)
    teacher = torch.log_softmax(torch.randn(3, 4, V, generator=g, dtype=torch.float64) * 2, -1)
    lp, ids = teacher.topk(k, dim=-1)
    lp = lp.to(dtype)
    labels = torch.randint(0, V, (3, 4), generator=g)
    labels[1, 2] = labels[2, 0] = -100
    starts, sizes = _bounds(V, world, uneven)
    s0, n = starts[rank], sizes[rank]
    tol = TOL[dtype]
    full = s.clone().requires_grad_()
    ref = distill.topk_distillation_loss(full, lp, ids, labels, **opts)
    ref.backward()
    shard = s[..., s0:s0 + n].clone().requires_grad_()
    got = vocab_parallel_topk_distillation_loss(shard, lp, ids, labels, vocab_start=s0 if give_start else None, **opts)
    _close(got.detach(), ref.detach(), tol, f"topk loss (rank {rank}/{world}, {opts})")
    got.backward()
    _close(shard.grad, full.grad[..., s0:s0 + n], tol, f"topk student grad (rank {rank}/{world}, {opts})")
    rows = vocab_parallel_topk_distillation_loss(shard.detach(), lp, ids, labels, **{**opts, "reduction": "none"})
    _close(rows, distill.topk_distillation_loss(s, lp, ids, labels, **{**opts, "reduction": "none"}), tol, "topk rows")


def _case_distill_linear(rank, world, dtype, *, uneven, opts, teacher_grad, chunk_size=None):
    """vocab_parallel_linear_distillation_loss with each rank's rows of both heads against
    linear_distillation_loss on the whole heads: the loss, the hidden states' gradients (whole on
    every rank) and each head's gradient sliced (the teacher's when asked for)."""
    g = torch.Generator().manual_seed(19)
    V, Hs, Ht = 29, 6, 9
    hs = torch.randn(3, 4, Hs, generator=g, dtype=torch.float64).to(dtype)
    ht = torch.randn(3, 4, Ht, generator=g, dtype=torch.float64).to(dtype)
    ws, bs = (torch.randn(V, Hs, generator=g, dtype=torch.float64) * 0.8).to(dtype), torch.randn(V, generator=g, dtype=torch.float64).to(dtype)
    wt, bt = (torch.randn(V, Ht, generator=g, dtype=torch.float64) * 0.8).to(dtype), torch.randn(V, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, V, (3, 4), generator=g)
    labels[0, 0] = labels[2, 3] = -100
    starts, sizes = _bounds(V, world, uneven)
    sl = slice(starts[rank], starts[rank] + sizes[rank])
    tol = TOL[dtype]
    full = [x.clone().requires_grad_(i < 3 or teacher_grad) for i, x in enumerate((hs, ws, bs, ht, wt, bt))]
    ref = distill.linear_distillation_loss(full[0], full[1], full[3], full[4], labels, student_bias=full[2],
                                           teacher_bias=full[5], **opts)
    ref.backward()
    mine = [x.clone().requires_grad_(i < 3 or teacher_grad) for i, x in
            enumerate((hs, ws[sl], bs[sl], ht, wt[sl], bt[sl]))]
    got = vocab_parallel_linear_distillation_loss(mine[0], mine[1], mine[3], mine[4], labels, student_bias_shard=mine[2],
                                                  teacher_bias_shard=mine[5], chunk_size=chunk_size, **opts)
    _close(got.detach(), ref.detach(), tol, f"linear distill loss (rank {rank}/{world}, {opts})")
    got.backward()
    for i, name in enumerate(("student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight",
                              "teacher_bias")):
        if i >= 3 and not teacher_grad:
            assert mine[i].grad is None
            continue
        want = full[i].grad if name.endswith("hidden") else full[i].grad[sl]
        _close(mine[i].grad, want, tol, f"linear distill {name} grad (rank {rank}/{world}, {opts})")


def _all_cases(rank, world):
    torch.set_num_threads(1)
    opts_list = [{}, {"temperature": 0.7, "softcap": 4.0}, {"logit_scale": 0.5}]
    for dtype in (torch.float64, torch.float32):
        for i, opts in enumerate(opts_list):
            _case_logits(rank, world, dtype, shift=i == 1, uneven=i != 0, opts=opts, give_start=i != 2)
    _case_logits(rank, world, torch.float64, shift=False, uneven=True, opts={}, masked_shard=True)
    _case_logits(rank, world, torch.bfloat16, shift=True, uneven=False, opts={})
    _case_logits(rank, world, torch.float32, shift=False, uneven=True, opts={}, loss=_plain_loss)
    _case_linear(rank, world, torch.float64, bias=True, shift=False, opts={})
    _case_linear(rank, world, torch.float64, bias=False, shift=True, opts={"temperature": 1.3, "softcap": 3.0})
    _case_linear(rank, world, torch.float32, bias=True, shift=True, opts={}, needs=(True, False, True))
    _case_linear(rank, world, torch.float64, bias=True, shift=False, opts={}, needs=(False, True, False))
    # the vocab-blocked backward on each shard (blocks of 3 vocabulary rows, token chunks of 4)
    _case_linear(rank, world, torch.float64, bias=True, shift=True, opts={"softcap": 3.0}, path="vocab", blocks=(4, 3))
    _case_linear(rank, world, torch.bfloat16, bias=True, shift=False, opts={})  # bf16 head: vocab-blocked
    # mixed dtypes: promoted like linear_token_logprobs, gradients in each input's dtype
    _case_linear(rank, world, torch.float32, bias=True, shift=False, opts={}, weight_dtype=torch.bfloat16)
    for beta, opts in ((0.0, {}), (0.5, {"temperature": 0.8, "reduction": "sum"}), (1.0, {"student_softcap": 5.0}),
                       (0.3, {"reduction": "mean", "teacher_softcap": 4.0})):
        for dtype in (torch.float64, torch.float32):
            _case_distill(rank, world, dtype, uneven=beta > 0.4, opts={"beta": beta, **opts}, teacher_grad=beta == 0.3)
    for k, opts in ((5, {}), (5, {"divergence": "reverse_kl", "temperature": 0.7, "reduction": "sum"}),
                    (3, {"tail": "renormalize", "reduction": "mean"}), (23, {"divergence": "reverse_kl"})):
        for dtype in (torch.float64, torch.float32):
            _case_distill_topk(rank, world, dtype, uneven=k != 5, opts=opts, k=k, give_start=dtype == torch.float64)
    for beta, opts, chunk in ((0.0, {}, None), (0.5, {"temperature": 0.8, "reduction": "sum"}, 5),
                              (1.0, {"student_softcap": 5.0, "reduction": "mean"}, 7)):
        for dtype in (torch.float64, torch.float32):
            _case_distill_linear(rank, world, dtype, uneven=beta > 0.4, opts={"beta": beta, **opts},
                                 teacher_grad=beta == 0.5, chunk_size=chunk)
    _bad_inputs(rank, world)
    _case_fsdp_head(rank, world)


def _worker(rank, world, store_path, errors):
    # Leave with os._exit, skipping interpreter finalization: gloo's worker threads may still be
    # releasing the last collective's tensors, which needs the GIL, and a thread that asks for it
    # during finalization aborts the process (pytorch/pytorch#190489). The verdict travels through
    # the exit code and the error queue.
    status = 0
    try:
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        try:
            _all_cases(rank, world)
        finally:
            dist.destroy_process_group()
    except BaseException:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_matches_single_process(world, tmp_path):
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    procs = mp.start_processes(_worker, args=(world, str(tmp_path / "store"), errors), nprocs=world,
                               join=False, start_method="spawn")
    deadline = time.monotonic() + 240
    try:
        while not procs.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"{world} gloo processes did not finish within 240 s")
    except ProcessException:
        msgs = []
        while not errors.empty():
            msgs.append(errors.get())
        pytest.fail("\n".join(msgs) or "a worker failed")
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.kill()


def test_needs_initialized_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="not initialized"):
        vocab_parallel_token_logprobs(torch.randn(2, 3), torch.tensor([0, 1]), vocab_start=0)
