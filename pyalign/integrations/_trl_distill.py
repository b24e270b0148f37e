"""pyalign inside TRL's distillation trainers: the divergences of :mod:`pyalign.distill` behind the loss
of TRL's experimental ``GKDTrainer`` (``trl.experimental.gkd``), of its ``DistillationTrainer``
(``trl.DistillationTrainer``, also ``trl.experimental.distillation``) and of the experimental
``ServerDistillationTrainer`` (``trl.experimental.server_distillation``), all through
:func:`patch_distillation_trainer`, which :func:`pyalign.integrations.trl.patch_trainer` calls.

- ``GKDTrainer``: where both models are plain causal LMs whose logits are ``lm_head(decoder(x))``
  (optionally with Gemma-style final softcapping), the loss comes straight from the two decoders' hidden
  states and LM heads through :func:`pyalign.distill.linear_distillation_loss`, so that neither model's
  ``[B, T, V]`` logits exist; otherwise (other logit scalings, wrapped models, ``return_outputs=True``)
  TRL's own ``compute_loss`` runs with its ``generalized_jsd_loss`` replaced by
  :func:`pyalign.distill.distillation_loss` (same arguments, same result). As in TRL, the loss uses
  temperature 1 (``GKDConfig.temperature`` is the sampling temperature of the on-policy generations).
- ``DistillationTrainer`` (a local teacher): TRL's own ``_compute_loss`` (its backbones' hidden states,
  its reading of each model's logit scale and softcap) with the divergence it hands to
  ``_chunked_divergence_loss`` computed by :func:`pyalign.distill.linear_distillation_loss`: the
  generalized JSD at ``beta`` and the loss temperature, each side's logit scale folded into its hidden
  state and bias, TRL's ``num_items_in_batch`` normalization, and the student's mean entropy that TRL
  logs (:func:`pyalign.logprob.linear_token_logprobs`, no gradient).
- ``ServerDistillationTrainer`` (the teacher's top-k log-probs from an inference server): ``beta = 0``
  (forward KL on the teacher's top-k) and ``beta = 1`` (reverse KL on the sampled token) through
  :func:`pyalign.distill.linear_topk_distillation_loss` from the student's last hidden states (TRL's
  ``_get_last_hidden_state``, inside the student wrapper's forward) and LM head, so that the student's
  ``[B, T, V]`` logits never exist, where its logits are checked (once per trainer, on a fixed sequence)
  to be ``scale * (h W^T + b)``, ``scale`` TRL's reading of the logit scale (folded into the hidden state
  and bias); else (a softcapped student: that loss has no softcap; logits the model's forward transforms
  otherwise; ``return_outputs=True``) through :func:`pyalign.distill.topk_distillation_loss` on the
  logits of TRL's student forward, the reason logged. ``0 < beta < 1`` (the generalized JSD on the support
  {teacher's top-1, sampled token}) reads those logits by design, through
  :func:`pyalign.distill.distillation_loss` on that support. With TRL's tail bucket (``loss_add_tail``)
  or renormalized.

What pyalign cannot express runs TRL's own code, and the reason is logged (once per trainer and reason,
logger ``pyalign.integrations.trl``, level WARNING): :func:`distillation_fallback_reason` for the
configurations, and per step: an LM head that is not floating point, a negative softcap, an option this
module does not know; from a server, teacher log-probs missing at a completion token, duplicate top-k ids,
and (forward KL with the tail bucket) a student whose mass on the teacher's top-k exceeds ``1 - 1e-7``,
where TRL floors the tail (below).
"""
from __future__ import annotations

import functools
import logging
import math
import sys
import types
from contextlib import ExitStack
from typing import Optional

import torch

from pyalign import distill
from pyalign import logprob as _logprob
from pyalign._tensors import acc_dtype, gathered

__all__ = ["patch_distillation_trainer", "distillation_fallback_reason", "generalized_jsd_loss", "gkd_compute_loss",
           "chunked_divergence_loss", "server_compute_loss", "TAIL_FLOOR"]

logger = logging.getLogger("pyalign.integrations.trl")

# Config attributes by which some families scale their logits beyond lm_head (Cohere, Granite, ...):
# such models keep the GKD logits path.
_LOGIT_SCALINGS = ("logit_scale", "logits_scaling", "output_logits_scaling")

