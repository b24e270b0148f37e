"""Reference preference losses in plain PyTorch, written from each paper's formula.

Each function's docstring cites the paper (authors, year, arXiv id) its formula comes from; where
TRL's trainers fix a choice the paper leaves open (length normalization, the f-divergence
constants, which losses take label smoothing), the choice is TRL's and is said so.

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
    """f-DPO score f'(u) at u = pi / pi_ref = exp(r), in TRL's convention (f'(1) = 0).

    Wang, Jiang, Yang, Liu, Chen 2023, "Beyond Reverse KL: Generalizing Direct Preference
    Optimization with Diverse Divergence Constraints", arXiv:2309.16240, Theorem 1: the DPO
    reward beta * log(pi / pi_ref) generalizes to beta * f'(pi / pi_ref). A generator f is defined
    up to a linear term c (u - 1), which leaves the divergence unchanged but shifts f' by c; TRL's
    DPOTrainer uses reverse KL f'(u) = log u, forward KL 1 - 1/u, Jensen-Shannon
    log(2u / (1 + u)) and alpha-divergence (u^(a-1) - 1) / (a - 1) (-> log u as a -> 1), all zero
    at u = 1. The constants cancel in s_c - s_r but not in the length-normalized
    s_c / L_c - s_r / L_r of ipo and sigmoid_norm, so they are part of the loss's definition.
    Exponents are clamped at CAP, as in the kernel.
    """
    if f_divergence == "reverse_kl":
        return r
    if f_divergence == "forward_kl":
        return 1 - torch.exp(torch.clamp(-r, max=CAP))
    if f_divergence == "js_divergence":
        # The direct form of the generator's derivative where exp(r) is safe, else log 2 + log sigmoid(r).
        if r.abs().max() < 30:
            u = torch.exp(r)
            return torch.log(2 * u / (1 + u))
        return math.log(2) + F.logsigmoid(r)
    if f_divergence == "alpha_divergence":
        if abs(f_alpha - 1) < 1e-6:
            return r
        return (torch.exp(torch.clamp((f_alpha - 1) * r, max=CAP)) - 1) / (f_alpha - 1)
    raise ValueError(f_divergence)


def _cdpo(z, eps):
    """Label-smoothed logistic loss: conservative DPO (cDPO; Mitchell 2023, "A note on DPO with
    noisy preferences & relationship to IPO", technical note, no arXiv id): the preference label is
    flipped with probability eps, -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)."""
    # A zero weight drops its term (0 * log sigmoid(-inf) is 0, not NaN: a certain preference).
    keep = -F.logsigmoid(z) if eps < 1 else torch.zeros_like(z)
    flip = -F.logsigmoid(-z) if eps > 0 else torch.zeros_like(z)
    return (1 - eps) * keep + eps * flip


def dpo_losses(pc, pr, rc=None, rr=None, *, loss_type="sigmoid", loss_weights=None, beta=0.1,
               label_smoothing=0.0, f_divergence="reverse_kl", f_alpha=0.5, chosen_lengths=None,
               rejected_lengths=None, discopop_tau=0.05, dtype=torch.float64):
    """Per-pair DPO-family losses; aot terms are attributed to the pair whose sorted X has that rank.

    The label smoothing ``label_smoothing`` applies to every type that has one (sigmoid: cDPO,
    robust, exo_pair, aot, aot_unpaired). Sources, one per loss type (r = policy - reference
    log-ratio, s = fdiv_score(r), delta = s_c - s_r):

    - sigmoid: DPO, Rafailov, Sharma, Mitchell, Ermon, Manning, Finn 2023, "Direct Preference
      Optimization: Your Language Model is Secretly a Reward Model", arXiv:2305.18290, eq. 7;
      with eps > 0 cDPO (see ``_cdpo``).
    - sigmoid_norm: DPO on per-token (length-normalized) scores, as TRL defines it; the length
      normalization is SimPO's (Meng, Xia, Chen 2024, arXiv:2405.14734) applied to the log-ratios.
    - hinge: SLiC, Zhao, Joshi, Liu, Khalman, Saleh, Liu 2023, "SLiC-HF: Sequence Likelihood
      Calibration with Human Feedback", arXiv:2305.10425 (the rank-calibration hinge loss, on the
      log-ratio as in RSO, Liu et al. 2023, arXiv:2309.06657).
    - ipo: IPO, Azar, Rowland, Piot, Guo, Calandriello, Valko, Munos 2023, "A General Theoretical
      Paradigm to Understand Learning from Human Preferences", arXiv:2310.12036, eq. 17, with
      tau = beta, on per-token average scores as TRL (confirmed with the authors, per TRL).
    - exo_pair: EXO, Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model
      Alignment", arXiv:2402.00856, eq. 16 with K = 2: KL(softmax(beta delta) || (1 - eps, eps)).
    - nca_pair: NCA, Chen, He, Yuan, Cui, Su, Zhu 2024, "Noise Contrastive Alignment of Language
      Models with Explicit Rewards", arXiv:2402.05369 (pairwise form).
    - robust: rDPO, Chowdhury, Kini, Natarajan 2024, "Provably Robust DPO: Aligning Language Models
      with Noisy Feedback", arXiv:2403.00409, eq. 8 (unbiased loss under flip rate eps).
    - bco_pair: BCO, Jung, Han, Nam, On 2024, "Binary Classifier Optimization for Large Language
      Model Alignment", arXiv:2404.04656 (paired form, without the reward shift).
    - sppo_hard: SPPO, Wu, Sun, Yuan, Ji, Yang, Gu 2024, "Self-Play Preference Optimization for
      Language Model Alignment", arXiv:2405.00675, eq. 4.7 with the hard probabilities P = 1 / 0.
    - aot, aot_unpaired: AOT, Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via
      Optimal Transport", arXiv:2406.05882: the smoothed logistic loss between the k-th smallest
      values of two sorted batch sequences (paired: policy vs reference margins; unpaired: chosen
      vs rejected log-ratios).
    - apo_zero, apo_down: APO, D'Oosterlinck, Xu, Develder, Demeester, Singh, Potts, Kiela, Mehri
      2024, "Anchored Preference Optimization and Contrastive Revisions", arXiv:2408.06266, eqs. 7-8.
    - discopop: DiscoPOP (log-ratio modulated loss), Lu, Holt, Fanconi, Chan, Foerster,
      van der Schaar, Lange 2024, "Discovering Preference Optimization Algorithms with and for
      Large Language Models", arXiv:2406.08414, eq. 5.
    - sft: the chosen response's NLL per token: RPO, Pang, Yuan, Cho, He, Sukhbaatar, Weston 2024,
      "Iterative Reasoning Preference Optimization", arXiv:2404.19733 (the NLL term of its loss);
      MPO (Wang et al. 2024, arXiv:2411.10442) mixes it with sigmoid and bco_pair.
    - f-divergences: see ``fdiv_score``.
    """
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
    """KTO per element, in the input order: Ethayarajh, Xu, Muennighoff, Jurafsky, Kiela 2024,
    "KTO: Model Alignment as Prospect Theoretic Optimization", arXiv:2402.01306, eq. 8, with the
    reference point z0 = max(0, batch-mean KL estimate), detached. ``apo_zero_unpaired``: APO's
    eq. 7 (arXiv:2408.06266) on unpaired examples."""
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
    """BCO per element; returns (losses, new_mean). Jung, Han, Nam, On 2024, "Binary Classifier
    Optimization for Large Language Model Alignment", arXiv:2404.04656, eq. 9: a logistic
    classifier on the reward beta * r shifted by delta, the running mean of batch-mean rewards."""
    rewards = beta * (policy.to(dtype) - ref.to(dtype))
    batch = rewards.detach().mean()
    delta = running_mean + (batch - running_mean) / (running_count + 1)
    d = desirable.bool()
    l = torch.where(d, -F.logsigmoid(rewards - delta), -F.logsigmoid(-(rewards - delta)))
    return l, delta


def orpo_losses(pc, pr, lc, lr, *, beta=0.1, dtype=torch.float64):
    """ORPO on per-token mean log-probs: Hong, Lee, Thorne 2024, "ORPO: Monolithic Preference
    Optimization without Reference Model", arXiv:2403.07691, eqs. 6-7 (NLL plus lambda times
    -log sigmoid of the log odds ratio; lambda is ``beta``)."""
    mc = pc.to(dtype) / lc.to(dtype).clamp(min=1)
    mr = pr.to(dtype) / lr.to(dtype).clamp(min=1)
    log_odds = (mc - mr) - (torch.log(-torch.expm1(mc)) - torch.log(-torch.expm1(mr)))
    return -mc - beta * F.logsigmoid(log_odds), log_odds


def cpo_losses(pc, pr, *, loss_type="sigmoid", beta=0.1, label_smoothing=0.0, gamma=0.5, alpha=0.0,
               cpo_alpha=1.0, lc=None, lr=None, dtype=torch.float64):
    """CPO / SimPO / AlphaPO per pair; returns (losses, chosen_reward, rejected_reward).

    - CPO: Xu, Sharaf, Chen, Tan, Shen, Van Durme, Murray, Kim 2024, "Contrastive Preference
      Optimization: Pushing the Boundaries of LLM Performance in Machine Translation",
      arXiv:2401.08417: the reference-free DPO loss on summed log-probs plus ``cpo_alpha`` times
      the chosen NLL (its eq. 3-4).
    - SimPO: Meng, Xia, Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free
      Reward", arXiv:2405.14734, eq. 6: -log sigmoid(beta (m_c - m_r) - gamma) on per-token means.
    - AlphaPO: Gupta et al. 2025, "AlphaPO: Reward Shape Matters for LLM Alignment",
      arXiv:2501.03884: each score l becomes the reward (1 - exp(-alpha l)) / alpha.
    - hinge / ipo as in the DPO family (SLiC arXiv:2305.10425, IPO arXiv:2310.12036).
    """
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
    """Bradley-Terry reward-model loss with margin and centering.

    Bradley, Terry 1952, "Rank Analysis of Incomplete Block Designs: I. The Method of Paired
    Comparisons", Biometrika 39; as a reward-model loss: Ouyang et al. 2022, "Training language
    models to follow instructions with human feedback", arXiv:2203.02155, eq. 1. The margin:
    Touvron et al. 2023, "Llama 2: Open Foundation and Fine-Tuned Chat Models",
    arXiv:2307.09288, eq. 2. Centering (+ c (r_c + r_r)^2): Eisenstein et al. 2023, "Helping or
    Herding? Reward Model Ensembles Mitigate but do not Eliminate Reward Hacking",
    arXiv:2312.09244.
    """
    rc, rr = rc.to(dtype), rr.to(dtype)
    m = 0 if margin is None else margin.to(dtype)
    return -F.logsigmoid(rc - rr - m) + center * (rc + rr) ** 2
