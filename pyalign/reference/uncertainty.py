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


def aggregate_objectives(rewards, *, method="sum", weights=None, temperature=1.0, disagreement=0.0,
                         dtype=torch.float64):
    """[K, N] -> [N] by the plain formulas, one objective at a time (float64)."""
    import math
    r = rewards.to(dtype)
    k = r.shape[0]
    w = [1.0] * k if weights is None else [float(v) for v in weights]
    d = disagreement.to(dtype) if isinstance(disagreement, torch.Tensor) else torch.full_like(r, disagreement)
    if d.dim() == 1 and r.dim() > 1:
        d = d.reshape(k, *([1] * (r.dim() - 1))).expand(r.shape)
    d = d.expand(r.shape)
    out = torch.zeros_like(r[0])
    if method == "sum":
        for i in range(k):
            out = out + w[i] * r[i]
        return out
    if method == "min":
        rows = [r[i] for i in range(k) if w[i] > 0]
        out = rows[0]
        for row in rows[1:]:
            out = torch.minimum(out, row)
        return out
    if method == "softmin":
        total = sum(w)
        shift = r.amin(0)  # exp(-(r - min) / T) <= 1
        acc = torch.zeros_like(out)
        for i in range(k):
            acc = acc + (w[i] / total) * torch.exp(-(r[i] - shift) / temperature)
        return shift - temperature * torch.log(acc)
    if method == "nash":
        for i in range(k):
            if w[i] > 0:
                out = out + w[i] * torch.log(r[i] - d[i])
        return out
    raise ValueError(method)


def ensemble_head_rewards(features, weight, bias=None, hidden_weight=None, hidden_bias=None, activation="relu",
                          dtype=torch.float64):
    """[M, ...] rewards of M heads, one member at a time: w_m . x (+ b_m), or w_m . act(x U_m + c_m) (+ b_m)."""
    acts = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "tanh": torch.tanh,
            "silu": torch.nn.functional.silu}
    x = features.to(dtype)
    outs = []
    for m in range(weight.shape[0]):
        h = x if hidden_weight is None else acts[activation](x @ hidden_weight[m].to(dtype) + hidden_bias[m].to(dtype))
        r = h @ weight[m].to(dtype)
        outs.append(r if bias is None else r + bias[m].to(dtype))
    return torch.stack(outs)


_M64 = (1 << 64) - 1


def _splitmix64(x):
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def bootstrap_weights(seed, members, example_ids, *, method, p=0.5):
    """[M, P] float64 bootstrap weights with Python integers: key_m = s(s(seed + 2 golden) ^ m),
    u = (s(key_m ^ id) >> 11) / 2^53 (s = splitmix64, golden = 0x9E3779B97F4A7C15, all mod 2^64);
    "bernoulli": 1[u < p] / p, "poisson": the smallest k with P(Poisson(1) <= k) > u."""
    import math
    base = _splitmix64((seed + 2 * 0x9E3779B97F4A7C15) & _M64)
    rows = []
    for m in range(members):
        key = _splitmix64(base ^ m)
        row = []
        for i in example_ids.tolist():
            u = (_splitmix64(key ^ (i & _M64)) >> 11) / 2.0 ** 53
            if method == "bernoulli":
                row.append((1.0 if u < p else 0.0) / p)
            else:
                k, term = 0, math.exp(-1.0)
                cdf = term
                while u >= cdf:
                    k += 1
                    term /= k
                    cdf += term
                row.append(float(k))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


def ensemble_bt_loss(r_chosen, r_rejected, weights=None, *, margin=0.0, center=0.0, dtype=torch.float64):
    """sum_m (1/P) sum_i w_mi (-log sigmoid(r_c - r_r - margin) + center (r_c + r_r)^2) of [M, P] rewards."""
    rc, rr = r_chosen.to(dtype), r_rejected.to(dtype)
    m, p = rc.shape
    w = torch.ones(m, p, dtype=dtype) if weights is None else weights.to(dtype)
    total = 0.0
    for k in range(m):
        x = rc[k] - rr[k] - (margin.to(dtype) if isinstance(margin, torch.Tensor) else margin)
        per = -torch.nn.functional.logsigmoid(x) + center * (rc[k] + rr[k]) ** 2
        total = total + (w[k] * per).sum() / p
    return total


def temperature_nll(logits, targets, temperature, dtype=torch.float64):
    """Mean NLL of logits / temperature: binary [N] (targets 0/1 or probabilities) or [N, C] (class ids)."""
    z = logits.to(dtype) / temperature
    if z.dim() == 1:
        t = targets.to(dtype)
        return -(t * torch.nn.functional.logsigmoid(z) + (1 - t) * torch.nn.functional.logsigmoid(-z)).mean()
    return -torch.log_softmax(z, dim=1).gather(1, targets.long().unsqueeze(1)).mean()
