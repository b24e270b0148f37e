"""Online-RL suite: pyalign.rl.policy_loss (one fused kernel: loss, gradients, metrics) vs the same
per-token formula as TRL's GRPOTrainer writes it in eager PyTorch, and torch.compile of it. The case is
DAPO with a k3 KL penalty to a reference model (beta 0.04), the clip-ratio metrics included, forward +
backward (the gradient w.r.t. the log-probs). The kernel reads each input once and writes the gradient
once: ``bytes_moved`` counts that."""
from __future__ import annotations

import torch

from pyalign import rl
from pyalign.bench.common import compiled, record

BETA, EPS_LOW, EPS_HIGH = 0.04, 0.2, 0.28


def _trl_formula(lp, old, ref, adv, mask):
    coef = torch.exp(lp - old)
    coef2 = torch.clamp(coef, 1 - EPS_LOW, 1 + EPS_HIGH)
    a = adv.unsqueeze(1)
    ptl = -torch.min(coef * a, coef2 * a)
    kl = torch.exp(ref - lp) - (ref - lp) - 1
    ptl = ptl + BETA * kl
    loss = (ptl * mask).sum() / mask.sum().clamp(min=1.0)
    low = ((coef < 1 - EPS_LOW) & (a < 0)).float()
    high = ((coef > 1 + EPS_HIGH) & (a > 0)).float()
    n = mask.sum()
    metrics = torch.stack([(kl * mask).sum() / n, (low * mask).sum() / n, (high * mask).sum() / n])
    return loss, metrics


def _ours(lp, old, ref, adv, mask):
    return rl.policy_loss(lp, old, adv, mask, loss_type="dapo", epsilon_high=EPS_HIGH, beta=BETA, ref_logps=ref)


def _fwd_bwd(impl, lp, *rest):
    def run():
        x = lp.detach().requires_grad_()
        loss, _ = impl(x, *rest)
        loss.backward()
        return x.grad
    return run


def sizes(device: str, quick: bool):
    if device == "cuda":
        return [(64, 2048)] if quick else [(64, 2048), (256, 8192)]
    return [(16, 1024)] if quick else [(64, 4096)]


def run(device: str, quick: bool) -> list[dict]:
    rows = []
    for B, T in sizes(device, quick):
        g = torch.Generator().manual_seed(0)
        lp = (-torch.rand(B, T, generator=g) * 3).to(device)
        old = (lp.cpu() + 0.1 * torch.randn(B, T, generator=g)).to(device)
        ref = (lp.cpu() + 0.1 * torch.randn(B, T, generator=g)).to(device)
        adv = torch.randn(B, generator=g).to(device)
        mask = (torch.rand(B, T, generator=g) < 0.9).float().to(device)
        size = f"{B}x{T} tokens fp32"
        moved = 4 * B * T * 4 + B * T * 4  # four [B, T] inputs read, one gradient written
        impls = [("pyalign", _ours), ("eager", _trl_formula), ("compile", compiled(_trl_formula, dynamic=False))]
        for name, impl in impls:
            rows.append(record("rl", "policy_loss dapo+kl fwd+bwd", size, name,
                               _fwd_bwd(impl, lp, old, ref, adv, mask), device, bytes_moved=moved))
    return rows
