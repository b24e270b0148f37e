"""pyalign inside TRL's trainers (``pip install "pyalign[trl]"``).

TRL computes per-token log-probs through its chunked fused LM head (``add_fused_lm_head``, used by
``DPOTrainer``, ``KTOTrainer``, ``GRPOTrainer``, ``RLOOTrainer`` and ``SFTTrainer``), which returns
``log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1``. :func:`patch_fused_lm_head` swaps
that computation for :func:`pyalign.logprob.linear_token_logprobs` in every trainer at once;
:func:`patch_trainer` does that and computes the loss with pyalign, logging the same metrics under
the same names: for a ``DPOTrainer`` with :func:`pyalign.losses.dpo_loss` (every loss type TRL offers,
f-divergences, WPO weighting), for a ``GRPOTrainer`` or an ``RLOOTrainer`` with
:func:`pyalign.rl.policy_loss` (every GRPO loss type, both sampling levels, KL, entropy bonus and mask,
two-sided clipping, OPSM), for TRL's distillation trainers with :mod:`pyalign.distill`.
``label_smoothing`` reaches only the loss types whose TRL formula uses it (``exo_pair``, ``robust``,
``aot``, ``aot_unpaired``; TRL's ``sigmoid`` ignores it).

    from pyalign.integrations.trl import patch_trainer
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    patch_trainer(trainer)
    trainer.train()
"""
from __future__ import annotations

import types
from contextlib import nullcontext

import torch

import pyalign.logprob as _logprob
from pyalign.integrations import _trl_distill as _distill
from pyalign.integrations import _trl_online as _online

__all__ = ["PyalignChunkedLogProb", "patch_fused_lm_head", "patch_trainer"]

# Loss types whose formula in TRL's DPOTrainer uses `label_smoothing` (TRL 1.16); the others, `sigmoid`
# included, ignore it, while pyalign.losses.dpo_loss applies it to `sigmoid` (cDPO) and refuses it
# for types that have none.
_TRL_SMOOTHED = ("exo_pair", "robust", "aot", "aot_unpaired")

# TRL's names for the optional per-token outputs -> pyalign's.
_OUTPUT_NAMES = {"entropy": "entropy", "log_sum_sq_probs": "log_sum_sq_probs", "mean_logits": "mean_logit",
                 "is_top1": "is_top1"}


class PyalignChunkedLogProb:
    """Drop-in for TRL's ``ChunkedLogProbFunction``: same ``apply`` arguments and 5-tuple result."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")):
        del chunk_size  # pyalign sizes its chunks from V, the hidden size and the dtype
        if torch.is_autocast_enabled(hidden.device.type):
            dtype = torch.get_autocast_dtype(hidden.device.type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        elif weight.dtype != hidden.dtype:
            weight = weight.to(hidden.dtype)
            bias = None if bias is None else bias.to(hidden.dtype)
        wanted = tuple(_OUTPUT_NAMES[n] for n in outputs if n in _OUTPUT_NAMES)
        with torch.autocast(hidden.device.type, enabled=False) if torch.is_autocast_enabled(hidden.device.type) else nullcontext():
            st = _logprob.linear_token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                                logit_scale=logit_scale, softcap=final_logit_softcapping,
                                                outputs=wanted)
        return st.logprobs, st.entropy, st.log_sum_sq_probs, st.mean_logit, st.is_top1


def patch_fused_lm_head() -> callable:
    """Routes TRL's fused LM head through pyalign in every trainer; returns a function that undoes it."""
    import trl.trainer.utils as trl_utils

    original = trl_utils._ChunkedLogProbFunction
    trl_utils._ChunkedLogProbFunction = PyalignChunkedLogProb

    def undo():
        trl_utils._ChunkedLogProbFunction = original
    return undo


