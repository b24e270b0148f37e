"""Online-RL suite: pyalign.rl.policy_loss (one fused kernel: loss, gradients, metrics) vs the same
per-token formula as TRL's GRPOTrainer writes it in eager PyTorch, and torch.compile of it. The case is
DAPO with a k3 KL penalty to a reference model (beta 0.04), the clip-ratio metrics included, forward +
backward (the gradient w.r.t. the log-probs). The kernel reads each input once and writes the gradient
once: ``bytes_moved`` counts that.

``fused_linear_policy_loss`` (GRPO with an entropy bonus, from hidden states and the LM head) against
eager: the full logits, log_softmax, the gathered log-probs and entropy, then the same policy loss;
Liger-Kernel's ``LigerFusedLinearGRPOLoss`` is not a row (its GRPO refuses the entropy bonus).
Forward + backward with the gradients of hidden and weight; ``pyalign`` is the single pass (its gradients
formed in the forward, 3 GEMMs per chunk), ``pyalign recompute`` the composite schedule (4 GEMMs)."""
from __future__ import annotations

import torch

import pyalign
from pyalign import rl
from pyalign.bench.common import compare, compiled

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


def _linear_ours(h, w, y, old, adv, mask):
    return rl.fused_linear_policy_loss(h, w, y, old, adv, mask, loss_type="grpo", entropy_coef=0.01)[0]


def _linear_recompute(h, w, y, old, adv, mask):
    with pyalign.overrides(forward_gradients=False):  # the composite schedule: 4 GEMMs per chunk
        return _linear_ours(h, w, y, old, adv, mask)


def _linear_eager(h, w, y, old, adv, mask):
    z = torch.log_softmax((h @ w.t()).float(), -1)
    lp = z.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    ent = -(z.exp() * z).sum(-1)
    return rl.policy_loss(lp, old, adv, mask, loss_type="grpo", entropy_coef=0.01, entropy=ent)[0]


def _linear_fwd_bwd(impl, h, w, *rest):
    def run():
        hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()
        impl(hh, ww, *rest).backward()
        return hh.grad, ww.grad
    return run


def _linear_sizes(device: str, quick: bool):
    if device == "cuda":
        return [(8, 1024, 1024, 32000, torch.float32)] if quick else [(8, 1024, 1024, 32000, torch.float32),
                                                                     (64, 2048, 4096, 151936, torch.bfloat16)]
    return [(2, 256, 256, 8000, torch.float32)] if quick else [(8, 1024, 1024, 32000, torch.float32)]


def _linear_rows(device: str, quick: bool) -> list[dict]:
    rows = []
    for B, T, H, V, dtype in _linear_sizes(device, quick):
        g = torch.Generator().manual_seed(1)
        h = (torch.randn(B, T, H, generator=g) / H ** 0.5).to(device, dtype)
        w = (torch.randn(V, H, generator=g) * 0.02).to(device, dtype)
        y = torch.randint(0, V, (B, T), generator=g).to(device)
        old = (-torch.rand(B, T, generator=g) * 5 - 5).to(device)
        adv = torch.randn(B, generator=g).to(device)
        mask = torch.ones(B, T, device=device)
        size = f"{B}x{T} tokens, H {H}, V {V} {str(dtype).replace('torch.', '')}"
        impls = [("pyalign", _linear_ours), ("pyalign recompute", _linear_recompute)]
        if B * T * V * 4 <= 8 * 2**30:  # the eager logits must fit
            impls.append(("eager", _linear_eager))
        rows += compare("rl", "fused_linear_policy_loss grpo+entropy fwd+bwd", size,
                        [(name, _linear_fwd_bwd(impl, h, w, y, old, adv, mask)) for name, impl in impls], device, reps=3)
    return rows


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
        rows += compare("rl", "policy_loss dapo+kl fwd+bwd", size,
                        [(name, _fwd_bwd(impl, lp, old, ref, adv, mask)) for name, impl in impls], device,
                        bytes_moved=moved, reps=15)
    return rows + _linear_rows(device, quick)