# TRL's tail bucket (`_add_tail_bucket`) clamps the log of the top-k mass at -1e-7, so neither side's tail
# is below 1 - exp(-1e-7) ~ 1e-7.
TAIL_FLOOR = 1e-7

_HALF = (torch.float16, torch.bfloat16)


def _report(trainer, what: str) -> None:
    """Logs ``what`` (a path taken in place of pyalign's and why) once per trainer."""
    seen = trainer.__dict__.setdefault("_pyalign_reported", set())
    if what not in seen:
        seen.add(what)
        logger.warning("pyalign, %s: %s", type(trainer).__name__, what)


# (kind, module, class) of TRL's distillation trainers, most derived first (a ServerDistillationTrainer is a
# DistillationTrainer)
_TRAINERS = (("gkd", "trl.experimental.gkd.gkd_trainer", "GKDTrainer"),
             ("server", "trl.experimental.server_distillation.server_distillation_trainer",
              "ServerDistillationTrainer"),
             ("local", "trl.trainer.distillation_trainer", "DistillationTrainer"))


def _kind(trainer) -> Optional[str]:
    """Which of TRL's distillation trainers ``trainer`` is (None: none). A class is looked up only where its
    module is loaded (a trainer of it imported it), so nothing is imported here: TRL's experimental modules
    warn when imported."""
    for kind, module, name in _TRAINERS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(trainer, cls):
            return kind
    return None


def patch_distillation_trainer(trainer) -> bool:
    """Installs pyalign's divergence on ``trainer`` if it is one of TRL's distillation trainers (once);
    returns whether it is one."""
    kind = _kind(trainer)
    if kind is None or hasattr(trainer, "_pyalign_original_compute_loss"):
        return kind is not None
    if kind == "local":
        trainer._pyalign_original_compute_loss = trainer._compute_loss
        trainer._compute_loss = _with_pyalign_divergence(trainer)
        return True
    trainer._pyalign_original_compute_loss = trainer.compute_loss
    if kind == "gkd":
        trainer.generalized_jsd_loss = generalized_jsd_loss  # for the logits path
        trainer.compute_loss = types.MethodType(gkd_compute_loss, trainer)
    else:
        trainer.compute_loss = types.MethodType(server_compute_loss, trainer)
    return True


def distillation_fallback_reason(trainer) -> Optional[str]:
    """Why this ``DistillationTrainer`` / ``ServerDistillationTrainer`` configuration runs TRL's own loss
    (None: pyalign computes it). Per step, more reasons can apply (the module docstring)."""
    temperature = getattr(trainer, "temperature", 1.0)
    if not temperature > 0:
        return f"temperature {temperature!r} (pyalign needs > 0)"
    if hasattr(trainer, "teacher_client"):  # the server trainer
        if trainer.beta > 0 and trainer.reverse_kl_top_1_mode != "sampled":
            return f"reverse_kl_top_1_mode={trainer.reverse_kl_top_1_mode!r}"
        if trainer.beta > 0 and trainer.loss_top_k != 1:
            return f"loss_top_k={trainer.loss_top_k} with beta > 0 (TRL's top-1 path)"
        return None
    code = getattr(type(trainer)._compute_loss, "__code__", None)
    if code is None or "_chunked_divergence_loss" not in code.co_names:
        return "this TRL's DistillationTrainer._compute_loss does not call _chunked_divergence_loss"
    return None


# ---- shared: both LM heads, the softcaps ----------------------------------------------------------------

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


def _from_heads(hs, ws, bs, ht, wt, bt, labels, **options):
    """:func:`pyalign.distill.linear_distillation_loss` with the gradient going to the student alone, as
    TRL's losses give it (the teacher's weights may require grad; they get none and cost nothing)."""
    detach = lambda t: None if t is None else t.detach()
    return distill.linear_distillation_loss(hs, ws, detach(ht), detach(wt), labels, student_bias=bs,
                                            teacher_bias=detach(bt), **options)


def _softcap(cap) -> Optional[float]:
    """TRL's kernels cap at ``cap or 1.0`` whenever ``cap`` is not None (so 0 caps at 1)."""
    return None if cap is None else float(cap or 1.0)


# ---- GKDTrainer ---------------------------------------------------------------------------------------

def generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                         reduction="batchmean", num_items_in_batch=None):
    """TRL's ``GKDTrainer.generalized_jsd_loss`` computed by :func:`pyalign.distill.distillation_loss`."""
    return distill.distillation_loss(student_logits, teacher_logits, labels, beta=beta, temperature=temperature,
                                     reduction=reduction, num_items_in_batch=num_items_in_batch)


def gkd_compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    """``GKDTrainer.compute_loss`` from both models' hidden states where their heads are reachable."""
    student, teacher = _head(model), _head(self.teacher_model)
    if return_outputs or student is None or teacher is None:
        why = "return_outputs=True" if return_outputs else "a model's LM head is not reachable as lm_head(decoder(x))"
        _report(self, f"the divergence from the logits (TRL's compute_loss with pyalign's distillation_loss): {why}")
        return self._pyalign_original_compute_loss(model, inputs, return_outputs=return_outputs,
                                                   num_items_in_batch=num_items_in_batch)
    (s_decoder, s_head, s_cap), (t_decoder, t_head, t_cap) = student, teacher
    hs = s_decoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
    self.teacher_model.eval()
    with torch.no_grad():
        ht = t_decoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
    # the causal shift of TRL's compute_loss: position i predicts the token at i + 1
    return _from_heads(hs[:, :-1], s_head.weight, s_head.bias, ht[:, :-1], t_head.weight, t_head.bias,
                       inputs["labels"][:, 1:], beta=self.beta, num_items_in_batch=num_items_in_batch,
                       student_softcap=s_cap, teacher_softcap=t_cap)


# ---- DistillationTrainer (a local teacher) ------------------------------------------------------------

def _with_pyalign_divergence(trainer):
    """``trainer``'s own ``_compute_loss`` (TRL's), with the name ``_chunked_divergence_loss`` it calls
    resolved to :func:`chunked_divergence_loss` for this trainer alone (the function is rebuilt over a copy of
    its module's globals; nothing of TRL's is changed). TRL's own method where it does not call it."""
    reason = distillation_fallback_reason(trainer)
    fn = type(trainer)._compute_loss
    if reason is not None:
        def fallback(self, *args, **kwargs):
            _report(self, f"TRL's own loss: {reason}")
            return fn(self, *args, **kwargs)
        return types.MethodType(fallback, trainer)
    scope = dict(fn.__globals__)
    scope["_chunked_divergence_loss"] = functools.partial(chunked_divergence_loss, trainer)
    rebuilt = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    rebuilt.__kwdefaults__, rebuilt.__doc__ = fn.__kwdefaults__, fn.__doc__
    return types.MethodType(rebuilt, trainer)


def _scaled(hidden, bias, scale):
    """``(hidden, bias)`` whose logits are ``scale`` times ``hidden @ W.T + bias``: a logit scale folded
    into the head's input (exact for a power of two; otherwise in fp32 for fp16/bf16 hidden states)."""
    if scale == 1:
        return hidden, bias
    if hidden.dtype in _HALF and math.frexp(scale)[0] != 0.5:
        hidden = hidden.float()
    return hidden * scale, None if bias is None else bias.to(hidden.dtype) * scale


def _chunked_reason(tensors, caps, extra) -> Optional[str]:
    """Why TRL's own ``_chunked_divergence_loss`` must compute these arguments (None: pyalign can)."""
    if extra:
        return f"options this module does not know: {sorted(extra)}"
    for name, t in tensors:
        if t is not None and not t.is_floating_point():
            return f"{name} of dtype {t.dtype} (a quantized LM head?)"
    if any(c is not None and c < 0 for c in caps):
        return f"a negative final_logit_softcapping {caps}"
    return None


