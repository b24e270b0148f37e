"""Reference log-probs: log_softmax + gather, computed in float64 (or a given dtype)."""
from __future__ import annotations

import torch


def transform(logits, temperature=1.0, logit_scale=1.0, softcap=None):
    z = logits * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def token_stats(logits, labels, *, ignore_index=-100, temperature=1.0, logit_scale=1.0, softcap=None,
                shift=False, dtype=torch.float64):
    """Dict of logprobs, entropy, log_sum_sq_probs, mean_logit, is_top1 (0/False where ignored)."""
    if shift:
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    x = logits.to(dtype)
    logp_all = torch.log_softmax(transform(x, temperature, logit_scale, softcap), dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    lp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    p = logp_all.exp()
    ent = -(p * torch.where(p > 0, logp_all, torch.zeros_like(logp_all))).sum(-1)
    lss = torch.logsumexp(2 * logp_all, dim=-1)
    mean = transform(x, temperature, logit_scale, softcap).mean(-1)
    top1 = x.argmax(-1) == safe
    zero = torch.zeros_like(lp)
    return {
        "logprobs": torch.where(valid, lp, zero),
        "entropy": torch.where(valid, ent, zero),
        "log_sum_sq_probs": torch.where(valid, lss, zero),
        "mean_logit": torch.where(valid, mean, zero),
        "is_top1": valid & top1,
    }
