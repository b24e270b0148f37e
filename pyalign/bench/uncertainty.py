"""Bench of the uncertainty family: ``run(device, quick) -> list[dict]``.

token_uncertainty (M members, tokens, V) against the eager softmax-based computation a user
would write (log_softmax, exp, mean over members, entropies: it materializes several
``[M, tokens, V]`` tensors), forward and forward+backward of the ensemble log-prob; the reward
reductions against eager torch (mean/var/amin/amax/quantile over M).

Timed interleaved and measured for peak memory by :func:`pyalign.bench.common.compare`.
Run: ``python -m pyalign.bench.uncertainty [--quick] [--device cpu|cuda]``.
"""
from __future__ import annotations

import argparse
import math

import torch

from pyalign import uncertainty as U
from pyalign.bench.common import compare


def eager_token_uncertainty(logits, labels, temperature=1.0):
    """The eager softmax-based computation (fp32), as a user would write it."""
    m = logits.shape[0]
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    p = logp.exp()
    expected = -(p * logp).sum(-1).mean(0)
    pbar = p.mean(0)
    total = -torch.xlogy(pbar, pbar).sum(-1)
    mi = total - expected
    mlp = logp.gather(-1, labels.unsqueeze(0).unsqueeze(-1).expand(m, *labels.shape, 1)).squeeze(-1)
    ens = torch.logsumexp(mlp, 0) - math.log(m)
    return total, expected, mi, ens, mlp.exp().var(0, unbiased=False)


def run(device: str, quick: bool) -> list[dict]:
    torch.manual_seed(0)
    out = []
    m, t, v = (5, 128, 32000) if quick else (5, 2048, 32000)
    size = f"M={m} tokens={t} V={v} fp32"
    x = torch.randn(m, t, v, device=device)
    lab = torch.randint(0, v, (t,), device=device)
    fused = lambda: U.token_uncertainty(x, lab)
    eager = lambda: eager_token_uncertainty(x, lab)
    out += compare("uncertainty", "token_uncertainty", size, [("pyalign", fused), ("eager", eager)], device)

    # Forward + backward of the ensemble log-prob (the trainable output).
    tb = t if quick else 512
    xb = x[:, :tb].detach().clone().requires_grad_()
    labb = lab[:tb]

    # torch.autograd.grad returns a fresh gradient each call (no accumulation into .grad).
    fused_bwd = lambda: torch.autograd.grad(U.token_uncertainty(xb, labb).logprobs.sum(), xb)[0]
    eager_bwd = lambda: torch.autograd.grad(eager_token_uncertainty(xb, labb)[3].sum(), xb)[0]

    size_b = f"M={m} tokens={tb} V={v} fp32"
    out += compare("uncertainty", "token_uncertainty_fwd_bwd", size_b, [("pyalign", fused_bwd), ("eager", eager_bwd)],
                   device)
    del x, xb

    # Reward reductions.
    mr, n = (8, 100_000) if quick else (8, 1_000_000)
    r = torch.randn(mr, n, device=device)
    size_r = f"M={mr} N={n} fp32"
    fused_r = lambda: U.aggregate_rewards(r, method="quantile", q=0.1)
    eager_r = lambda: (r.mean(0), r.var(0, unbiased=False), r.amin(0), r.amax(0), torch.quantile(r, 0.1, dim=0))
    out += compare("uncertainty", "aggregate_rewards_quantile", size_r, [("pyalign", fused_r), ("eager", eager_r)], device)
    fused_u = lambda: U.aggregate_rewards(r, method="uwo", lam=0.5)
    eager_u = lambda: (lambda mu, var: (mu - 0.5 * var, mu, var, var.sqrt(), r.amin(0), r.amax(0)))(r.mean(0), r.var(0, unbiased=False))
    out += compare("uncertainty", "aggregate_rewards_uwo", size_r, [("pyalign", fused_u), ("eager", eager_u)], device)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    rows = run(args.device, args.quick)
    for r in rows:
        ratio = f"{r['speedup']:6.2f}x" if r["speedup"] is not None else "      "
        mem = "n/a" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.1f}"
        print(f"{r['op']:28s} {r['size']:30s} {r['impl']:8s} {r['median_ms']:10.2f} ms {ratio} peak {mem} MiB")

if __name__ == "__main__":
    main()
