"""DPO on a tiny causal LM with pyalign's fused linear loss and ensemble-uncertainty pair weights.

Task: after a 3-token prompt the policy should answer with tokens of the same parity as the
prompt's last token (preferred) rather than of the other parity (rejected), so it must read the
prompt. 25% of the training pairs are mislabeled. A reward ensemble (5 linear
Bradley-Terry models on bootstrap samples) scores each pair; pairs the members disagree on get
smaller loss weights (``pyalign.uncertainty.uncertainty_weights``). The policy's log-probs come
from the fused linear head (the [B, T, V] logits are never held) inside
``pyalign.losses.fused_linear_dpo_loss``.

Run: ``python examples/dpo_tiny.py`` (about 30 s on a 2-core CPU). It prints the loss, the implicit
reward margin and the held-out preference accuracy as it learns.
"""
from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

import pyalign
from pyalign.losses import fused_linear_dpo_loss
from pyalign.uncertainty import preference_uncertainty, uncertainty_weights

V, PROMPT, RESPONSE = 24, 3, 5


class TinyLM(nn.Module):
    """Embedding -> GRU -> LM head: a causal language model small enough for a CPU example."""

    def __init__(self, vocab=V, dim=48):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.rnn = nn.GRU(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, vocab, bias=False)

    def hidden(self, ids):
        return self.rnn(self.embed(ids))[0]


def make_pairs(n, gen, noise=0.0):
    """Prompt + response of the prompt's parity (chosen), same prompt + the other parity (rejected)."""
    prompt = torch.randint(0, V, (n, PROMPT), generator=gen)
    parity = prompt[:, -1:] % 2
    base = 2 * torch.randint(0, V // 2, (n, RESPONSE), generator=gen)
    chosen = torch.cat([prompt, base + parity], 1)
    rejected = torch.cat([prompt, base + 1 - parity], 1)
    flip = torch.rand(n, generator=gen) < noise
    chosen[flip], rejected[flip] = rejected[flip].clone(), chosen[flip].clone()
    return chosen, rejected, flip


def labels_of(ids):
    lab = ids.clone()
    lab[:, :PROMPT] = -100  # only the response is scored
    return lab


def features(ids):
    """Bag of response tokens, signed by the parity of the prompt's last token: what the reward
    models see (a linear model on it can express "same parity as the prompt")."""
    sign = 1.0 - 2.0 * (ids[:, PROMPT - 1:PROMPT] % 2).float()
    return torch.nn.functional.one_hot(ids[:, PROMPT:], V).float().mean(1) * sign


def train_reward_ensemble(chosen, rejected, members=5, steps=200, gen=None):
    """Bradley-Terry linear reward models, each on its own bootstrap sample of the pairs."""
    fc, fr = features(chosen), features(rejected)
    heads = []
    for _ in range(members):
        idx = torch.randint(0, len(fc), (len(fc),), generator=gen)
        w = torch.zeros(V, requires_grad=True)
        opt = torch.optim.Adam([w], lr=0.1)
        for _ in range(steps):
            loss = -torch.nn.functional.logsigmoid((fc[idx] - fr[idx]) @ w).mean() + 1e-3 * w.square().sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        heads.append(w.detach())
    W = torch.stack(heads)  # [M, V]
    return lambda ids: features(ids) @ W.T  # [N, M]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--pairs", type=int, default=64, help="pairs per batch")
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    policy = TinyLM()
    reference = copy.deepcopy(policy).requires_grad_(False)
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)

    # Reward ensemble from a separate, equally noisy preference set.
    rc, rr, _ = make_pairs(512, gen, noise=0.25)
    reward = train_reward_ensemble(rc, rr, gen=gen)
    test_c, test_r, _ = make_pairs(256, gen)

    def held_out_accuracy():
        with torch.no_grad():
            ids = torch.cat([test_c, test_r])
            lab = labels_of(ids)
            pol, _ = pyalign.linear_sequence_logprobs(policy.hidden(ids), policy.head.weight, lab, shift=True)
            ref, _ = pyalign.linear_sequence_logprobs(reference.hidden(ids), reference.head.weight, lab, shift=True)
            margin = (pol - ref).chunk(2)
            wins = (margin[0] > margin[1]).float() + 0.5 * (margin[0] == margin[1]).float()  # ties count half
            return float(wins.mean())

    before = held_out_accuracy()
    print(f"pyalign {pyalign.__version__}; held-out accuracy before training: {before:.2f}")
    for step in range(1, args.steps + 1):
        chosen, rejected, _ = make_pairs(args.pairs, gen, noise=0.25)
        ids = torch.cat([chosen, rejected])
        lab = labels_of(ids)
        r = reward(ids).T  # [M, 2N]
        r_c, r_r = r.chunk(2, dim=1)
        weights = uncertainty_weights(r_c, r_r)
        with torch.no_grad():
            ref_hidden = reference.hidden(ids)
        loss, metrics = fused_linear_dpo_loss(
            policy.hidden(ids), policy.head.weight, lab, ref_hidden=ref_hidden, ref_weight=reference.head.weight,
            loss_type="sigmoid", beta=args.beta, weights=weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == 1:
            mi = preference_uncertainty(r_c, r_r).epistemic
            print(f"step {step:4d}  loss {float(loss.detach()):.4f}  margin {float(metrics['rewards/margins'].mean()):+.3f}  "
                  f"train acc {float(metrics['rewards/accuracies'].mean()):.2f}  "
                  f"pair weights {float(weights.min()):.2f}..{float(weights.max()):.2f}  "
                  f"ensemble MI {float(mi.mean()):.4f}  "
                  f"held-out acc {held_out_accuracy():.2f}")
    acc = held_out_accuracy()
    print(f"final held-out preference accuracy: {acc:.2f} (before training {before:.2f}, chance 0.50)")
    return {"before": before, "after": acc}


if __name__ == "__main__":
    main()