def chunked_divergence_loss(trainer, student_hidden_states, teacher_hidden_states, student_lm_head_weight,
                            teacher_lm_head_weight, completion_mask, beta, num_items_in_batch=None,
                            student_lm_head_bias=None, teacher_lm_head_bias=None, student_logit_scale=1.0,
                            teacher_logit_scale=1.0, student_final_logit_softcapping=None,
                            teacher_final_logit_softcapping=None, temperature=1.0, **extra):
    """TRL's ``_chunked_divergence_loss`` (``trl.trainer.distillation_trainer``, same arguments, same
    ``(loss, student entropy sum, valid positions)``) computed by
    :func:`pyalign.distill.linear_distillation_loss`: the generalized JSD of Agarwal et al. 2024 (GKD,
    arXiv:2306.13649) between the softmaxes of ``softcap(scale * logits) / temperature``, per completion
    position where ``completion_mask != 0``, summed and divided by ``num_items_in_batch`` (else by the valid
    positions); the gradient goes to the student's hidden states and head. The entropy (for TRL's
    ``entropy`` metric) comes from :func:`pyalign.logprob.linear_token_logprobs` without gradient."""
    args = dict(student_hidden_states=student_hidden_states, teacher_hidden_states=teacher_hidden_states,
                student_lm_head_weight=student_lm_head_weight, teacher_lm_head_weight=teacher_lm_head_weight,
                completion_mask=completion_mask, beta=beta, num_items_in_batch=num_items_in_batch,
                student_lm_head_bias=student_lm_head_bias, teacher_lm_head_bias=teacher_lm_head_bias,
                student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
                student_final_logit_softcapping=student_final_logit_softcapping,
                teacher_final_logit_softcapping=teacher_final_logit_softcapping, temperature=temperature)
    reason = _chunked_reason(
        [("student_lm_head_weight", student_lm_head_weight), ("teacher_lm_head_weight", teacher_lm_head_weight),
         ("student_lm_head_bias", student_lm_head_bias), ("teacher_lm_head_bias", teacher_lm_head_bias)],
        (student_final_logit_softcapping, teacher_final_logit_softcapping), extra)
    if reason is not None:
        import trl.trainer.distillation_trainer as trl_distillation
        _report(trainer, f"TRL's own loss: {reason}")
        return trl_distillation._chunked_divergence_loss(**args, **extra)
    from trl.trainer.utils import maybe_gather_lm_head_ctx  # ZeRO-3: the heads gathered for the direct reads

    s_cap, t_cap = _softcap(student_final_logit_softcapping), _softcap(teacher_final_logit_softcapping)
    hs, bs = _scaled(student_hidden_states, student_lm_head_bias, student_logit_scale)
    ht, bt = _scaled(teacher_hidden_states, teacher_lm_head_bias, teacher_logit_scale)
    valid = completion_mask != 0
    labels = torch.where(valid, 0, -100)  # the mask alone: the divergence reads no label
    with ExitStack() as stack:
        stack.enter_context(maybe_gather_lm_head_ctx(student_lm_head_weight, student_lm_head_bias))
        stack.enter_context(maybe_gather_lm_head_ctx(teacher_lm_head_weight, teacher_lm_head_bias))
        loss = _from_heads(hs, student_lm_head_weight, bs, ht, teacher_lm_head_weight, bt, labels, beta=beta,
                           temperature=temperature, num_items_in_batch=num_items_in_batch, student_softcap=s_cap,
                           teacher_softcap=t_cap)
        entropy = _entropy_sum(hs.detach()[valid], student_lm_head_weight.detach(),
                               None if bs is None else bs.detach(), temperature, s_cap)
    return loss, entropy, valid.sum()


def _entropy_sum(hidden, weight, bias, temperature, softcap):
    """The summed entropy of ``softmax(softcap(hidden @ weight.T + bias) / temperature)`` over the rows of
    ``hidden [n, H]`` (fp32, no gradient)."""
    if hidden.shape[0] == 0:
        return torch.zeros((), dtype=torch.float32, device=hidden.device)
    with torch.no_grad():
        labels = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)  # any id: unused
        stats = _logprob.linear_token_logprobs(hidden, weight, labels, bias=bias, temperature=temperature,
                                               softcap=softcap, outputs=("entropy",))
    return stats.entropy.sum().float()


# ---- ServerDistillationTrainer (the teacher's top-k log-probs from a server) --------------------------

def _floored(logprobs):
    """Top-k log-probs shifted down (by at most their excess) so that their mass is at most
    ``exp(-TAIL_FLOOR)``: the teacher tail TRL's clamp gives, where pyalign's tail is exact."""
    excess = (torch.logsumexp(logprobs, -1, keepdim=True) + TAIL_FLOOR).clamp_min(0)
    return logprobs - excess


