"""TRL's own ``GRPOTrainer._compute_loss`` as a test oracle: called on a stand-in trainer that holds
only what the method reads (its config, a one-process accelerator, the per-token log-probs and
entropies the model would produce), so its loss, gradients and logged metrics can be compared with
pyalign.rl.policy_loss without building a model."""
from __future__ import annotations

import collections
import types

import torch


class _OneProcess:
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x

    def reduce(self, x, reduction="sum"):
        return x


def trl_policy_loss(logps, old_logps, advantages, mask, *, loss_type="dapo", epsilon=0.2, epsilon_high=None,
                    delta=None, beta=0.0, ref_logps=None, entropy=None, entropy_coef=0.0, top_entropy_quantile=1.0,
                    importance_sampling_level="token", use_bias_correction_kl=False, sampling_logps=None,
                    importance_sampling_ratio=None, off_policy_mask_threshold=None, max_completion_length=None,
                    num_items_in_batch=None, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, vespo_k_pos=2.0,
                    vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0):
    """``(loss, metrics)`` as TRL computes them for one micro-batch without gradient accumulation;
    ``importance_sampling_ratio`` is the rollout correction TRL forms at generation time."""
    from trl import GRPOTrainer

    s = types.SimpleNamespace()
    s.accelerator = _OneProcess()
    s.get_high_entropy_mask = types.MethodType(GRPOTrainer.get_high_entropy_mask, s)
    s.get_off_policy_mask = GRPOTrainer.get_off_policy_mask
    s.get_gamma_weights = GRPOTrainer.get_gamma_weights
    s.top_entropy_quantile = top_entropy_quantile
    s.off_policy_mask_threshold = off_policy_mask_threshold
    s.importance_sampling_level = importance_sampling_level
    s.beta = beta
    s.args = types.SimpleNamespace(
        use_bias_correction_kl=use_bias_correction_kl, delta=delta, sapo_temperature_pos=sapo_temperature_pos,
        sapo_temperature_neg=sapo_temperature_neg, vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos,
        vespo_k_neg=vespo_k_neg, vespo_lambda_neg=vespo_lambda_neg, steps_per_generation=1, entropy_target=0.0)
    s.loss_type = loss_type
    s.epsilon_low, s.epsilon_high = epsilon, epsilon if epsilon_high is None else epsilon_high
    s.use_vllm = s.vllm_importance_sampling_correction = importance_sampling_ratio is not None
    s.model = types.SimpleNamespace(training=True)
    s.current_gradient_accumulation_steps = 1
    s.max_completion_length = logps.shape[1] if max_completion_length is None else max_completion_length
    s._entropy_bonus_enabled = entropy_coef != 0
    s.use_adaptive_entropy = False
    s.entropy_coef = entropy_coef
    s.aux_loss_enabled = False
    s._metrics = {"train": collections.defaultdict(list)}
    ent = torch.zeros_like(logps) if entropy is None else entropy
    s._get_per_token_logps_and_entropies = lambda *a, **k: (logps, ent, None)
    B = logps.shape[0]
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long, device=logps.device),
              "prompt_mask": torch.ones(B, 1, dtype=torch.long, device=logps.device),
              "completion_ids": torch.zeros(logps.shape, dtype=torch.long, device=logps.device),
              "completion_mask": mask, "advantages": advantages, "old_per_token_logps": old_logps,
              "num_items_in_batch": torch.tensor(float(mask.sum() if num_items_in_batch is None else num_items_in_batch))}
    if ref_logps is not None:
        inputs["ref_per_token_logps"] = ref_logps
    if sampling_logps is not None:
        inputs["sampling_per_token_logps"] = sampling_logps
    if importance_sampling_ratio is not None:
        inputs["importance_sampling_ratio"] = importance_sampling_ratio
    loss = GRPOTrainer._compute_loss(s, None, inputs)
    return loss, {k: v[-1] for k, v in s._metrics["train"].items()}
