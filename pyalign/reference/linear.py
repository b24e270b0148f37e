"""Reference fused-linear log-probs: materialize ``hidden @ weight.T + bias`` and apply the
log-prob reference (:mod:`pyalign.reference.logprob`), in float64 by default."""
from __future__ import annotations

import torch

from pyalign.reference.logprob import token_stats


def linear_token_stats(hidden, weight, labels, *, bias=None, dtype=torch.float64, **kwargs):
    """Dict of logprobs, entropy, log_sum_sq_probs, mean_logit, is_top1 (see ``token_stats``)."""
    logits = hidden.to(dtype) @ weight.to(dtype).t()
    if bias is not None:
        logits = logits + bias.to(dtype)
    return token_stats(logits, labels, dtype=dtype, **kwargs)


def eager_linear_logprobs(hidden, weight, labels, *, bias=None, ignore_index=-100):
    """What a user writes without pyalign: full logits, log_softmax, gather (input dtype)."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, lp, torch.zeros_like(lp))
