"""Distillation suite: pyalign.distill.distillation_loss (one fused kernel: divergence and the student's
gradient) against the eager formula TRL's ``GKDTrainer.generalized_jsd_loss`` writes (log_softmax of
both, the mixture, ``F.kl_div``) and ``torch.compile`` of it, forward + backward (the gradient w.r.t.
the student's logits), for the forward KL (beta 0), the JSD (beta 0.5) and the reverse KL (beta 1),
with labels masking about 10% of the positions.

``linear_distillation_loss`` (the JSD from both models' hidden states and LM heads) against eager: both
full logits, then the same eager formula; forward + backward with the gradients of the student's hidden
states and LM head."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pyalign import distill
from pyalign.bench.common import compare, compiled, installed


def _eager(student, teacher, labels, beta):
    ls, lt = F.log_softmax(student, -1), F.log_softmax(teacher, -1)
    if beta == 0:
        jsd = F.kl_div(ls, lt, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(lt, ls, reduction="none", log_target=True)
    else:
        lm = torch.logsumexp(torch.stack([ls + math.log1p(-beta), lt + math.log(beta)]), 0)
        jsd = beta * F.kl_div(lm, lt, reduction="none", log_target=True) + (1 - beta) * F.kl_div(
            lm, ls, reduction="none", log_target=True)
    mask = labels != -100
    return jsd[mask].sum() / mask.sum().clamp_min(1)


def _ours(student, teacher, labels, beta):
    return distill.distillation_loss(student, teacher, labels, beta=beta)


def _fwd_bwd(impl, s, t, y, beta):
    def run():
        x = s.detach().requires_grad_()
        impl(x, t, y, beta).backward()
        return x.grad
    return run


def _linear_ours(hs, ws, ht, wt, y):
    return distill.linear_distillation_loss(hs, ws, ht, wt, y, beta=0.5)


def _linear_eager(hs, ws, ht, wt, y):
    return _eager(hs @ ws.t(), ht @ wt.t(), y.reshape(-1), 0.5)


def _linear_liger(device: str):
    """Liger-Kernel's fused linear JSD (Triton: CUDA only) at beta 0.5, where it symmetrizes as ours
    does, or None."""
    if device != "cuda" or not installed("liger_kernel"):
        return None
    from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD
    loss = LigerFusedLinearJSD(jsd_beta=0.5, temperature=1.0)
    return lambda hs, ws, ht, wt, y: loss(hs, ws, ht, wt, y.reshape(-1))


def _linear_rows(device: str, quick: bool) -> list[dict]:
    rows = []
    n, H, V = (256, 256, 8000) if quick else (2048, 1024, 32000)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(1)
    hs = (torch.randn(n, H, generator=g) / H ** 0.5).to(device, dtype)
    ws = (torch.randn(V, H, generator=g) * 0.05).to(device, dtype)
    ht = (torch.randn(n, H, generator=g) / H ** 0.5).to(device, dtype)
    wt = (torch.randn(V, H, generator=g) * 0.05).to(device, dtype)
    y = torch.randint(0, V, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.1] = -100
    y = y.to(device)
    size = f"{n} tokens, H {H} (both), V {V} {str(dtype).replace('torch.', '')}"

    def fwd_bwd(impl):
        def run():
            a, b = hs.detach().requires_grad_(), ws.detach().requires_grad_()
            impl(a, b, ht, wt, y).backward()
            return a.grad, b.grad
        return run
    liger = _linear_liger(device)
    impls = [(name, fwd_bwd(impl)) for name, impl in (("pyalign", _linear_ours), ("eager", _linear_eager), ("liger", liger))
             if impl is not None]
    return rows + compare("distill", "linear_distillation_loss jsd fwd+bwd", size, impls, device, reps=3)


def sizes(device: str, quick: bool):
    if device == "cuda":
        return [(8192, 151936, torch.bfloat16)] if not quick else [(4096, 32000, torch.bfloat16)]
    return [(256, 32000, torch.float32)] if quick else [(2048, 32000, torch.float32)]


def run(device: str, quick: bool) -> list[dict]:
    rows = []
    for n, v, dtype in sizes(device, quick):
        g = torch.Generator().manual_seed(0)
        s = (torch.randn(n, v, generator=g) * 2).to(device, dtype)
        t = (torch.randn(n, v, generator=g) * 2).to(device, dtype)
        y = torch.randint(0, v, (n,), generator=g)
        y[torch.rand(n, generator=g) < 0.1] = -100
        y = y.to(device)
        size = f"{n} x {v} {str(dtype).replace('torch.', '')}"
        moved = 2 * n * v * s.element_size() + n * v * 4  # both logits read, the fp32 gradient written
        for beta in (0.0, 0.5, 1.0):
            op = f"distillation_loss beta {beta:g} fwd+bwd"
            impls = [("pyalign", _ours), ("eager", _eager), ("compile", compiled(_eager, dynamic=False))]
            rows += compare("distill", op, size, [(name, _fwd_bwd(impl, s, t, y, beta)) for name, impl in impls], device,
                            bytes_moved=moved, reps=3)
    return rows + _linear_rows(device, quick) + _inplace_rows(device, quick) + _linear_topk_rows(device, quick)


def _inplace_rows(device, quick):
    """The losses with and without ``inplace_backward`` (the gradient written over the student's
    logits): each timed call clones the logits first, since the in-place call consumes them."""
    rows = []
    n, v = (256, 32000) if quick else ((8192, 151936) if device == "cuda" else (2048, 32000))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(2)
    s = (torch.randn(n, v, generator=g) * 2).to(device, dtype)
    t = (torch.randn(n, v, generator=g) * 2).to(device, dtype)
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.1] = -100
    y = y.to(device)
    top = torch.log_softmax(torch.randn(n, v, generator=g) * 2, -1).topk(64, -1)
    lp, ids = top.values.to(device), top.indices.to(device)
    size = f"{n} x {v} {str(dtype).replace('torch.', '')}"

    def fb(loss):
        def run():
            x = s.clone().requires_grad_()
            return torch.autograd.grad(loss(x), x)
        return run

    names = {False: "pyalign", True: "pyalign_inplace"}
    for beta in (0.0, 0.5):
        rows += compare("distill", f"distillation_loss beta {beta:g} fwd+bwd (+clone)", size,
                        [(names[inplace], fb(lambda x, beta=beta, inplace=inplace: distill.distillation_loss(
                            x, t, y, beta=beta, inplace_backward=inplace))) for inplace in (False, True)], device, reps=3)
    rows += compare("distill", "topk_distillation_loss K 64 fwd+bwd (+clone)", size,
                    [(names[inplace], fb(lambda x, inplace=inplace: distill.topk_distillation_loss(
                        x, lp, ids, y, inplace_backward=inplace))) for inplace in (False, True)], device, reps=3)
    return rows


def _linear_topk_rows(device, quick):
    """linear_topk_distillation_loss against the top-k loss on materialized logits."""
    n, H, V, K = (256, 256, 8000, 64) if quick else (2048, 1024, 32000, 64)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(3)
    hs = (torch.randn(n, H, generator=g) / H ** 0.5).to(device, dtype)
    ws = (torch.randn(V, H, generator=g) * 0.05).to(device, dtype)
    top = torch.log_softmax(torch.randn(n, V, generator=g) * 2, -1).topk(K, -1)
    lp, ids = top.values.to(device), top.indices.to(device)
    y = torch.randint(0, V, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.1] = -100
    y = y.to(device)
    size = f"{n} tokens, H {H}, V {V}, K {K} {str(dtype).replace('torch.', '')}"
    impls = {"pyalign": lambda a, b: distill.linear_topk_distillation_loss(a, b, lp, ids, y),
             "eager": lambda a, b: distill.topk_distillation_loss(a @ b.t(), lp, ids, y)}

    def fb(impl):
        def run():
            a, b = hs.detach().requires_grad_(), ws.detach().requires_grad_()
            impl(a, b).backward()
            return a.grad, b.grad
        return run

    return compare("distill", "linear_topk_distillation_loss forward_kl fwd+bwd", size,
                   [(name, fb(impl)) for name, impl in impls.items()], device, reps=3)
