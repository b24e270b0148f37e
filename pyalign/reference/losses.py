"""Reference preference losses in plain PyTorch, written from each paper's formula.

Each function returns per-element losses (before weights and reduction) as a differentiable
tensor, so gradients come from autograd. Inputs are promoted to ``dtype`` (float64 by default).
``reduce`` applies weights and the reduction the way :mod:`pyalign.losses` documents it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CAP = 40.0  # exponent cap of the f-divergence / AlphaPO exponentials (as the kernel)


def _f(x, dtype):
    return None if x is None else x.to(dtype)


def reduce(per_elem, weights=None, reduction="mean"):
    if weights is not None:
        per_elem = per_elem * weights.to(per_elem.dtype)
    if reduction == "mean":
        return per_elem.mean()
    if reduction == "sum":
        return per_elem.sum()
    return per_elem


def fdiv_score(r, f_divergence="reverse_kl", f_alpha=0.5):
    """f'(u) at u = exp(r) with constants dropped (f-DPO, Wang et al. 2023, Table 1)."""
    if f_divergence == "reverse_kl":
        return r
    if f_divergence == "forward_kl":
        return -torch.exp(torch.clamp(-r, max=CAP))
    if f_divergence == "js_divergence":
        # f'(u) = log(2u / (1 + u)), constant log 2 dropped; the direct form where exp(r) is safe.
        if r.abs().max() < 30:
            u = torch.exp(r)
            return torch.log(2 * u / (1 + u)) - math.log(2)
        return F.logsigmoid(r)
    if f_divergence == "alpha_divergence":
        if abs(f_alpha - 1) < 1e-6:
            return r
        return torch.exp(torch.clamp((f_alpha - 1) * r, max=CAP)) / (f_alpha - 1)
    raise ValueError(f_divergence)


def _cdpo(z, eps):
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def dpo_losses(pc, pr, rc=None, rr=None, *, loss_type="sigmoid", loss_weights=None, beta=0.1,
               label_smoothing=0.0, f_divergence="reverse_kl", f_alpha=0.5, chosen_lengths=None,
               rejected_lengths=None, discopop_tau=0.05, dtype=torch.float64):
    """Per-pair DPO-family losses; aot terms are attributed to the pair whose sorted X has that rank."""
    pc, pr, rc, rr = (_f(x, dtype) for x in (pc, pr, rc, rr))
    if rc is None:
        rc, rr = torch.zeros_like(pc), torch.zeros_like(pr)
    Lc = torch.ones_like(pc) if chosen_lengths is None else chosen_lengths.to(dtype).clamp(min=1)
    Lr = torch.ones_like(pr) if rejected_lengths is None else rejected_lengths.to(dtype).clamp(min=1)
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(types) if loss_weights is None else list(loss_weights)
    lc, lr = pc - rc, pr - rr
    sc, sr = fdiv_score(lc, f_divergence, f_alpha), fdiv_score(lr, f_divergence, f_alpha)
    delta = sc - sr
    eps = label_smoothing
    total = torch.zeros_like(pc)
    for t, tw in zip(types, weights):
        if t == "sigmoid":
            l = _cdpo(beta * delta, eps)
        elif t == "robust":
            l = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
        elif t == "hinge":
            l = torch.relu(1 - beta * delta)
        elif t == "ipo":
            l = (sc / Lc - sr / Lr - 1 / (2 * beta)) ** 2
        elif t == "sigmoid_norm":
            l = -F.logsigmoid(beta * (sc / Lc - sr / Lr))
        elif t == "exo_pair":
            z = beta * delta
            qw, ql = torch.sigmoid(z), torch.sigmoid(-z)
            l = qw * (F.logsigmoid(z) - math.log(1 - eps)) + ql * (F.logsigmoid(-z) - math.log(eps))
        elif t == "nca_pair":
            zc, zr = beta * sc, beta * sr
            l = -F.logsigmoid(zc) - 0.5 * F.logsigmoid(-zc) - 0.5 * F.logsigmoid(-zr)
        elif t == "bco_pair":
            l = -F.logsigmoid(beta * sc) - F.logsigmoid(-beta * sr)
        elif t == "sppo_hard":
            l = (sc - 0.5 / beta) ** 2 + (sr + 0.5 / beta) ** 2
        elif t == "apo_zero":
            l = 1 - torch.sigmoid(beta * lc) + torch.sigmoid(beta * lr)
        elif t == "apo_down":
            l = torch.sigmoid(beta * lc) + 1 - torch.sigmoid(beta * delta)
        elif t == "discopop":
            x = beta * delta
            m = torch.sigmoid(x / discopop_tau)
            l = -F.logsigmoid(x) * (1 - m) + torch.exp(-x) * m
        elif t == "sft":
            l = -pc / Lc
        elif t in ("aot", "aot_unpaired"):
            x, y = (pc - pr, rc - rr) if t == "aot" else (lc, lr)
            xs, ix = torch.sort(x, stable=True)
            ys, _ = torch.sort(y, stable=True)
            per_rank = _cdpo(beta * (xs - ys), eps)
            l = torch.zeros_like(pc).index_put((ix,), per_rank)
        else:
            raise ValueError(t)
        total = total + tw * l
    return total