def _with_tail(logprobs):
    """TRL's ``_add_tail_bucket``: the log of the remaining mass appended (the top-k mass clamped)."""
    top = torch.logsumexp(logprobs, -1, keepdim=True).clamp(max=-TAIL_FLOOR)
    return torch.cat([logprobs, torch.log(-torch.expm1(top))], -1)


def _at_kept(ids, logprobs, kept):
    """Distinct ids and a proper sub-distribution at the ignored positions (padding), whatever the server
    filled in there: those rows are weighted 0, and must not hold NaN."""
    K = ids.shape[-1]
    k = kept.unsqueeze(-1)
    spare = torch.arange(K, device=ids.device).expand_as(ids)
    return torch.where(k, ids, spare), torch.where(k, logprobs, -math.log(K + 1))


def _server_topk(self, teacher, tokens, kept):
    """``((divergence, log-probs, ids), None)``: the teacher as pyalign's top-k losses read it for
    ``beta = 0`` (forward KL on its top-k) and ``beta = 1`` (reverse KL on the sampled token), its tail
    floored as TRL's; or ``(None, reason)`` for TRL's own code."""
    if self.beta == 0:
        lp, ids = teacher["topk_logprobs"], teacher["topk_token_ids"]
        if not bool(torch.isfinite(lp[kept]).all()):
            return None, "the teacher returned fewer than loss_top_k log-probs at a completion token"
        if ids.shape[-1] > 1 and bool((ids[kept].sort(-1).values.diff(dim=-1) == 0).any()):
            return None, "duplicate token ids in the teacher's top-k"
        ids, lp = _at_kept(ids, lp, kept)
        return ("forward_kl", _floored(lp), ids), None  # no change to the renormalized distribution
    actual = teacher["actual_logprobs"]
    if not bool(torch.isfinite(actual[kept]).all()):
        return None, "the teacher server is missing the log-prob of a completion token"
    ids, lp = _at_kept(tokens.unsqueeze(-1), actual.unsqueeze(-1), kept)
    return ("reverse_kl", _floored(lp), ids), None


def _floor_reason(log_mass, kept) -> Optional[str]:
    """Why TRL's own code must run where the student's log-mass on the teacher's top-k (forward KL, tail
    bucket) is above ``-TAIL_FLOOR`` at a kept token: TRL floors the student's tail there."""
    if bool((log_mass[kept] > -TAIL_FLOOR).any()):
        return (f"the student's mass on the teacher's top-k exceeds 1 - {TAIL_FLOOR:g} at a token, where TRL floors "
                "the student's tail bucket")
    return None


def _server_divergence(self, logits, teacher, tokens, labels):
    """``(loss, None)`` from pyalign on the student's logits, or ``(None, reason)`` for TRL's own code."""
    kept = labels != -100
    T, tail = self.temperature, ("bucket" if self.loss_add_tail else "renormalize")
    if self.beta in (0, 1):
        target, reason = _server_topk(self, teacher, tokens, kept)
        if target is None:
            return None, reason
        divergence, lp, ids = target
        if divergence == "forward_kl" and self.loss_add_tail:
            with torch.no_grad():
                lse = _logprob.token_logprobs(logits, torch.where(kept, ids[..., 0], -100), temperature=T,
                                              outputs=("lse",)).lse
                mass = torch.logsumexp(logits.gather(-1, ids).to(lse.dtype) / T - lse.unsqueeze(-1), -1)
            reason = _floor_reason(mass, kept)
            if reason is not None:
                return None, reason
        return distill.topk_distillation_loss(logits, lp, ids, labels, divergence=divergence, tail=tail,
                                              temperature=T), None
    actual = teacher["actual_logprobs"]
    if not bool(torch.isfinite(actual[kept]).all()):
        return None, "the teacher server is missing the log-prob of a completion token"
    # the generalized JSD on {the teacher's top-1, the sampled token} (one outcome where they coincide)
    top, top_ids = teacher["topk_logprobs"][..., 0], teacher["topk_token_ids"][..., 0]
    if not bool(torch.isfinite(top[kept]).all()):
        return None, "the teacher server is missing its top-1 log-prob at a completion token"
    ids = torch.stack([top_ids, tokens], -1)
    support = torch.stack([torch.ones_like(kept), ids[..., 1] != ids[..., 0]], -1)
    ids = torch.where(kept.unsqueeze(-1), ids, 0)
    lse = _logprob.token_logprobs(logits, torch.where(kept, ids[..., 0], -100), temperature=T,
                                  outputs=("lse",)).lse
    s = logits.gather(-1, ids).to(lse.dtype) / T - lse.unsqueeze(-1)
    t = torch.stack([top, actual], -1).to(s.dtype)
    s, t = s.masked_fill(~support, -math.inf), t.masked_fill(~support, -math.inf)
    if self.loss_add_tail:
        s, t = _with_tail(s), _with_tail(t)
    k = kept.unsqueeze(-1)
    s, t = torch.where(k, s, 0.0), torch.where(k, t, 0.0)  # finite at the ignored positions
    # the rows are log-probs, so their softmax is themselves (renormalized over the support without the tail)
    return distill.distillation_loss(s, t, labels, beta=self.beta), None


