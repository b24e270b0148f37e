"""Reference ensemble uncertainty in plain PyTorch: the test oracle and the eager baseline.

``token_uncertainty`` materializes the ``[M, tokens, V]`` probabilities (what the fused kernel
avoids); computed in float64 by default.
"""
from __future__ import annotations

import torch


def token_uncertainty(logits, labels=None, *, temperature=1.0, ignore_index=-100, dtype=torch.float64):
    """Dict of total_entropy, expected_entropy, mutual_information and, with labels, logprobs,
    prob_variance, member_logprobs (all 0 where labels == ignore_index)."""
    x = logits.to(dtype) / temperature
    logp = torch.log_softmax(x, dim=-1)                      # [M, ..., V]
    p = logp.exp()
    ent_m = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)   # [M, ...]
    expected = ent_m.mean(0)
    pbar = p.mean(0)
    total = -torch.xlogy(pbar, pbar).sum(-1)
    mi = (total - expected).clamp(min=0)
    out = {"total_entropy": total, "expected_entropy": expected, "mutual_information": mi}
    if labels is not None:
        valid = labels != ignore_index
        safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
        idx = safe.unsqueeze(0).unsqueeze(-1).expand(logp.shape[0], *safe.shape, 1)
        mlp = logp.gather(-1, idx).squeeze(-1)               # [M, ...]
        ens = torch.logsumexp(mlp, dim=0) - torch.log(torch.tensor(float(mlp.shape[0]), dtype=dtype))
        pv = mlp.exp().var(0, unbiased=False)
        zero = torch.zeros_like(total)
        for k in out:
            out[k] = torch.where(valid, out[k], zero)
        out["logprobs"] = torch.where(valid, ens, zero)
        out["prob_variance"] = torch.where(valid, pv, zero)
        out["member_logprobs"] = torch.where(valid.unsqueeze(0), mlp, torch.zeros_like(mlp))
    return out


def reward_stats(rewards, variances=None, weights=None, *, ddof=0, q=None, dtype=torch.float64):
    """Dict of mean, var, min, max (and quantile, aleatoric) over dim 0 of ``[M, N]``."""
    r = rewards.to(dtype)
    m = r.shape[0]
    w = torch.full((m,), 1.0 / m, dtype=dtype) if weights is None else weights.to(dtype) / weights.to(dtype).sum()
    w = w.to(r.device).unsqueeze(1)
    mean = (w * r).sum(0)
    var = (w * (r - mean) ** 2).sum(0) / (1 - ddof * float((w * w).sum()))
    out = {"mean": mean, "var": var, "min": r.amin(0), "max": r.amax(0)}
    if q is not None:
        out["quantile"] = torch.quantile(r, q, dim=0)
    if variances is not None:
        out["aleatoric"] = (w * variances.to(dtype)).sum(0)
    return out


def preference_uncertainty(r_chosen, r_rejected, *, beta=1.0, dtype=torch.float64):
    """Dict of prob, prob_variance, total, aleatoric, epistemic for [M, N] member rewards."""
    x = beta * (r_chosen.to(dtype) - r_rejected.to(dtype))
    p = torch.sigmoid(x)
    h = lambda q: -(torch.xlogy(q, q) + torch.xlogy(1 - q, 1 - q))
    pbar = p.mean(0)
    total, ale = h(pbar), h(p).mean(0)
    return {"prob": pbar, "prob_variance": p.var(0, unbiased=False), "total": total, "aleatoric": ale,
            "epistemic": (total - ale).clamp(min=0)}


def calibration(probs, targets, *, n_bins=15):
    """ECE/MCE with uniform bins by an explicit loop over bins (float64)."""
    p = probs.double()
    if p.dim() == 1:
        pred = (p >= 0.5).long()
        conf = torch.where(pred == 1, p, 1 - p)
        correct = (pred == targets.long()).double()
    else:
        conf, pred = p.max(1)
        correct = (pred == targets.long()).double()
    ece, mce = 0.0, 0.0
    n = p.shape[0]
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        sel = (conf > lo) & (conf <= hi) if b > 0 else (conf >= lo) & (conf <= hi)
        if int(sel.sum()) == 0:
            continue
        gap = abs(float(correct[sel].mean()) - float(conf[sel].mean()))
        ece += int(sel.sum()) / n * gap
        mce = max(mce, gap)
    return ece, mce
