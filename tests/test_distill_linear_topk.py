"""pyalign.distill.linear_topk_distillation_loss: against topk_distillation_loss of the materialized logits
and against the float64 reference (autograd through the full logits) for both divergences and both tail
treatments, every reduction and num_items_in_batch, with and without labels and a bias, one chunk and
several (a ragged last one), another ignore_index, K = 1 and K = V; fp32/bf16 (dW through the fp32
accumulator); the gradients of the hidden states, weight and bias each alone; all-ignored batches;
no-grad calls; an FSDP2-sharded head; opcheck; torch.compile; memory from torch's allocator accounting;
bad input."""
from __future__ import annotations

import math

import pytest
import torch

from pyalign import distill
from pyalign.bench.memory import measure
from pyalign.ops.linear import NEED_BIAS, NEED_HIDDEN, NEED_WEIGHT
from pyalign.ops.linear_distill import linear_topk_distillation_op
from pyalign.reference import distill as R

COMBOS = [(d, t) for d in ("forward_kl", "reverse_kl") for t in ("bucket", "renormalize")]
NAMES = ("student_hidden", "student_weight", "student_bias")


def head(B=2, T=7, H=16, V=50, K=6, dtype=torch.float64, device="cpu", seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(device, dtype)
    h, w = mk(B, T, H), mk(V, H, scale=0.5)
    b = mk(V) if bias else None
    top = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2, -1).topk(K, -1)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, :2] = -100
    y[1, 5] = -100
    return [h, w, b], top.values.to(device), top.indices.to(device), y.to(device)


def fused(ins, lp, ids, labels, **kw):
    h, w, b = ins
    return distill.linear_topk_distillation_loss(h, w, lp, ids, labels, student_bias=b, **kw)


def materialized(fn):
    def run(ins, lp, ids, labels, **kw):
        h, w, b = ins
        kw.pop("chunk_size", None)
        return fn(h @ w.T + (0 if b is None else b), lp, ids, labels, **kw)
    return run


logits_op = materialized(distill.topk_distillation_loss)
reference = materialized(R.topk_distillation_loss)


def grads(fn, ins, lp, ids, labels, dtype=None, needs=(True, True, True), upstream=1.0, **kw):
    leaves = [None if t is None else (t if dtype is None else t.to(dtype)).clone().requires_grad_(n)
              for t, n in zip(ins, needs)]
    loss = fn(leaves, lp, ids, labels, **kw)
    (loss * upstream).backward()
    return loss.detach(), [None if t is None else t.grad for t in leaves]


