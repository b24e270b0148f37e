"""Continual alignment without forgetting: a reward model learns preferences of task A, then of
task B, with and without consolidation (EWC, synaptic intelligence, MAS), and we print how much
of task A's pairwise accuracy it keeps.

The reward model is a small MLP scoring a feature vector; each task is a set of preference pairs
(chosen, rejected) labelled by a hidden task-specific utility, trained with the Bradley-Terry
loss -log sigmoid(r(chosen) - r(rejected)). The two tasks draw their inputs from different
feature subspaces and prefer different directions, so plain fine-tuning on B overwrites A.

    python examples/continual_alignment.py            # ~10 s on a 2-core CPU
    python examples/continual_alignment.py --quick    # a few seconds (used by the tests)
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from pyalign import plasticity as P

DIM = 16


def make_task(seed: int, n: int, active: slice):
    g = torch.Generator().manual_seed(seed)
    utility = torch.randn(DIM, generator=g)
    mask = torch.zeros(DIM)
    mask[active] = 1
    a = torch.randn(n, DIM, generator=g) * mask + 0.1 * torch.randn(n, DIM, generator=g)
    b = torch.randn(n, DIM, generator=g) * mask + 0.1 * torch.randn(n, DIM, generator=g)
    score = lambda z: torch.tanh(z @ utility) + 0.3 * (z @ utility)
    first_wins = score(a) > score(b)
    chosen = torch.where(first_wins[:, None], a, b)
    rejected = torch.where(first_wins[:, None], b, a)
    return chosen, rejected


def accuracy(model, task) -> float:
    with torch.no_grad():
        c, r = task
        return float((model(c) > model(r)).float().mean())


def train(model, task, steps, reg=None, kind=None, batch=64, seed=0):
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    c_all, r_all = task
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, c_all.shape[0], (batch,), generator=g)
        opt.zero_grad()
        loss = -F.logsigmoid(model(c_all[idx]) - model(r_all[idx])).mean()
        loss.backward()
        if kind == "ewc_fisher":
            reg.accumulate()  # squared gradients of the task loss
        if reg is not None and kind != "ewc_fisher":
            reg.penalty()  # adds the consolidation gradient to .grad in the same pass
        opt.step()
        if isinstance(reg, P.SynapticIntelligence):
            reg.accumulate()


def model_factory():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM, 64), nn.Tanh(), nn.Linear(64, 1), nn.Flatten(0))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps (smoke test)")
    args = ap.parse_args(argv)
    steps = 150 if args.quick else 600
    n = 1024 if args.quick else 4096
    task_a = make_task(1, n, slice(0, 10))
    task_b = make_task(2, n, slice(6, 16))
    strengths = {"none": 0.0, "EWC": 5000.0, "SI": 20.0, "MAS": 1.0}

    results = {}
    for name, strength in strengths.items():
        model = model_factory()
        reg = None
        if name == "SI":
            reg = P.SynapticIntelligence(model, strength=strength, xi=0.1)
        train(model, task_a, steps, reg=reg if name == "SI" else None)
        acc_a_before = accuracy(model, task_a)
        if name == "EWC":
            reg = P.EWC(model, strength=strength)
            c, r = task_a
            for i in range(0, min(n, 512), 32):  # per-batch squared gradients on task A
                model.zero_grad()
                (-F.logsigmoid(model(c[i:i + 32]) - model(r[i:i + 32])).mean()).backward()
                reg.accumulate()
            reg.consolidate()
        elif name == "MAS":
            reg = P.MAS(model, strength=strength)
            c, _ = task_a
            for i in range(0, min(n, 512), 64):  # output sensitivity on unlabelled task-A inputs
                reg.accumulate(model(c[i:i + 64])[:, None])
            reg.consolidate()
        elif name == "SI":
            reg.consolidate()
        train(model, task_b, steps, reg=reg if name != "none" else None, seed=1)
        results[name] = (acc_a_before, accuracy(model, task_a), accuracy(model, task_b))

    print(f"{'consolidation':<14}{'A after A':>10}{'A after B':>10}{'B after B':>10}{'A kept':>8}")
    for name, (a0, a1, b1) in results.items():
        kept = (a1 - 0.5) / max(a0 - 0.5, 1e-6)  # share of above-chance accuracy kept
        print(f"{name:<14}{a0:>10.3f}{a1:>10.3f}{b1:>10.3f}{kept:>8.0%}")
    return results


if __name__ == "__main__":
    main()
