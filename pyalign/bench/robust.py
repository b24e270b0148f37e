"""Bench of robust and uncertainty-aware alignment: ``run(device, quick) -> list[dict]``.

Each row against the eager composition a user would write: an ensemble of reward heads (one
batched GEMM and one fused Bradley-Terry call vs a loop over M ``nn.Linear`` members), the
aggregation of K objectives (softmin, Nash welfare), ensemble advantages (aggregate, then group
normalization), the KL-DRO reduction of a DPO loss and the group-robust weights (per-group means
by ``index_add``, the mirror-ascent step). Forward + backward where the op is differentiable.

Run: ``python -m pyalign.bench --only robust [--full]``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pyalign import losses, rl, uncertainty as U
from pyalign.bench.common import compare

SUITE = "robust"
REPS = 15  # rounds of the interleaved timing: each call is well under a millisecond


def _grad_of(fn, leaves):
    def run():
        for x in leaves:
            x.grad = None
        out = fn()
        out.backward()
        return out
    return run


def _ensemble_head(device, quick):
    m, f, p = (8, 512, 512) if quick else (8, 4096, 2048)
    torch.manual_seed(0)
    head = U.EnsembleRewardHead(f, m, bootstrap="poisson").to(device)
    members = [torch.nn.Linear(f, 1, bias=False).to(device) for _ in range(m)]
    ch, rj = torch.randn(p, f, device=device), torch.randn(p, f, device=device)
    ids = torch.arange(p, device=device)
    weights = head.bootstrap_weights(ids)  # the same bootstrap for the eager loop

    def eager():
        total = 0.0
        for k, lin in enumerate(members):
            margin = (lin(ch) - lin(rj)).squeeze(-1)
            total = total + (weights[k] * -F.logsigmoid(margin)).mean()
        return total

    size = f"M={m} F={f} pairs={p} fp32"
    return compare(SUITE, "ensemble_reward_head BT fwd+bwd", size, [
        ("pyalign", _grad_of(lambda: head.loss(ch, rj, example_ids=ids)[0], list(head.parameters()))),
        ("eager", _grad_of(eager, [q for lin in members for q in lin.parameters()]))], device,
        measure_memory=False, reps=REPS)


def _objectives(device, quick):
    k, n = (4, 100_000) if quick else (4, 1_000_000)
    r = (torch.rand(k, n, device=device) + 0.1).requires_grad_()
    w = torch.tensor([1.0, 0.5, 2.0, 1.0], device=device)
    t = 0.5
    eager = {
        "softmin": lambda: -t * torch.logsumexp(torch.log(w / w.sum())[:, None] - r / t, 0),
        "nash": lambda: (w[:, None] * torch.log(r)).sum(0),
    }
    rows = []
    for method, fn in eager.items():
        size = f"K={k} N={n} fp32"
        ours = lambda method=method: U.aggregate_objectives(r, method=method, weights=w, temperature=t)  # noqa: E731
        rows += compare(SUITE, f"aggregate_objectives {method} fwd+bwd", size,
                        [(impl, _grad_of(lambda f=f: f().sum(), [r])) for impl, f in (("pyalign", ours), ("eager", fn))],
                        device, measure_memory=False, reps=REPS)
    return rows


def _ensemble_advantages(device, quick):
    m, n, g = (8, 4096, 8) if quick else (8, 65536, 16)
    r = torch.randn(m, n, device=device)

    def eager():
        agg = r.mean(0) - 0.5 * r.var(0, unbiased=False)
        grp = agg.view(-1, g)
        return ((grp - grp.mean(1, keepdim=True)) / (grp.std(1, keepdim=True) + 1e-4)).reshape(-1)

    size = f"M={m} N={n} group={g} fp32"
    return compare(SUITE, "ensemble_advantages uwo", size,
                   [("pyalign", lambda: rl.ensemble_advantages(r, g, method="uwo", lam=0.5)), ("eager", eager)],
                   device, measure_memory=False, reps=REPS)


def _dro(device, quick):
    n = 4096 if quick else 65536
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (torch.randn(n, generator=g).to(device) for _ in range(4))
    leaves = [pc.requires_grad_(), pr.requires_grad_()]
    tau = 0.5

    def eager():
        per = -F.logsigmoid(0.1 * ((pc - rc) - (pr - rr)))
        return -tau * (torch.logsumexp(-per / tau, 0) - math.log(n))

    size = f"{n} pairs fp32"
    ours = lambda: losses.dpo_loss(pc, pr, rc, rr, reduction="dro", dro_temperature=tau)[0]  # noqa: E731
    return compare(SUITE, "dpo_loss sigmoid reduction=dro fwd+bwd", size,
                   [(impl, _grad_of(fn, leaves)) for impl, fn in (("pyalign", ours), ("eager", eager))], device,
                   measure_memory=False, reps=REPS)


def _group_weights(device, quick):
    n, groups = (4096, 8) if quick else (65536, 8)
    g = torch.Generator().manual_seed(2)
    per = (torch.rand(n, generator=g) * 2).to(device).requires_grad_()
    ids = torch.randint(0, groups, (n,), generator=g).to(device)
    robust = losses.GroupRobustWeights(groups, step_size=0.01).to(device)
    alpha = torch.full((groups,), 1.0 / groups, device=device)

    def eager():
        counts = torch.zeros(groups, device=device).index_add_(0, ids, torch.ones(n, device=device))
        means = torch.zeros(groups, device=device).index_add(0, ids, per) / counts.clamp(min=1)
        logw = alpha.log() + 0.01 * torch.where(counts > 0, means.detach(), torch.zeros_like(means))
        alpha.copy_(torch.softmax(logw, 0))
        return (alpha * means).sum()

    size = f"{n} examples, {groups} groups fp32"
    return compare(SUITE, "GroupRobustWeights step fwd+bwd", size,
                   [(impl, _grad_of(fn, [per])) for impl, fn in (("pyalign", lambda: robust(per, ids)[0]), ("eager", eager))],
                   device, measure_memory=False, reps=REPS)


def run(device: str, quick: bool) -> list[dict]:
    rows = []
    rows += _ensemble_head(device, quick)
    rows += _objectives(device, quick)
    rows += _ensemble_advantages(device, quick)
    rows += _dro(device, quick)
    rows += _group_weights(device, quick)
    return rows