def assert_grads(got, want, rtol, atol):
    torch.testing.assert_close(got[0].cpu(), want[0].cpu(), rtol=rtol, atol=atol)
    for name, g, w in zip(NAMES, got[1], want[1]):
        assert (g is None) == (w is None), name
        if g is not None:
            torch.testing.assert_close(g.cpu(), w.cpu(), rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("divergence,tail", COMBOS)
@pytest.mark.parametrize("reduction,num_items", [("batchmean", None), ("sum", None), ("mean", None),
                                                 ("batchmean", 9)])
def test_matches_logits_function_and_reference(device, divergence, tail, reduction, num_items):
    """fp64: the fused loss and the gradients of all three head inputs equal topk_distillation_loss of
    the full logits and the float64 reference to 1e-10 (the GEMMs' summation order differs), for one
    chunk and several; 11 kept rows in chunks of 5 leave a ragged last chunk of 1 (14 rows without
    labels: 4)."""
    ins, lp, ids, y = head(device=device)
    for labels in (y, None):
        for chunk in (1, 5, 64):
            kw = dict(divergence=divergence, tail=tail, temperature=0.8, reduction=reduction,
                      num_items_in_batch=num_items, chunk_size=chunk)
            got = grads(fused, ins, lp, ids, labels, upstream=1.7, **kw)
            assert_grads(got, grads(logits_op, ins, lp, ids, labels, upstream=1.7, **kw), 1e-10, 1e-12)
            cpu = [t.cpu() for t in ins]
            want = grads(reference, cpu, lp.cpu(), ids.cpu(), None if labels is None else labels.cpu(), upstream=1.7,
                         **kw)
            assert_grads(got, want, 1e-9, 1e-12)


def test_without_bias_k_extremes_and_ignore_index():
    for K in (1, 50):  # K = V: no tail outcome
        ins, lp, ids, y = head(K=K, bias=False)
        for divergence, tail in COMBOS:
            kw = dict(divergence=divergence, tail=tail, chunk_size=4)
            assert_grads(grads(fused, ins, lp, ids, y, **kw), grads(logits_op, ins, lp, ids, y, **kw), 1e-10, 1e-12)
    ins, lp, ids, y = head()
    y2 = torch.where(y == -100, 7, y + 11)  # 7 marks the ignored positions; -100 is an ordinary label here
    y2[1, 2] = -100
    kw = dict(ignore_index=7, chunk_size=3, divergence="reverse_kl")
    assert_grads(grads(fused, ins, lp, ids, y2, **kw), grads(reference, ins, lp, ids, y2, **kw), 1e-9, 1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_low_precision(device, dtype, tol):
    """fp32: to fp32 rounding; bf16 (the logits GEMM and the gradient in bf16, the kernels in fp32, dW
    accumulated in fp32 over several chunks and rounded once): to bf16 rounding of the logits; against
    the float64 reference of the same rounded inputs."""
    ins, lp, ids, y = head(device=device, V=300, H=32, K=20)
    for divergence, tail in COMBOS:
        for chunk in (5, 64):
            kw = dict(divergence=divergence, tail=tail, chunk_size=chunk)
            got = grads(fused, ins, lp.float(), ids, y, dtype=dtype, **kw)
            rounded = [t.to(dtype).double().cpu() for t in ins]
            want = grads(reference, rounded, lp.cpu(), ids.cpu(), y.cpu(), **kw)
            torch.testing.assert_close(got[0].double().cpu(), want[0], rtol=tol, atol=tol * 1e-2)
            for name, g, w in zip(NAMES, got[1], want[1]):
                assert g.dtype == dtype, name
                assert (g.double().cpu() - w).abs().max().item() <= tol * w.abs().max().item(), name


def test_each_gradient_alone_all_ignored_and_no_grad():
    ins, lp, ids, y = head()
    want = grads(logits_op, ins, lp, ids, y, chunk_size=3)
    for k in range(3):
        needs = tuple(i == k for i in range(3))
        got = grads(fused, ins, lp, ids, y, needs=needs, chunk_size=3)
        assert [g is not None for g in got[1]] == list(needs)
        torch.testing.assert_close(got[1][k], want[1][k], rtol=1e-10, atol=1e-12)
    y_all = torch.full_like(y, -100)
    loss, gs = grads(fused, ins, lp, ids, y_all, chunk_size=3)
    assert loss.item() == 0 and all(not g.any() for g in gs)
    with torch.no_grad():
        torch.testing.assert_close(fused(ins, lp, ids, y), logits_op(ins, lp, ids, y), rtol=1e-10, atol=1e-12)


def test_opcheck_and_compile():
    ins, lp, ids, y = head(dtype=torch.float32)
    h, w, b = ins
    row_w = torch.rand(y.numel())
    flat = y.reshape(-1).clone()
    args = (h.reshape(-1, h.shape[-1]).clone().requires_grad_(), w.clone().requires_grad_(), b,
            lp.reshape(-1, 6).float(), ids.reshape(-1, 6), flat, row_w, "reverse_kl", "bucket", 0.9, 4,
            NEED_HIDDEN | NEED_WEIGHT)
    torch.library.opcheck(linear_topk_distillation_op.op, args)
    torch.library.opcheck(linear_topk_distillation_op.op, args[:2] + (b.clone().requires_grad_(),) + args[3:11]
                          + (NEED_HIDDEN | NEED_WEIGHT | NEED_BIAS,))
    call = lambda a, c: distill.linear_topk_distillation_loss(a, c, lp, ids, y, student_bias=b, tail="renormalize",
                                                              chunk_size=4)
    outs = []
    for f in (call, torch.compile(call, fullgraph=True)):
        a, c = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = f(a, c)
        loss.backward()
        outs.append((loss.detach(), a.grad, c.grad))
    for e, c in zip(*outs):
        assert torch.equal(e, c)


def test_fsdp2_sharded_head(tmp_path):
    """An FSDP2 LM head (fully_shard on a one-process CPU mesh: weight and bias are DTensors) is gathered
    for the call; its gradients come back as DTensors equal to those of the plain head."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group of the test session's own")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        lin = torch.nn.Linear(6, 11).double()
        w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
        fully_shard(lin, mesh=init_device_mesh("cpu", (1,)))
        assert isinstance(lin.weight, DTensor)
        ins, lp, ids, y = head(H=6, V=11, K=3)
        loss = distill.linear_topk_distillation_loss(ins[0], lin.weight, lp, ids, y, student_bias=lin.bias,
                                                     chunk_size=4)
        gw, gb = torch.autograd.grad(loss, (lin.weight, lin.bias))
        assert isinstance(gw, DTensor) and isinstance(gb, DTensor)
        want = grads(logits_op, [ins[0], w0, b0], lp, ids, y, needs=(False, True, True))
        torch.testing.assert_close(loss.detach(), want[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gw.full_tensor(), want[1][1], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gb.full_tensor(), want[1][2], rtol=1e-10, atol=1e-12)
    finally:
        dist.destroy_process_group()


def test_memory():
    """torch's allocator accounting (deterministic): the call keeps the returned gradients (dW, dh) and,
    transiently, the saved copies being scaled, one chunk's logits block (which becomes its gradient),
    [c, K] work and O(n H); no [n, V] tensor (which would exceed the bound)."""
    n_tok, H, V, K, chunk = 256, 64, 8000, 16, 32
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, n_tok, H, generator=g).requires_grad_()
    w = (torch.randn(V, H, generator=g) / H ** 0.5).requires_grad_()
    top = torch.log_softmax(torch.randn(1, n_tok, V, generator=g), -1).topk(K, -1)
    lp, ids = top.values.clone(), top.indices.clone()
    y = torch.randint(0, V, (1, n_tok), generator=g)

    def run():
        return torch.autograd.grad(distill.linear_topk_distillation_loss(h, w, lp, ids, y, chunk_size=chunk), (h, w))
    _, use = measure(run)
    dw, dh = V * H * 4, n_tok * H * 4
    assert use.retained == dw + dh, use
    bound = 2 * (dw + dh) + chunk * V * 4 + 64 * n_tok * K * 4 + 4 * n_tok * H * 4 + 2 ** 16
    assert use.peak <= bound, (use, bound)
    assert use.transient < n_tok * V * 4 / 2, use  # less than half of one full logits tensor


def test_bad_input():
    ins, lp, ids, y = head()
    h, w, b = ins
    dup = ids.clone()
    dup[0, 3, 1] = dup[0, 3, 0]
    cases = [
        (ValueError, "student_weight", dict(student_weight=w[:, :-1])),
        (ValueError, "student_bias", dict(student_bias=b[:-1])),
        (ValueError, "student_hidden", dict(student_hidden=h[0, 0], teacher_topk_logprobs=lp[0, 0],
                                            teacher_topk_ids=ids[0, 0], labels=None)),
        (ValueError, "teacher_topk_logprobs", dict(teacher_topk_logprobs=lp[:, :-1], teacher_topk_ids=ids[:, :-1])),
        (ValueError, "teacher_topk_ids", dict(teacher_topk_ids=ids[..., :-1])),
        (ValueError, r"teacher_topk_ids: expected ids in \[0, 50\)", dict(teacher_topk_ids=ids + 50)),
        (ValueError, "distinct", dict(teacher_topk_ids=dup)),
        (ValueError, "at most 1", dict(teacher_topk_logprobs=lp.clamp(min=-0.5))),
        (ValueError, "<= 0", dict(teacher_topk_logprobs=lp.abs())),
        (ValueError, "teacher_topk_logprobs", dict(teacher_topk_logprobs=lp.masked_fill(lp < -3, math.nan))),
        (ValueError, "labels", dict(labels=y[:, :-1])),
        (ValueError, "reduction", dict(reduction="none")),
        (ValueError, "divergence", dict(divergence="jsd")),
        (ValueError, "tail", dict(tail="drop")),
        (ValueError, "temperature", dict(temperature=0.0)),
        (ValueError, "chunk_size", dict(chunk_size=0)),
        (ValueError, "num_items_in_batch", dict(num_items_in_batch=-1)),
        (TypeError, "student_hidden", dict(student_hidden=h.long())),
        (TypeError, "teacher_topk_ids", dict(teacher_topk_ids=ids.float())),
        (TypeError, "labels", dict(labels=y.float())),
    ]
    for exc, name, kw in cases:
        args = dict(student_hidden=h, student_weight=w, teacher_topk_logprobs=lp, teacher_topk_ids=ids, labels=y,
                    student_bias=b)
        args.update(kw)
        pos = [args.pop(k) for k in ("student_hidden", "student_weight", "teacher_topk_logprobs", "teacher_topk_ids",
                                     "labels")]
        with pytest.raises(exc, match=name):
            distill.linear_topk_distillation_loss(*pos, **args)
