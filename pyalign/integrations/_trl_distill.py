"""pyalign inside TRL's ``GKDTrainer`` (``trl.experimental.gkd``): the generalized JSD computed by
:mod:`pyalign.distill`. Where both models are plain causal LMs whose logits are ``lm_head(decoder(x))``
(optionally with Gemma-style final softcapping), the loss comes straight from the two decoders' hidden
states and LM heads through :func:`pyalign.distill.linear_distillation_loss`, so that neither model's
``[B, T, V]`` logits exist; otherwise (other logit scalings, wrapped models, ``return_outputs=True``)
TRL's own ``compute_loss`` runs with its ``generalized_jsd_loss`` replaced by
:func:`pyalign.distill.distillation_loss` (same arguments, same result). As in TRL, the loss uses
temperature 1 (``GKDConfig.temperature`` is the sampling temperature of the on-policy generations).
"""
from __future__ import annotations

from typing import Optional

import torch

from pyalign import distill

# Config attributes by which some families scale their logits beyond lm_head (Cohere, Granite, ...):
# such models keep the logits path.
_LOGIT_SCALINGS = ("logit_scale", "logits_scaling", "output_logits_scaling")


def _head(model) -> Optional[tuple]:
    """``(decoder, lm_head, final softcap or None)`` where ``model``'s logits are exactly
    ``lm_head(decoder(...).last_hidden_state)`` (softcapped), else None."""
    get_decoder, get_head = getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None)
    if not (callable(get_decoder) and callable(get_head)):
        return None
    config = getattr(model, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_SCALINGS):
        return None
    head, decoder = get_head(), get_decoder()
    if not isinstance(head, torch.nn.Linear) or decoder is None or decoder is model:
        return None
    return decoder, head, getattr(config, "final_logit_softcapping", None)


def generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                         reduction="batchmean", num_items_in_batch=None):
    """TRL's ``GKDTrainer.generalized_jsd_loss`` computed by :func:`pyalign.distill.distillation_loss`."""
    return distill.distillation_loss(student_logits, teacher_logits, labels, beta=beta, temperature=temperature,
                                     reduction=reduction, num_items_in_batch=num_items_in_batch)


def gkd_compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    student, teacher = _head(model), _head(self.teacher_model)
    if return_outputs or student is None or teacher is None:
        return self._pyalign_original_compute_loss(model, inputs, return_outputs=return_outputs,
                                                   num_items_in_batch=num_items_in_batch)
    (s_decoder, s_head, s_cap), (t_decoder, t_head, t_cap) = student, teacher
    hs = s_decoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
    self.teacher_model.eval()
    with torch.no_grad():
        ht = t_decoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
    # the causal shift of TRL's compute_loss: position i predicts the token at i + 1
    return distill.linear_distillation_loss(
        hs[:, :-1], s_head.weight, ht[:, :-1], t_head.weight, inputs["labels"][:, 1:], student_bias=s_head.bias,
        teacher_bias=t_head.bias, beta=self.beta, num_items_in_batch=num_items_in_batch, student_softcap=s_cap,
        teacher_softcap=t_cap)