def _dpo_compute_loss(self, model, inputs, return_outputs):
    """``DPOTrainer._compute_loss`` with the loss from :func:`pyalign.losses.dpo_loss`.

    Follows TRL's batch layout ([chosen; rejected] along the batch) and metric names, and TRL's use
    of ``label_smoothing``: only the types in ``_TRL_SMOOTHED`` get it (pyalign's own ``sigmoid``
    would be cDPO with it). Options this path does not cover (``ld_alpha``, MoE auxiliary loss,
    PEFT reference adapters, a ``label_smoothing`` that pyalign refuses for a smoothed type, such
    as ``robust`` with 0.5 or ``aot`` with 0.7) fall back to TRL's own method.
    """
    from pyalign.losses import dpo_loss
    from pyalign.losses.dpo import label_smoothing_valid

    eps = float(self.label_smoothing)
    types, loss_weights = list(self.loss_types), list(self.loss_weights)
    kept = [(t, w) for t, w in zip(types, loss_weights) if t != "sft"]
    smoothed = [(t, w) for t, w in kept if t in _TRL_SMOOTHED]
    if (self.ld_alpha is not None or self.aux_loss_enabled or self.ref_model is None and not self.precompute_ref_logps
            or any(not label_smoothing_valid(t, eps) for t, _ in smoothed)):
        return self._pyalign_original_compute_loss(model, inputs, return_outputs)
    mode = "train" if self.model.training else "eval"
    model_kwargs = {k: v for k, v in inputs.items() if k not in {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}}
    model_kwargs["use_cache"] = False
    completion_mask = inputs["completion_mask"]
    shift_mask = completion_mask[..., 1:]
    labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
    outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
    seq_len = shift_mask.size(1)
    per_token = outputs.log_probs[:, -seq_len:]
    chosen_logps, rejected_logps = per_token.sum(1).chunk(2)
    if self.precompute_ref_logps:
        ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
    else:
        with torch.no_grad():
            ref_out = self.ref_model(**model_kwargs, labels=labels, fused_lm_head=True)
        ref_chosen, ref_rejected = ref_out.log_probs[:, -seq_len:].sum(1).chunk(2)
    lengths_c, lengths_r = completion_mask.sum(1).clamp(min=1).chunk(2)
    weights = None
    if self.use_weighting:  # WPO, Zhou et al. 2024 (arXiv:2406.11827), eq. 2
        with torch.no_grad():
            aligned = (per_token - outputs.log_sum_sq_probs[:, -seq_len:]) * shift_mask
            w = torch.exp(aligned.sum(1) / shift_mask.sum(1).clamp(min=1))
            wc, wr = w.chunk(2)
            weights = wc * wr
    # TRL's "sft" term pools the chosen tokens of the whole batch; pyalign's is per sequence, so
    # the pooled form is added here to keep the loss identical.
    sft_weight = sum(w for t, w in zip(types, loss_weights) if t == "sft")
    # One dpo_loss call per smoothing value: eps for the types TRL smooths, 0 for the others.
    plain = [(t, w) for t, w in kept if t not in _TRL_SMOOTHED]
    groups = [(smoothed, eps), (plain, 0.0)] if eps != 0 else [(kept, 0.0)]
    loss = per_token.new_zeros(())
    metrics = None
    for group, e in groups:
        if not group:
            continue
        part, m = dpo_loss(
            chosen_logps, rejected_logps, ref_chosen, ref_rejected, loss_type=[t for t, _ in group],
            loss_weights=[w for _, w in group], beta=self.beta, label_smoothing=e,
            f_divergence=self.f_divergence_type, f_alpha=self.f_alpha_divergence_coef,
            discopop_tau=self.args.discopop_tau, chosen_lengths=lengths_c, rejected_lengths=lengths_r,
            weights=weights)
        loss = loss + part
        metrics = m if metrics is None else metrics
    if metrics is None:
        _, metrics = dpo_loss(chosen_logps.detach(), rejected_logps.detach(), ref_chosen, ref_rejected,
                              loss_type="sigmoid", beta=self.beta)
    if sft_weight:
        mask_c = shift_mask.chunk(2)[0].bool()
        sft = -per_token.chunk(2)[0][mask_c].mean()
        if weights is not None:  # TRL scales every per-sequence loss by the WPO weights
            sft = sft * weights.mean()
        loss = loss + sft_weight * sft
    self._pyalign_log_metrics(mode, outputs, shift_mask, seq_len, metrics, inputs)
    return (loss, outputs) if return_outputs else loss


