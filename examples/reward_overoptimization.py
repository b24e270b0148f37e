"""Reward over-optimization and the uncertainty penalty that limits it, in a plain RL loop.

World: a policy over 1024 actions (a bandit: one prompt, many possible completions), each action a
feature vector. The gold reward is linear in the first 8 of 16 features. A proxy reward ensemble
(16 ridge regressions on bootstrap resamples of 64 noisy gold labels) is fitted on data that
barely varies in the last 8 features, so the members' weights there are estimation noise. Actions
mix the two subspaces (angle t from "covered only" to "uncovered only"). Maximizing the ensemble
mean drifts to the uncovered actions where the noise happens to be positive (the winner's curse of
Gao et al. 2022, arXiv:2210.10760): the proxy rises while the gold reward falls. Penalizing the
ensemble's disagreement (``uwo``: mean - lam * variance; ``lcb``: mean - lam * std; Coste et al.
2023, arXiv:2310.02743) keeps the policy where the members agree.

Each step samples a group of completions, turns the ensemble's rewards into advantages with
``pyalign.rl.ensemble_advantages`` and updates with ``pyalign.rl.policy_loss`` (GRPO).

Run: ``python examples/reward_overoptimization.py [--plot curve.png]`` (about 20 s on a 2-core CPU).
It prints the final gold and proxy reward per method, averaged over seeds.
"""
from __future__ import annotations

import argparse
import math

import torch

from pyalign import rl

METHODS = {"mean": 0.0, "uwo": 5.0, "lcb": 5.0}  # method -> lam


def world(seed: int, *, actions=1024, dims=16, covered=8, n_train=64, members=16, noise=0.5, ridge=1e-2):
    """Gold rewards ``[A]`` and the proxy ensemble's rewards ``[M, A]`` of one random world."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    w = torch.cat([torch.randn(covered, generator=g, dtype=f64), torch.zeros(dims - covered, dtype=f64)])
    w /= w.norm()
    # Training features vary little outside the covered subspace: those weights are barely identified.
    scale = torch.cat([torch.ones(covered, dtype=f64), torch.full((dims - covered,), 0.05, dtype=f64)])
    x_train = torch.randn(n_train, dims, generator=g, dtype=f64) * scale
    y_train = x_train @ w + noise * torch.randn(n_train, generator=g, dtype=f64)
    u = torch.nn.functional.normalize(torch.randn(actions, covered, generator=g, dtype=f64), dim=1)
    v = torch.nn.functional.normalize(torch.randn(actions, dims - covered, generator=g, dtype=f64), dim=1)
    t = torch.rand(actions, 1, generator=g, dtype=f64) * (math.pi / 2)
    phi = torch.cat([u * t.cos(), v * t.sin()], 1)
    proxy = []
    for _ in range(members):
        b = torch.randint(n_train, (n_train,), generator=g)
        xb, yb = x_train[b], y_train[b]
        coef = torch.linalg.solve(xb.T @ xb + ridge * torch.eye(dims, dtype=f64), xb.T @ yb)
        proxy.append(phi @ coef)
    return phi @ w, torch.stack(proxy)


def train(gold, proxy, method: str, lam: float, *, steps=300, group=64, lr=0.05, seed=0):
    """Trains a softmax policy on the ensemble's (penalized) reward; returns the curve of
    (gold, proxy mean) expected under the policy, one point per step."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.zeros(gold.numel(), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=lr)
    proxy_mean, curve = proxy.mean(0), []
    for _ in range(steps):
        logp = torch.log_softmax(logits, 0)
        p = logp.exp().detach()
        curve.append((float(p @ gold), float(p @ proxy_mean)))
        a = torch.multinomial(p, group, replacement=True, generator=g)
        adv = rl.ensemble_advantages(proxy[:, a], group, method=method, lam=lam)
        lp = logp[a].unsqueeze(1)  # [group, 1]: one "token" per completion
        loss, _ = rl.policy_loss(lp, lp.detach(), adv, loss_type="grpo")
        opt.zero_grad()
        loss.backward()
        opt.step()
    p = torch.softmax(logits.detach(), 0)
    curve.append((float(p @ gold), float(p @ proxy_mean)))
    return curve


def run(seeds, steps=300):
    """{method: [curve per seed]}."""
    out = {m: [] for m in METHODS}
    for seed in seeds:
        gold, proxy = world(seed)
        for method, lam in METHODS.items():
            out[method].append(train(gold, proxy, method, lam, steps=steps, seed=seed))
    return out


def plot(curves, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for method, runs in curves.items():
        mean = torch.tensor(runs).mean(0)  # [steps + 1, 2]: (gold, proxy) per step
        label = method if not METHODS[method] else f"{method} (lam={METHODS[method]:g})"
        line, = ax.plot(mean[:, 0], label=f"{label}: gold")
        ax.plot(mean[:, 1], ls="--", color=line.get_color(), label=f"{label}: proxy")
    ax.set_xlabel("policy-gradient step")
    ax.set_ylabel("expected reward under the policy")
    ax.set_title(f"Gold vs proxy reward during training (mean of {len(runs)} worlds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--plot", default=None, help="write the gold-vs-proxy curve to this image")
    args = ap.parse_args(argv)
    curves = run(range(args.seeds), steps=args.steps)
    final = {m: {"gold": sum(c[-1][0] for c in runs) / len(runs), "proxy": sum(c[-1][1] for c in runs) / len(runs),
                 "gold_start": sum(c[0][0] for c in runs) / len(runs)} for m, runs in curves.items()}
    for m, r in final.items():
        print(f"{m:5s} gold {r['gold_start']:+.3f} -> {r['gold']:+.3f}   proxy -> {r['proxy']:+.3f}")
    if args.plot:
        plot(curves, args.plot)
    return final


if __name__ == "__main__":
    main()