def _trl_server_loss(self, logits, teacher, tokens, labels):
    """TRL's own server divergence (its ``log_softmax`` over the student's ``[B, T, V]`` logits)."""
    log_probs = torch.nn.functional.log_softmax(logits / self.temperature, dim=-1)
    if self.beta > 0:
        return self._compute_server_sparse_top_1_divergence_loss(
            teacher_result=teacher, student_log_probs=log_probs, completion_tokens=tokens, labels=labels)
    return self._compute_server_forward_kl_loss(teacher_result=teacher, student_log_probs=log_probs, labels=labels)


# -- the student's hidden states and LM head (beta 0 and 1) --

# The fixed token sequence on which a student's logits are checked to be its head's (no gradient, eval mode)
_PROBE_LENGTH = 8


def _logit_scale(config) -> float:
    """TRL's reading of a model's logit scale (``DistillationTrainer._compute_loss``): ``logit_scale``,
    else ``output_multiplier``, else ``lm_head_multiplier``, else ``logits_scaling`` (a divisor, a
    multiplier for HyperCLOVA X); 1 where none is set."""
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        scale = getattr(config, name, None)
        if scale is not None:
            return scale
    scaling = getattr(config, "logits_scaling", None)
    if scaling is not None:
        return scaling if getattr(config, "model_type", None) == "hyperclovax" else 1 / scaling
    return 1.0


def _detached(*tensors):
    return tuple(None if t is None else t.detach() for t in tensors)


def _probed_scale(self, model, unwrapped, head, device):
    """The scale ``s`` with which the student's logits are ``s * (h W^T + b)``, ``h`` the hidden states
    TRL's ``_get_last_hidden_state`` returns and ``W``, ``b`` its LM head's, or the reason they are not.
    Checked once per trainer, on a fixed sequence, in eval mode and without gradient (no dropout: no random
    numbers are drawn), against the logits of the model's own forward, the ones TRL's server loss reads:
    ``s`` is TRL's reading of the logit scale from the config, or 1 where the forward does not apply it."""
    cache = self.__dict__.setdefault("_pyalign_server_scale", {})
    if id(unwrapped) in cache:
        return cache[id(unwrapped)]
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    scale = _logit_scale(unwrapped.config.get_text_config())
    candidates = [scale] + ([1.0] if scale != 1 else [])
    ids = ((torch.arange(_PROBE_LENGTH, device=device) * 7 + 3) % head.out_features).unsqueeze(0)
    mask = torch.ones_like(ids)

    def probe(student):
        hidden = self._get_last_hidden_state(student, ids, mask, _PROBE_LENGTH - 1)  # positions 0 .. L-2
        logits = student(input_ids=ids, attention_mask=mask).logits[:, :-1]
        with maybe_gather_lm_head_ctx(head.weight, head.bias):
            w, b = _detached(gathered(head.weight), gathered(head.bias))
            base = torch.nn.functional.linear(hidden.to(w.device), w, b)
        return logits, base

    modes = [(m, m.training) for m in unwrapped.modules()]
    try:
        unwrapped.eval()
        with torch.no_grad():
            logits, base = self._forward_redirection(model, unwrapped, probe, unwrapped)
    finally:
        for m, training in modes:
            m.training = training
    ref = logits.float().to(base.device)
    tol = 4 * torch.finfo(base.dtype).eps  # a rounding or two (a scale applied as a division, say)
    found = next((s for s in candidates
                  if torch.allclose((base if s == 1 else base * s).float(), ref, rtol=tol,
                                    atol=tol * float(ref.abs().max()))), None)
    if found is None:
        found = (f"the student's logits are not its LM head's output times {candidates} "
                 f"(the model's forward transforms them otherwise)")
    cache[id(unwrapped)] = found
    return found


