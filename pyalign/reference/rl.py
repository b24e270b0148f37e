"""Plain-PyTorch oracles of the online-RL family (pyalign.rl): the policy-gradient losses as TRL 1.16's
``GRPOTrainer._compute_loss`` and verl's ``core_algos`` define them, KL estimators, group advantages and
the clipped value loss. Evaluated in the dtype of their inputs (tests pass float64)."""
from __future__ import annotations

import math

import torch

LOG_RATIO_CLAMP = 20.0  # verl's clamp of log(pi / pi_old) (and of the k3 log-ratio)
K3_CLAMP = 10.0         # verl's clamp of the k3 value


def kl_estimate(logps, ref_logps, estimator="k3"):
    """Per-token KL(pi || ref) estimates (Schulman 2020), verl's forms: ``k1`` log r, ``abs`` |log r|,
    ``k2`` (log r)^2 / 2, ``k3`` exp(-log r) + log r - 1 (log r clamped to [-20, 20], the value to
    [-10, 10]); a trailing ``+`` keeps the value with the gradient of ``k2`` (straight-through)."""
    base = estimator[:-1] if estimator.endswith("+") else estimator
    d = logps - ref_logps
    if base == "k1":
        value = d
    elif base == "abs":
        value = d.abs()
    elif base == "k2":
        value = 0.5 * d * d
    elif base == "k3":
        kl = (-d).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        value = (kl.exp() - kl - 1).clamp(-K3_CLAMP, K3_CLAMP)
    else:
        raise ValueError(estimator)
    if estimator.endswith("+") and base != "k2":
        k2 = 0.5 * d * d
        value = k2 - k2.detach() + value.detach()
    return value


def _masked_mean(x, mask):
    if x.shape[-1] == 1 and mask.shape[-1] != 1:  # one value per sequence
        return x.sum() / max(x.shape[0], 1)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def agg_loss(loss_mat, mask, mode, horizon=None):
    """verl's ``agg_loss`` (single process)."""
    if mode == "token-mean":
        return (loss_mat * mask).sum() / mask.sum()
    if mode == "token-sum":
        return (loss_mat * mask).sum()
    seq_tokens = mask.sum(-1)
    seq_mask = (seq_tokens > 0).to(loss_mat.dtype)
    if mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        loss = ((loss_mat * mask).sum(-1) * seq_mask).sum() / seq_mask.sum()
        if mode == "seq-mean-token-sum-norm":
            loss = loss / (horizon if horizon is not None else mask.shape[-1])
        return loss
    if mode == "seq-mean-token-mean":
        return (((loss_mat * mask).sum(-1) / (seq_tokens + 1e-8)) * seq_mask).sum() / seq_mask.sum()
    raise ValueError(mode)


def sampling_ratio(old_logps, sampling_logps, mask, mode, clip_max=3.0, clip_min=None):
    """TRL's importance-sampling correction for rollouts from another engine: ``exp(old - sampling)``
    per token (``token_*``) or per sequence (``sequence_*``), truncated or masked to [clip_min, clip_max]."""
    diff = torch.nan_to_num((old_logps - sampling_logps) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = diff.exp()
    if mode.endswith("truncate"):
        return ratio.clamp(min=clip_min, max=clip_max)
    lo = -math.inf if clip_min is None else clip_min
    hi = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)


def vespo_weights(advantages, log_ratio, mask, is_ratio, k_pos, lambda_pos, k_neg, lambda_neg):
    """TRL's ``get_gamma_weights`` (detached): phi(w) = exp(lambda + k log w - lambda w) per sequence."""
    lower = math.log(1e-8)
    seq = (log_ratio.clamp(-20.0, 20.0) * mask).sum(-1, keepdim=True)
    if is_ratio is not None:
        seq = seq + is_ratio.log().clamp(lower, 20.0).sum(-1, keepdim=True)
    log_w = seq.clamp(lower, 20.0)
    pos = advantages >= 0
    k = torch.where(pos, torch.full_like(log_w, k_pos), torch.full_like(log_w, k_neg))
    lam = torch.where(pos, torch.full_like(log_w, lambda_pos), torch.full_like(log_w, lambda_neg)).clamp(min=1e-4)
    phi = (lam + k * log_w - lam * log_w.exp()).exp()
    return torch.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0).detach()