def dpo_metrics(pc, pr, rc=None, rr=None, *, beta=0.1, dtype=torch.float64):
    pc, pr = pc.detach().to(dtype), pr.detach().to(dtype)
    rc = torch.zeros_like(pc) if rc is None else rc.detach().to(dtype)
    rr = torch.zeros_like(pr) if rr is None else rr.detach().to(dtype)
    ch, rj = beta * (pc - rc), beta * (pr - rr)
    return {"rewards/chosen": ch.mean(), "rewards/rejected": rj.mean(), "rewards/margins": (ch - rj).mean(),
            "rewards/accuracies": (ch > rj).to(dtype).mean(), "logps/chosen": pc.mean(), "logps/rejected": pr.mean()}


def kto_losses(policy, ref, desirable, *, policy_kl=None, ref_kl=None, beta=0.1, desirable_weight=1.0,
               undesirable_weight=1.0, loss_type="kto", dtype=torch.float64):
    """KTO (Ethayarajh et al. 2024, eq. 8) per element, in the input order."""
    p, r = policy.to(dtype), ref.to(dtype)
    d = desirable.bool()
    lr = p - r
    if loss_type == "kto":
        z0 = torch.zeros((), dtype=dtype) if policy_kl is None else \
            (policy_kl.to(dtype) - ref_kl.to(dtype)).mean().detach().clamp(min=0)
        good = 1 - torch.sigmoid(beta * (lr - z0))
        bad = 1 - torch.sigmoid(beta * (z0 - lr))
    else:
        good = 1 - torch.sigmoid(beta * lr)
        bad = torch.sigmoid(beta * lr)
    return torch.where(d, desirable_weight * good, undesirable_weight * bad)


def bco_losses(policy, ref, desirable, *, running_mean=0.0, running_count=0, beta=0.1, dtype=torch.float64):
    """BCO (Jung et al. 2024, eq. 9) per element; returns (losses, new_mean)."""
    rewards = beta * (policy.to(dtype) - ref.to(dtype))
    batch = rewards.detach().mean()
    delta = running_mean + (batch - running_mean) / (running_count + 1)
    d = desirable.bool()
    l = torch.where(d, -F.logsigmoid(rewards - delta), -F.logsigmoid(-(rewards - delta)))
    return l, delta


def orpo_losses(pc, pr, lc, lr, *, beta=0.1, dtype=torch.float64):
    """ORPO (Hong et al. 2024, eqs. 6-7) on per-token mean log-probs."""
    mc = pc.to(dtype) / lc.to(dtype).clamp(min=1)
    mr = pr.to(dtype) / lr.to(dtype).clamp(min=1)
    log_odds = (mc - mr) - (torch.log(-torch.expm1(mc)) - torch.log(-torch.expm1(mr)))
    return -mc - beta * F.logsigmoid(log_odds), log_odds


def cpo_losses(pc, pr, *, loss_type="sigmoid", beta=0.1, label_smoothing=0.0, gamma=0.5, alpha=0.0,
               cpo_alpha=1.0, lc=None, lr=None, dtype=torch.float64):
    """CPO / SimPO / AlphaPO per pair; returns (losses, chosen_reward, rejected_reward)."""
    pc, pr = pc.to(dtype), pr.to(dtype)
    Lc = torch.ones_like(pc) if lc is None else lc.to(dtype).clamp(min=1)
    Lr = torch.ones_like(pr) if lr is None else lr.to(dtype).clamp(min=1)
    if loss_type in ("ipo", "simpo"):
        sc, sr = pc / Lc, pr / Lr
    else:
        sc, sr = pc, pr
    if alpha != 0:  # AlphaPO: r = (1 - p^(-alpha)) / alpha with p = exp(score)
        rc = (1 - torch.exp(torch.clamp(-alpha * sc, max=CAP))) / alpha
        rr = (1 - torch.exp(torch.clamp(-alpha * sr, max=CAP))) / alpha
    else:
        rc, rr = sc, sr
    x = rc - rr
    eps = label_smoothing
    if loss_type == "simpo":
        l = _cdpo(beta * (x - gamma / beta), eps)
    elif loss_type == "sigmoid":
        l = _cdpo(beta * x, eps)
    elif loss_type == "hinge":
        l = torch.relu(1 - beta * x)
    elif loss_type == "ipo":
        l = (x - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(loss_type)
    nll = -pc / (Lc if lc is not None else 1)
    return l + cpo_alpha * nll, rc, rr


def rm_losses(rc, rr, *, margin=None, center=0.0, dtype=torch.float64):
    """Bradley-Terry with margin and centering."""
    rc, rr = rc.to(dtype), rr.to(dtype)
    m = 0 if margin is None else margin.to(dtype)
    return -F.logsigmoid(rc - rr - m) + center * (rc + rr) ** 2