def _server_route(self, model, unwrapped, prompt_length, return_outputs, device):
    """``(LM head, logit scale)`` where the loss can come from the student's hidden states and head
    (:func:`pyalign.distill.linear_topk_distillation_loss`), else None: the student's logits, with the
    reason logged (the JSD at ``0 < beta < 1`` reads them by design: no reason)."""
    if self.beta not in (0, 1):
        return None
    head = unwrapped.get_output_embeddings() if callable(getattr(unwrapped, "get_output_embeddings", None)) else None
    config = getattr(unwrapped, "config", None)
    cap = None if config is None else getattr(config.get_text_config(), "final_logit_softcapping", None)
    if return_outputs:
        why = "return_outputs=True (TRL returns the student's outputs, logits included)"
    elif not all(callable(getattr(self, name, None)) for name in ("_get_last_hidden_state", "_forward_redirection")):
        why = "this TRL's trainer has no _get_last_hidden_state / _forward_redirection"
    elif not isinstance(head, torch.nn.Linear) or config is None:
        why = "the student's LM head is not a torch.nn.Linear"
    elif not head.weight.is_floating_point():
        why = f"the student's LM head weight of dtype {head.weight.dtype} (a quantized LM head?)"
    elif cap is not None:
        why = f"linear_topk_distillation_loss has no softcap (final_logit_softcapping={cap})"
    elif prompt_length < 1:
        why = "an empty prompt"
    else:
        scale = _probed_scale(self, model, unwrapped, head, device)
        if not isinstance(scale, str):
            return head, scale
        why = scale
    _report(self, f"the divergence from the student's logits (topk_distillation_loss): {why}")
    return None


