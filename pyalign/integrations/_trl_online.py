"""TRL's online-RL trainers with pyalign's policy loss: the ``_compute_loss`` that
:func:`pyalign.integrations.trl.patch_trainer` installs on a ``GRPOTrainer`` or an ``RLOOTrainer``.

Both keep TRL's own forward (``_get_per_token_logps_and_entropies``, through pyalign's fused head once
patched) and replace the ~20 elementwise ops of the loss and its metrics by one call of
:func:`pyalign.rl.policy_loss`, with TRL's normalizations for gradient accumulation, its entropy bonus,
its auxiliary router loss and its metrics under the same names, reduced across processes as TRL reduces
them. What pyalign does not cover goes to TRL's own method (:func:`grpo_fallback_reason`).
"""
from __future__ import annotations

import torch

from pyalign import rl

__all__ = ["grpo_compute_loss", "rloo_compute_loss", "grpo_fallback_reason"]

_MODEL_INPUTS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                 "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def _forward(self, model, inputs):
    """TRL's own forward over prompt + completion: per-token log-probs, entropies, auxiliary loss."""
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    return self._get_per_token_logps_and_entropies(
        model, input_ids, attention_mask, inputs["completion_ids"].size(1), compute_entropy=True,
        compute_aux_loss=self.aux_loss_enabled, **{k: inputs.get(k) for k in _MODEL_INPUTS})


def grpo_fallback_reason(trainer):
    """Why this GRPO configuration runs TRL's own loss instead (None: pyalign computes it). Besides
    these, a step whose ``num_items_in_batch`` normalizer is below 1 (cispo, dapo, vespo) runs TRL's."""
    if trainer.loss_type not in rl.LOSS_TYPES:
        return f"loss_type {trainer.loss_type!r}"
    if getattr(trainer, "use_vllm", False) and getattr(trainer, "vllm_importance_sampling_correction", False):
        return "vLLM importance-sampling correction (TRL's precomputed importance_sampling_ratio)"
    if getattr(trainer, "use_adaptive_entropy", False):
        return "adaptive entropy control (use_adaptive_entropy)"
    return None


def _mode(self):
    return "train" if self.model.training else "eval"


def _dapo_normalizer(self, inputs):
    # TRL: num_items_in_batch spans the generation batch; rescaled to one accumulation window
    normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
    if _mode(self) == "train":
        normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
    return normalizer


def _global_mean(self, mean, count):
    """TRL's global masked mean from a local mean over ``count`` items (exact on one process)."""
    if self.accelerator.num_processes == 1:
        return float(mean)
    totals = self.accelerator.reduce(torch.stack([mean * count, count.to(mean.dtype)]), reduction="sum")
    return (totals[0] / totals[1].clamp(min=1.0)).item()


def _global_extreme(self, value, fn):
    return float(value) if self.accelerator.num_processes == 1 else fn(self.accelerator.gather(value.reshape(1))).item()