def policy_loss(logps, old_logps, advantages, mask=None, *, loss_type="dapo", epsilon=0.2, epsilon_high=None,
                delta=None, dual_clip=None, importance_sampling_level="token", ref_logps=None, beta=0.0,
                kl_estimator="k3", use_bias_correction_kl=False, entropy=None, entropy_coef=0.0,
                top_entropy_quantile=1.0, sampling_logps=None, importance_sampling_mode=None,
                importance_sampling_clip_max=3.0, importance_sampling_clip_min=None, off_policy_mask_threshold=None,
                max_completion_length=None, num_items_in_batch=None, loss_agg_mode=None, sapo_temperature_pos=1.0,
                sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0,
                vespo_lambda_neg=2.0):
    """The loss and TRL's metrics (python floats); differentiable w.r.t. ``logps`` and ``entropy``."""
    if mask is None:
        mask = torch.ones_like(logps)
    mask = mask.to(logps.dtype)
    adv = advantages.to(logps.dtype)
    if adv.dim() == 1:
        adv = adv.unsqueeze(1)
    eps_low, eps_high = epsilon, epsilon if epsilon_high is None else epsilon_high
    old = old_logps.to(logps.dtype)
    log_ratio = (logps - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if importance_sampling_level == "sequence":
        log_iw = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    else:
        log_iw = log_ratio
    coef_1 = log_iw.exp()
    metrics = {}
    entropy_mask = None
    if top_entropy_quantile < 1.0:
        valid = entropy.detach()[mask.bool()].float()  # TRL takes the quantile in fp32
        if valid.numel() == 0:
            entropy_mask = torch.zeros_like(mask)
        else:
            thr = torch.quantile(valid, 1 - top_entropy_quantile).to(logps.dtype)
            entropy_mask = ((entropy.detach() * mask >= thr) & mask.bool()).to(logps.dtype)
    is_ratio = None
    if importance_sampling_mode is not None:
        is_ratio = sampling_ratio(old, sampling_logps.to(logps.dtype), mask, importance_sampling_mode,
                                  importance_sampling_clip_max, importance_sampling_clip_min)
        metrics["sampling/importance_sampling_ratio/mean"] = float(_masked_mean(is_ratio, mask))
    kl = None
    if beta != 0.0:
        kl = kl_estimate(logps, ref_logps.to(logps.dtype), kl_estimator)
        if use_bias_correction_kl:
            kl = kl * coef_1
    if loss_type == "cispo":
        ptl = -coef_1.clamp(max=eps_high).detach() * adv * logps
    elif loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "ppo"):
        coef_2 = coef_1.clamp(1 - eps_low, 1 + eps_high)
        c1 = coef_1.clamp(max=delta) if delta is not None else coef_1
        ptl = -torch.min(c1 * adv, coef_2 * adv)
        if loss_type == "ppo" and dual_clip is not None:
            ptl = torch.where(adv < 0, torch.min(-adv * dual_clip, ptl), ptl)
    elif loss_type == "sapo":
        temps = torch.where(adv > 0, torch.full_like(adv, sapo_temperature_pos), torch.full_like(adv, sapo_temperature_neg))
        ptl = -torch.sigmoid(temps * (coef_1 - 1)) * 4 / temps * adv
    elif loss_type == "vespo":
        phi = vespo_weights(adv, logps.detach() - old, mask, is_ratio, vespo_k_pos, vespo_lambda_pos,
                            vespo_k_neg, vespo_lambda_neg)
        ptl = -phi * adv * logps
        metrics["vespo/phi_seq_mean"] = float(_masked_mean(phi, mask))
    else:
        raise ValueError(loss_type)
    if off_policy_mask_threshold is not None:
        samp = old if sampling_logps is None else sampling_logps.to(logps.dtype)
        d = torch.nan_to_num(samp - logps.detach(), nan=0.0)
        seq_kl = (d * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1.0)
        ptl = ptl * ((adv >= 0) | (seq_kl <= off_policy_mask_threshold)).to(logps.dtype)
    if entropy_mask is not None:
        ptl = ptl * entropy_mask
    if is_ratio is not None and loss_type != "vespo":
        ptl = ptl * is_ratio
    if kl is not None:
        ptl = ptl + beta * kl
    B, T = mask.shape
    if loss_agg_mode is not None:
        loss = agg_loss(ptl.expand_as(mask), mask, loss_agg_mode, max_completion_length)
    elif loss_type in ("grpo", "sapo"):
        loss = ((ptl * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type in ("bnpo", "ppo"):
        loss = (ptl * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (ptl * mask).sum() / (B * (max_completion_length if max_completion_length is not None else T))
    elif loss_type in ("cispo", "dapo", "vespo"):
        n = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=logps.dtype)
        loss = (ptl * mask).sum() / n.clamp(min=1.0)
    else:  # luspo
        loss = (ptl * mask).sum(-1).mean()
    if entropy_coef != 0.0:
        eff = mask if entropy_mask is None else mask * entropy_mask
        loss = loss - entropy_coef * (entropy * eff).sum() / eff.sum().clamp(min=1.0)
    if kl is not None:
        metrics["kl"] = float(_masked_mean(kl.detach(), mask))
    if entropy is not None:
        metrics["entropy"] = float(_masked_mean(entropy.detach(), mask))
    c = coef_1.detach()
    if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "ppo"):
        if delta is not None:  # TRL forms the clip flags from the delta-clamped ratio
            c = c.clamp(max=delta)
        low = ((c < 1 - eps_low) & (adv < 0)).to(logps.dtype)
        high = ((c > 1 + eps_high) & (adv > 0)).to(logps.dtype)
        metrics["clip_ratio/low_mean"] = float(_masked_mean(low, mask))
        metrics["clip_ratio/high_mean"] = float(_masked_mean(high, mask))
        metrics["clip_ratio/region_mean"] = float(_masked_mean(torch.max(low, high), mask))
    elif loss_type == "cispo":
        metrics["cispo_clip_ratio"] = float(_masked_mean(((c > eps_high) & (adv > 0)).to(logps.dtype), mask))
    return loss, metrics


def group_advantages(rewards, group_size, *, scale_rewards="group", reward_weights=None,
                     multi_objective_aggregation="sum_then_normalize", estimator="grpo"):
    """GRPO's advantages as TRL 1.16 computes them (rewards [N] or [K, N]; NaN: unscorable), RLOO's
    leave-one-out baseline and REINFORCE++'s batch normalization."""
    r = rewards if rewards.dim() == 2 else rewards.unsqueeze(0)
    K, N = r.shape
    w = torch.ones(K, dtype=r.dtype) if reward_weights is None else torch.as_tensor(reward_weights, dtype=r.dtype)
    per = r.t()  # [N, K] as TRL's rewards_per_func
    unscorable = torch.isnan(per).all(dim=1)

    def nanstd(x, dim=None):  # TRL's: unbiased, over the non-NaN entries
        mean = torch.nanmean(x, dim=dim, keepdim=True)
        cnt = (~torch.isnan(x)).sum(dim=dim, keepdim=True) if dim is not None else (~torch.isnan(x)).sum()
        var = torch.nansum((x - mean) ** 2, dim=dim, keepdim=True) / (cnt - 1)
        return var.sqrt() if dim is not None else var.sqrt().reshape(())

    if estimator == "grpo" and multi_objective_aggregation == "normalize_then_sum":
        grouped = per.view(-1, group_size, K)
        mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
        std_k = nanstd(grouped, 1) if group_size > 1 else torch.zeros_like(mean_k)
        total = (((grouped - mean_k) / (std_k + 1e-4)).view(-1, K) * w).nansum(dim=1)
        total[unscorable] = torch.nan
        std = nanstd(total) if total.numel() > 1 else torch.zeros(())
        return torch.nan_to_num((total - torch.nanmean(total)) / (std + 1e-4), nan=0.0)
    total = (per * w).nansum(dim=1)
    total[unscorable] = torch.nan
    g = total.view(-1, group_size)
    if estimator == "rloo":
        valid = ~torch.isnan(g)
        cnt = valid.sum(1, keepdim=True)
        s = torch.nansum(g, 1, keepdim=True)
        base = (s - torch.nan_to_num(g)) / (cnt - 1).clamp(min=1)
        return torch.nan_to_num((g - base).view(-1), nan=0.0)
    if estimator == "reinforce_pp":
        mean = torch.nanmean(g, 1, keepdim=True)
        a = (g - mean).view(-1)
        std = nanstd(a) if a.numel() > 1 else torch.zeros(())
        return torch.nan_to_num((a - torch.nanmean(a)) / (std + 1e-8), nan=0.0)
    mean = torch.nanmean(g, 1, keepdim=True).expand_as(g).reshape(-1)
    if scale_rewards == "batch":
        std = (nanstd(total) if total.numel() > 1 else torch.zeros(())).expand_as(total)
    else:
        std = (nanstd(g, 1).expand_as(g).reshape(-1) if group_size > 1 else torch.zeros_like(total))
    adv = total - mean
    if scale_rewards != "none":
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0)


def value_loss(values, old_values, returns, mask, *, cliprange_value=None, loss_agg_mode="token-mean"):
    """PPO's clipped value loss (verl's ``compute_value_loss``), and the clip fraction."""
    v = values
    if cliprange_value is not None:
        clipped = torch.max(torch.min(v, old_values + cliprange_value), old_values - cliprange_value)
    else:
        clipped = v
    l1, l2 = (v - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * agg_loss(torch.max(l1, l2), mask.to(v.dtype), loss_agg_mode)
    return loss, float(_masked_mean((l2 > l1).to(v.dtype), mask.to(v.dtype)))