def _logits_at(hidden, weight, bias, ids):
    """``hidden @ weight[ids].T + bias[ids]`` per row (``hidden [..., H]``, ``ids [..., K]``), in the
    accumulation dtype, a bounded block of rows at a time (no ``[..., V]`` tensor)."""
    acc = acc_dtype(hidden)
    H, K = hidden.shape[-1], ids.shape[-1]
    h2, i2 = hidden.reshape(-1, H), ids.reshape(-1, K)
    out = torch.empty(i2.shape, dtype=acc, device=hidden.device)
    rows = max(1, (1 << 22) // max(1, K * H))
    for r in range(0, h2.shape[0], rows):
        idx = i2[r:r + rows]
        z = torch.bmm(weight[idx].to(acc), h2[r:r + rows].to(acc).unsqueeze(-1)).squeeze(-1)
        out[r:r + rows] = z if bias is None else z + bias[idx].to(acc)
    return out.reshape(ids.shape)


def _server_divergence_hidden(self, hidden, weight, bias, teacher, tokens, labels):
    """``(loss, None)`` from pyalign on the student's hidden states and head (logit scale folded in), or
    ``(None, reason)`` for TRL's own code."""
    kept = labels != -100
    target, reason = _server_topk(self, teacher, tokens, kept)
    if target is None:
        return None, reason
    divergence, lp, ids = target
    T, tail = self.temperature, ("bucket" if self.loss_add_tail else "renormalize")
    if divergence == "forward_kl" and self.loss_add_tail:
        # the student's mass on the teacher's top-k: its lse from one more logits GEMM per token chunk (forward
        # only) and its logits at the ids from the head's rows, so that no [tokens, V] tensor is formed
        h, w, b = _detached(hidden, weight, bias)
        with torch.no_grad():
            lse = _logprob.linear_token_logprobs(h, w, torch.where(kept, ids[..., 0], -100), bias=b, temperature=T,
                                                 outputs=("lse",)).lse
            mass = torch.logsumexp(_logits_at(h, w, b, ids).to(lse.dtype) / T - lse.unsqueeze(-1), -1)
        reason = _floor_reason(mass, kept)
        if reason is not None:
            return None, reason
    return distill.linear_topk_distillation_loss(hidden, weight, lp, ids, labels, student_bias=bias,
                                                 divergence=divergence, tail=tail, temperature=T), None


def _server_hidden_loss(self, unwrapped, inputs, *, prompt_length, head, scale):
    """The server loss from the student's last hidden states (TRL's ``_get_last_hidden_state``, run inside
    the student wrapper's forward by ``_forward_redirection``, as TRL's local-teacher loss) and its head;
    where TRL's own code must run, the student's logits are formed from them (``scale * (h W^T + b)``, the
    model's own, as checked)."""
    from trl.trainer.utils import maybe_gather_lm_head_ctx  # ZeRO-3: the head gathered for the direct reads

    input_ids, labels = inputs["input_ids"], inputs["labels"]
    hidden = self._get_last_hidden_state(unwrapped, input_ids, inputs["attention_mask"],
                                         input_ids.shape[1] - prompt_length)  # positions prompt_length - 1 .. L - 2
    teacher = self._get_teacher_token_logprobs_from_server(inputs, prompt_length)
    n = teacher["actual_logprobs"].shape[1]
    device = head.weight.device
    hidden = hidden[:, :n].to(device)
    tokens, labels = input_ids[:, prompt_length:][:, :n].to(device), labels[:, prompt_length:][:, :n].to(device)
    teacher = {k: v.to(device) for k, v in teacher.items()}
    with maybe_gather_lm_head_ctx(head.weight, head.bias):
        weight, bias = gathered(head.weight), gathered(head.bias)
        hs, bs = _scaled(hidden, bias, scale)
        loss, reason = (_server_divergence_hidden(self, hs, weight, bs, teacher, tokens, labels) if n
                        else (None, "no completion token"))
        if loss is None:
            _report(self, f"TRL's own loss: {reason}")
            logits = torch.nn.functional.linear(hidden, weight, bias)
            loss = _trl_server_loss(self, logits if scale == 1 else logits * scale, teacher, tokens, labels)
    return loss


def server_compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    """``ServerDistillationTrainer.compute_loss`` (TRL 1.16) with the divergence from pyalign: TRL's batch
    layout, prompt boundary, teacher request and trimming, its local ``batchmean`` over completion tokens
    and its division by the gradient-accumulation steps. For ``beta`` 0 and 1, from the student's last
    hidden states and LM head where its logits are checked to be ``scale * (h W^T + b)``
    (:func:`_server_route`); else, as for the JSD, from the logits of TRL's student forward."""
    reason = distillation_fallback_reason(self)
    if reason is not None:
        _report(self, f"TRL's own loss: {reason}")
        return self._pyalign_original_compute_loss(model, inputs, return_outputs=return_outputs,
                                                   num_items_in_batch=num_items_in_batch)
    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    labels = torch.cat([torch.full_like(prompt_ids, -100), completion_ids.masked_fill(completion_mask == 0, -100)],
                       dim=1)
    inputs = {**inputs, "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
              "prompt_attention_mask": prompt_mask}
    prompt_length = self._compute_prompt_length(inputs)  # from the inputs alone
    unwrapped = self.accelerator.unwrap_model(model)
    route = _server_route(self, model, unwrapped, prompt_length, return_outputs, input_ids.device)
    outputs = None
    if route is not None:
        head, scale = route
        hidden_loss = functools.partial(_server_hidden_loss, self, prompt_length=prompt_length, head=head, scale=scale)
        loss = self._forward_redirection(model, unwrapped, hidden_loss, unwrapped, inputs)
    else:
        outputs = model(input_ids=input_ids, attention_mask=attention_mask)
        teacher = self._get_teacher_token_logprobs_from_server(inputs, prompt_length)
        n = teacher["actual_logprobs"].shape[1]
        logits = outputs.logits[:, prompt_length - 1:-1][:, :n]
        tokens, labels = input_ids[:, prompt_length:][:, :n], labels[:, prompt_length:][:, :n]
        loss, reason = _server_divergence(self, logits, teacher, tokens, labels) if n else (None, "no completion token")
        if loss is None:
            _report(self, f"TRL's own loss: {reason}")
            loss = _trl_server_loss(self, logits, teacher, tokens, labels)
    if self.model.training:  # TRL's server path reduces locally, so it scales for gradient accumulation itself
        loss = loss / self.current_gradient_accumulation_steps
    return (loss, outputs) if return_outputs else loss