def grpo_compute_loss(self, model, inputs):
    """``GRPOTrainer._compute_loss`` with :func:`pyalign.rl.policy_loss` (TRL 1.16's semantics)."""
    normalizer = float(_dapo_normalizer(self, inputs)) if self.loss_type in ("cispo", "dapo", "vespo") else 1.0
    if grpo_fallback_reason(self) is not None or normalizer < 1:  # the kernel clamps the normalizer at 1
        return self._pyalign_original_compute_loss(model, inputs)
    from trl.trainer.utils import nanmax, nanmin

    logps, entropies, aux_loss = _forward(self, model, inputs)
    mask = inputs["completion_mask"]
    if "tool_mask" in inputs:
        mask = mask * inputs["tool_mask"]
    mode = _mode(self)
    accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
    old = inputs.get("old_per_token_logps")
    old = logps.detach() if old is None else old
    coef = self.entropy_coef if self._entropy_bonus_enabled else 0.0
    opsm = self.off_policy_mask_threshold
    options = dict(
        loss_type=self.loss_type, epsilon=self.epsilon_low, epsilon_high=self.epsilon_high, delta=self.args.delta,
        importance_sampling_level=self.importance_sampling_level, beta=self.beta,
        ref_logps=inputs["ref_per_token_logps"] if self.beta != 0 else None,
        use_bias_correction_kl=bool(self.args.use_bias_correction_kl), entropy=entropies,
        top_entropy_quantile=self.top_entropy_quantile, off_policy_mask_threshold=opsm,
        sampling_logps=inputs.get("sampling_per_token_logps") if opsm is not None else None,
        max_completion_length=self.max_completion_length,
        sapo_temperature_pos=self.args.sapo_temperature_pos, sapo_temperature_neg=self.args.sapo_temperature_neg,
        vespo_k_pos=self.args.vespo_k_pos, vespo_lambda_pos=self.args.vespo_lambda_pos,
        vespo_k_neg=self.args.vespo_k_neg, vespo_lambda_neg=self.args.vespo_lambda_neg)
    if self.loss_type in ("cispo", "dapo", "vespo"):
        # the policy part is normalized by TRL's normalizer; the bonus only by the accumulation
        loss, metrics = rl.policy_loss(logps, old, inputs["advantages"], mask, entropy_coef=coef / accumulation,
                                       num_items_in_batch=normalizer, **options)
    else:
        loss, metrics = rl.policy_loss(logps, old, inputs["advantages"], mask, entropy_coef=coef, **options)
        loss = loss / accumulation
    m = self._metrics[mode]
    if self._entropy_bonus_enabled:
        m["policy_loss"].append(self.accelerator.gather(metrics["policy_loss"]).nanmean().item())
        if mode == "train" and self.accelerator.sync_gradients:
            m["entropy_coef"].append(self.entropy_coef)
    if self.aux_loss_enabled:
        loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
        m["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
    tokens = metrics["num_tokens"]
    # TRL's flags are one per sequence with a sequence-level ratio and one advantage per sequence
    per_seq = self.importance_sampling_level == "sequence" and inputs["advantages"].dim() == 1
    flags = torch.tensor(float(logps.shape[0]), device=tokens.device, dtype=tokens.dtype) if per_seq else tokens
    if self.beta != 0.0:
        m["kl"].append(_global_mean(self, metrics["kl"], tokens))
    m["entropy"].append(_global_mean(self, metrics["entropy"], tokens))
    if self.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        for name in ("low_mean", "high_mean", "region_mean"):
            m[f"clip_ratio/{name}"].append(_global_mean(self, metrics[f"clip_ratio/{name}"], flags))
        m["clip_ratio/low_min"].append(_global_extreme(self, metrics["clip_ratio/low_min"], nanmin))
        m["clip_ratio/high_max"].append(_global_extreme(self, metrics["clip_ratio/high_max"], nanmax))
    elif self.loss_type == "cispo":
        m["cispo_clip_ratio"].append(_global_mean(self, metrics["cispo_clip_ratio"], flags))
    elif self.loss_type == "vespo":
        seqs = torch.tensor(float(logps.shape[0]), device=tokens.device, dtype=tokens.dtype)
        m["vespo/phi_seq_mean"].append(_global_mean(self, metrics["vespo/phi_seq_mean"],
                                                    tokens if inputs["advantages"].dim() == 2 else seqs))
    return loss


def rloo_compute_loss(self, model, inputs):
    """``RLOOTrainer._compute_loss`` with :func:`pyalign.rl.policy_loss`: RLOO's clipped surrogate of the
    sequence ratio ``exp(sum log-ratio)``, averaged over sequences, is the ``bnpo`` loss of one "token" per
    sequence (TRL 1.16's semantics; pyalign clamps |sum log-ratio| at 20, where TRL's ratio overflows)."""
    from trl.trainer.utils import nanmax, nanmin

    logps, entropies, aux_loss = _forward(self, model, inputs)
    completion_mask = inputs["completion_mask"]
    seq_logps = (logps * completion_mask).sum(1, keepdim=True)
    loss, metrics = rl.policy_loss(seq_logps, inputs["old_logps"].unsqueeze(1), inputs["advantages"],
                                   loss_type="bnpo", epsilon=self.epsilon_low, epsilon_high=self.epsilon_high)
    mode = _mode(self)
    m = self._metrics[mode]
    if self.aux_loss_enabled:  # RLOO's loss is unscaled (the HF Trainer divides by the accumulation)
        loss = loss + self.router_aux_loss_coef * aux_loss
        m["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
    stats = self.accelerator.reduce(torch.stack([(entropies * completion_mask).sum(), completion_mask.sum().float()]),
                                    reduction="sum")
    m["entropy"].append((stats[0] / stats[1].clamp(min=1.0)).item())
    seqs = metrics["num_tokens"]
    m["clip_ratio/low_mean"].append(_global_mean(self, metrics["clip_ratio/low_mean"], seqs))
    m["clip_ratio/low_min"].append(_global_extreme(self, metrics["clip_ratio/low_min"], nanmin))
    m["clip_ratio/high_mean"].append(_global_mean(self, metrics["clip_ratio/high_mean"], seqs))
    m["clip_ratio/high_max"].append(_global_extreme(self, metrics["clip_ratio/high_max"], nanmax))
    m["clip_ratio/region_mean"].append(_global_mean(self, metrics["clip_ratio/region_mean"], seqs))
    return loss