def _log_metrics(self, mode, outputs, shift_mask, seq_len, metrics, inputs):
    acc = self.accelerator
    m = self._metrics[mode]
    ent = (outputs.entropy[:, -seq_len:].detach() * shift_mask).sum()
    ntok = shift_mask.sum()
    ent, ntok = acc.gather_for_metrics(ent).sum(), acc.gather_for_metrics(ntok).sum()
    m["entropy"].append((ent / ntok).item() if ntok > 0 else 0.0)
    if mode == "train":
        self._total_train_tokens += acc.gather_for_metrics(inputs["attention_mask"].sum()).sum().item() // self._tp_size
    m["num_tokens"] = [self._total_train_tokens]
    mean_c, mean_r = outputs.mean_logits[:, -seq_len:].chunk(2)
    mask_c, mask_r = shift_mask.bool().chunk(2)
    for name, vals, msk in (("logits/chosen", mean_c, mask_c), ("logits/rejected", mean_r, mask_r)):
        tot = acc.gather_for_metrics(vals[msk].sum()).sum().item()
        cnt = acc.gather_for_metrics(msk.sum()).sum().item()
        m[name].append(tot / cnt if cnt > 0 else 0.0)
    top1_c = outputs.is_top1[:, -seq_len:].chunk(2)[0] & mask_c
    correct = acc.gather_for_metrics(top1_c.sum()).sum()
    total = acc.gather_for_metrics(mask_c.sum()).sum()
    m["mean_token_accuracy"].append((correct / total).item() if total > 0 else 0.0)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected"):  # batch means; equal per-rank batches make their mean the global mean
        m[name].append(acc.gather_for_metrics(metrics[name].reshape(1)).mean().item())


def patch_trainer(trainer):
    """Routes ``trainer``'s log-prob head through pyalign and its loss too: for a ``DPOTrainer``
    through :func:`pyalign.losses.dpo_loss`, for a ``GRPOTrainer`` or an ``RLOOTrainer`` through
    :func:`pyalign.rl.policy_loss` (the GRPO configurations it does not cover keep TRL's loss: vLLM's
    importance-sampling correction, adaptive entropy control, loss types pyalign does not know), for
    TRL's distillation trainers (the experimental ``GKDTrainer``, ``DistillationTrainer`` and the
    experimental ``ServerDistillationTrainer``) through :mod:`pyalign.distill`: from both models' hidden
    states and LM heads where both are at hand, from the student's hidden states and LM head to a server
    teacher's top-k log-probs, else from the logits; what pyalign cannot express keeps TRL's code, with
    the reason logged
    (:mod:`pyalign.integrations._trl_distill`).

    Returns the trainer. Call it after constructing the trainer (which installs TRL's fused head).
    """
    patch_fused_lm_head()
    from trl import DPOTrainer, GRPOTrainer, RLOOTrainer

    losses = {DPOTrainer: _dpo_compute_loss, GRPOTrainer: _online.grpo_compute_loss,
              RLOOTrainer: _online.rloo_compute_loss}
    for cls, compute_loss in losses.items():
        if isinstance(trainer, cls) and not hasattr(trainer, "_pyalign_original_compute_loss"):
            trainer._pyalign_original_compute_loss = trainer._compute_loss
            trainer._compute_loss = types.MethodType(compute_loss, trainer)
            if cls is DPOTrainer:
                trainer._pyalign_log_metrics = types.MethodType(_log_metrics, trainer)
    _distill.patch_distillation_trainer(trainer)
    return trainer

