"""Policy-gradient losses of online RL (PPO and its critic-free successors), one fused kernel per call."""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from pyalign import _checks
from pyalign._ext import check_cuda_supported
from pyalign._metrics import Metrics
from pyalign.ops import rl as _ops
from pyalign.ops.rl import METRIC_NAMES, PARAM_NAMES, params_list, policy_loss_op

__all__ = ["policy_loss", "LOSS_TYPES", "KL_ESTIMATORS", "IMPORTANCE_SAMPLING_MODES", "LOSS_AGG_MODES"]

LOSS_TYPES = _ops.LOSS_TYPES
KL_ESTIMATORS = _ops.KL_ESTIMATORS
IMPORTANCE_SAMPLING_MODES = _ops.IS_MODES[1:]  # "none" is spelled None
LOSS_AGG_MODES = _ops.AGG_MODES[1:]  # "by_type" is spelled None
_CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "ppo")


def _tokens(x, name: str, shape, device, *, numeric: bool = False) -> Optional[Tensor]:
    if x is None:
        return None
    if numeric:
        _checks.tensor(x, name)
        if not (x.is_floating_point() or x.dtype in (torch.bool, torch.int32, torch.int64, torch.uint8)):
            raise TypeError(f"{name}: expected a bool, integer or float tensor, got {x.dtype}")
        check_cuda_supported(x, name)
    else:
        _checks.float_tensor(x, name)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {list(shape)} like logps, got {list(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} like logps, got {x.device}")
    return x.reshape(-1)


def _segments(shape, cu_seqlens, device) -> tuple[Optional[Tensor], int, int]:
    """Segment offsets ``[S + 1]`` (None for the rows of ``[B, T]`` inputs), the number of segments and
    the padded length (0 when packed)."""
    if cu_seqlens is None:
        B, T = shape
        return None, B, T
    _checks.index_tensor(cu_seqlens, "cu_seqlens")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens: expected a 1-d tensor of S + 1 offsets, got shape {list(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens: expected a tensor on {device} like logps, got {cu_seqlens.device}")
    seg = cu_seqlens.to(torch.int64).contiguous()
    if device.type != "cpu":  # on CPU the kernel checks them itself
        n = shape[-1]
        if int(seg[0]) != 0 or int(seg[-1]) != n or bool((seg[1:] < seg[:-1]).any()):
            raise ValueError(f"cu_seqlens: expected non-decreasing offsets from 0 to {n}")
    return seg, seg.numel() - 1, 0


def _number(x, name: str) -> float:
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name}: expected a number or a one-element tensor, got shape {list(x.shape)}")
        x = float(x)
    return _checks.finite(x, name)


def policy_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Optional[Tensor] = None,
    *,
    loss_type: str = "dapo",
    epsilon: float = 0.2,
    epsilon_high: Optional[float] = None,
    delta: Optional[float] = None,
    dual_clip: Optional[float] = None,
    importance_sampling_level: str = "token",
    ref_logps: Optional[Tensor] = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    use_bias_correction_kl: bool = False,
    entropy: Optional[Tensor] = None,
    entropy_coef: float = 0.0,
    top_entropy_quantile: float = 1.0,
    sampling_logps: Optional[Tensor] = None,
    importance_sampling_mode: Optional[str] = None,
    importance_sampling_clip_max: Optional[float] = 3.0,
    importance_sampling_clip_min: Optional[float] = None,
    off_policy_mask_threshold: Optional[float] = None,
    max_completion_length: Optional[int] = None,
    num_items_in_batch: Union[int, float, Tensor, None] = None,
    loss_agg_mode: Optional[str] = None,
    cu_seqlens: Optional[Tensor] = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
):
    """The policy-gradient loss of a batch of completions, as TRL 1.16's ``GRPOTrainer`` computes it
    (option names from ``GRPOConfig``), with verl's PPO dual clip and loss aggregation modes; returns
    ``(loss, metrics)``, differentiable w.r.t. ``logps`` and ``entropy``.

    With ``r = exp(logps - old_logps)`` (per token, or with ``importance_sampling_level="sequence"``
    the exponent of the mean log-ratio of each sequence: GSPO, Zheng et al. 2025, arXiv:2507.18071) and
    advantages ``A``, the per-token loss of each ``loss_type`` is:

    - ``grpo`` (Shao et al. 2024, arXiv:2402.03300), ``bnpo``, ``dr_grpo`` (Liu et al. 2025,
      arXiv:2503.20783), ``dapo`` (Yu et al. 2025, arXiv:2503.14476), ``luspo``, ``ppo`` (Schulman et
      al. 2017, arXiv:1707.06347): ``-min(r' A, clip(r, 1 - epsilon, 1 + epsilon_high) A)`` with
      ``r' = min(r, delta)`` when ``delta`` is set (two-sided clipping); ``ppo`` adds the dual clip
      ``min(., -A dual_clip)`` for ``A < 0`` (Ye et al. 2019, arXiv:1912.09729; verl's ``clip_ratio_c``);
    - ``cispo`` (MiniMax 2025, arXiv:2506.13585): ``-sg(min(r, epsilon_high)) A logps``;
    - ``sapo``: ``-sigmoid(tau (r - 1)) 4 / tau A`` with ``tau`` ``sapo_temperature_pos`` for ``A > 0``,
      else ``sapo_temperature_neg``;
    - ``vespo``: ``-sg(phi(w)) A logps``, ``phi(w) = exp(lambda + k log w - lambda w)`` of the sequence
      weight ``w`` (TRL's gamma weights; ``vespo_k_*``, ``vespo_lambda_*`` by the sign of A).

    The per-token losses are multiplied by the off-policy sequence mask (``off_policy_mask_threshold``,
    DeepSeek-V3.2's OPSM: a sequence with ``A < 0`` whose mean ``sampling_logps - logps`` exceeds the
    threshold is dropped), the high-entropy mask (``top_entropy_quantile < 1``: only tokens whose
    entropy reaches the ``1 - top_entropy_quantile`` quantile of the batch's kept tokens; Wang et al.
    2025, arXiv:2506.01939) and the rollout correction (``importance_sampling_mode``:
    ``exp(old_logps - sampling_logps)`` per token or sequence, truncated to (or masked outside)
    ``[importance_sampling_clip_min, importance_sampling_clip_max]``); then ``beta`` times a KL
    estimate to ``ref_logps`` is added (``kl_estimator`` of :func:`pyalign.rl.kl_penalty`, multiplied
    by ``r`` with ``use_bias_correction_kl``). They are reduced by the loss type's rule (TRL):
    ``grpo``/``sapo`` the mean over sequences of each sequence's token mean; ``bnpo``/``ppo`` the mean
    over kept tokens; ``dr_grpo`` the sum over ``B * max_completion_length``; ``dapo``/``cispo``/``vespo``
    the sum over ``num_items_in_batch`` (default: the kept tokens); ``luspo`` the mean over sequences of
    token sums — or by verl's ``loss_agg_mode`` when given. ``entropy_coef`` subtracts that times the
    mean entropy of the kept (and high-entropy) tokens.

    Shapes: ``logps``, ``old_logps``, ``ref_logps``, ``sampling_logps``, ``entropy``, ``mask``
    ``[B, T]`` and ``advantages`` ``[B]`` or ``[B, T]``; or packed sequences (padding-free)
    ``[1, N]`` (or ``[N]``) with ``cu_seqlens`` ``[S + 1]`` and ``advantages`` ``[S]`` or like
    ``logps``. fp32/bf16/fp16 (or fp64) inputs, fp32 (fp64) accumulation and results.

    Numerics: log-ratios are clamped to [-20, 20] (verl's clamp; beyond, their gradient is 0), so
    ``|log r|`` up to 1e4 gives finite losses and gradients; TRL's formulas agree wherever
    ``|log r| <= 20``. A NaN in a kept token's input gives a NaN loss; a masked token's values never reach the results.
    ``top_entropy_quantile < 1`` and ``num_items_in_batch`` or ``cu_seqlens`` given as CUDA tensors
    cost a host sync.

    Metrics (TRL's names): ``policy_loss``, ``kl`` (``beta != 0``), ``entropy`` (with ``entropy``),
    ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean``,
    ``clip_ratio/low_min``, ``clip_ratio/high_max`` (clipped types), ``cispo_clip_ratio``,
    ``vespo/phi_seq_mean``, ``sampling/importance_sampling_ratio/{mean,min,max}`` (rollout correction),
    ``num_tokens``.
    """
    args, o = prepare(locals())
    loss, values, _, _ = policy_loss_op(*args)
    return loss, Metrics(values, o.metric_index)



def prepare(a: dict) -> tuple[tuple, "_Options"]:
    """The checked arguments of :func:`pyalign.ops.rl.policy_loss_op` and the parsed options, from
    :func:`policy_loss`'s arguments by name (``a``: its ``locals()``); the one place they are checked."""
    logps, old_logps, advantages, mask, entropy = a["logps"], a["old_logps"], a["advantages"], a["mask"], a["entropy"]
    cu_seqlens, max_completion_length, num_items_in_batch = (a["cu_seqlens"], a["max_completion_length"],
                                                             a["num_items_in_batch"])
    ref_logps, sampling_logps, use_bias_correction_kl = a["ref_logps"], a["sampling_logps"], a["use_bias_correction_kl"]
    _checks.float_tensor(logps, "logps")
    dev = logps.device
    if cu_seqlens is None:
        if logps.dim() != 2:
            raise ValueError(f"logps: expected shape [B, T] (or packed [1, N] with cu_seqlens), got {list(logps.shape)}")
    elif not (logps.dim() == 1 or (logps.dim() == 2 and logps.shape[0] == 1)):
        raise ValueError(f"logps: with cu_seqlens expected packed tokens [1, N] or [N], got {list(logps.shape)}")
    shape = tuple(logps.shape)
    seg, S, T = _segments(shape, cu_seqlens, dev)
    o = _options(*(a[k] for k in _OPTION_NAMES), entropy is not None)
    old = _tokens(old_logps, "old_logps", shape, dev)
    if old is None:
        raise TypeError("old_logps: expected a tensor like logps (pass logps.detach() when on-policy)")
    ref = _tokens(ref_logps, "ref_logps", shape, dev)
    if o.beta != 0 and ref is None:
        raise ValueError("ref_logps: required when beta != 0")
    samp = _tokens(sampling_logps, "sampling_logps", shape, dev)
    if o.mode != "none" and samp is None:
        raise ValueError(f"sampling_logps: required by importance_sampling_mode {o.mode!r}")
    ent = _tokens(entropy, "entropy", shape, dev)
    if (o.quantile < 1 or o.entropy_coef != 0) and ent is None:
        raise ValueError("entropy: required by top_entropy_quantile < 1 and by entropy_coef != 0")
    m = _tokens(mask, "mask", shape, dev, numeric=True)
    _checks.float_tensor(advantages, "advantages")
    n = math.prod(shape)
    if advantages.device != dev:
        raise ValueError(f"advantages: expected a tensor on {dev} like logps, got {advantages.device}")
    per_token = tuple(advantages.shape) == shape or (cu_seqlens is not None and advantages.numel() == n and
                                                      advantages.dim() == len(shape))
    if not per_token and tuple(advantages.shape) != (S,):
        raise ValueError(f"advantages: expected shape [{S}] (one per sequence) or {list(shape)} (one per token), "
                         f"got {list(advantages.shape)}")
    horizon = max_completion_length
    if horizon is None:
        if T == 0 and (o.loss_type == "dr_grpo" and o.agg == "by_type" or o.agg == "seq-mean-token-sum-norm"):
            raise ValueError("max_completion_length: required with cu_seqlens by dr_grpo and seq-mean-token-sum-norm")
        horizon = max(T, 1)
    elif isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
        raise ValueError(f"max_completion_length: expected an int >= 1, got {horizon!r}")
    items = math.nan if num_items_in_batch is None else _number(num_items_in_batch, "num_items_in_batch")
    threshold = math.nan
    if o.quantile < 1:
        kept = ent.detach()[(m != 0) if m is not None else slice(None)].float()
        threshold = math.inf if kept.numel() == 0 else float(torch.quantile(kept, 1 - o.quantile))
    params = list(o.params)
    params[_THRESHOLD], params[_HORIZON], params[_ITEMS] = threshold, float(horizon), items
    return (logps.reshape(-1), old, ref, samp, ent, m, advantages.reshape(-1), seg, S, T, o.loss_type, o.level,
            o.kl_estimator, o.mode, o.agg, bool(use_bias_correction_kl), per_token, params), o


class _Options(NamedTuple):
    loss_type: str
    level: str
    kl_estimator: str
    agg: str
    mode: str
    quantile: float
    beta: float
    entropy_coef: float
    # each token's gradient depends on its own values and the mask only (no sequence-level ratio,
    # quantile, OPSM or VESPO weight): what a forward that forms the head's gradient needs
    token_local: bool
    params: tuple  # in the kernels' order; entropy_threshold, horizon and num_items filled per call
    metric_index: dict


# policy_loss's scalar options in _cached_options' order
_OPTION_NAMES = ("loss_type", "importance_sampling_level", "kl_estimator", "loss_agg_mode", "importance_sampling_mode",
                 "epsilon", "epsilon_high", "delta", "dual_clip", "top_entropy_quantile", "beta", "entropy_coef",
                 "off_policy_mask_threshold", "importance_sampling_clip_min", "importance_sampling_clip_max",
                 "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg",
                 "vespo_lambda_neg")
_THRESHOLD, _HORIZON, _ITEMS = (PARAM_NAMES.index(k) for k in ("entropy_threshold", "horizon", "num_items"))


def _options(*args) -> _Options:
    try:
        return _cached_options(*args)
    except TypeError as e:  # an unhashable argument: checked uncached, for its message
        if "unhashable" not in str(e):
            raise
        return _cached_options.__wrapped__(*args)


# typed: 1, 1.0 and True are different keys (a bool is refused where a number is expected)
@functools.lru_cache(maxsize=256, typed=True)
def _cached_options(loss_type, importance_sampling_level, kl_estimator, loss_agg_mode, importance_sampling_mode,
                    epsilon, epsilon_high, delta, dual_clip, top_entropy_quantile, beta, entropy_coef,
                    off_policy_mask_threshold, importance_sampling_clip_min, importance_sampling_clip_max,
                    sapo_temperature_pos, sapo_temperature_neg, vespo_k_pos, vespo_lambda_pos, vespo_k_neg,
                    vespo_lambda_neg, has_entropy) -> _Options:
    lt = _checks.choice(loss_type, "loss_type", LOSS_TYPES)
    level = _checks.choice(importance_sampling_level, "importance_sampling_level", ("token", "sequence"))
    est = _checks.choice(kl_estimator, "kl_estimator", KL_ESTIMATORS)
    agg = "by_type" if loss_agg_mode is None else _checks.choice(loss_agg_mode, "loss_agg_mode", LOSS_AGG_MODES)
    mode = "none" if importance_sampling_mode is None else _checks.choice(
        importance_sampling_mode, "importance_sampling_mode", IMPORTANCE_SAMPLING_MODES)
    eps = _checks.finite(epsilon, "epsilon")
    eps_high = eps if epsilon_high is None else _checks.finite(epsilon_high, "epsilon_high")
    if eps < 0 or eps_high < 0:
        raise ValueError(f"epsilon / epsilon_high: expected values >= 0, got {eps} / {eps_high}")
    if delta is not None and not _checks.finite(delta, "delta") > 1.0:
        raise ValueError(f"delta: expected None or a number > 1 (the upper bound of the ratio), got {delta!r}")
    if dual_clip is not None and not _checks.finite(dual_clip, "dual_clip") > 1.0:
        raise ValueError(f"dual_clip: expected None or a number > 1, got {dual_clip!r}")
    if dual_clip is not None and lt != "ppo":
        raise ValueError(f"dual_clip: only defined for loss_type 'ppo', got {lt!r}")
    q = top_entropy_quantile
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q <= 1:
        raise ValueError(f"top_entropy_quantile: expected a number in (0, 1], got {q!r}")
    beta = _checks.finite(beta, "beta")
    ent_coef = _checks.finite(entropy_coef, "entropy_coef")
    opsm = math.nan if off_policy_mask_threshold is None else _checks.finite(off_policy_mask_threshold,
                                                                              "off_policy_mask_threshold")
    lo = -math.inf if importance_sampling_clip_min is None else _checks.finite(importance_sampling_clip_min,
                                                                                 "importance_sampling_clip_min")
    hi = math.inf if importance_sampling_clip_max is None else _checks.finite(importance_sampling_clip_max,
                                                                                "importance_sampling_clip_max")
    params = params_list(
        epsilon_low=eps, epsilon_high=eps_high, delta=math.nan if delta is None else delta,
        dual_clip=math.nan if dual_clip is None else dual_clip, beta=beta, entropy_coef=ent_coef,
        entropy_threshold=math.nan, is_clip_min=lo, is_clip_max=hi, off_policy_threshold=opsm, horizon=1,
        num_items=math.nan, sapo_temperature_pos=_checks.positive(sapo_temperature_pos, "sapo_temperature_pos"),
        sapo_temperature_neg=_checks.positive(sapo_temperature_neg, "sapo_temperature_neg"),
        vespo_k_pos=_checks.finite(vespo_k_pos, "vespo_k_pos"),
        vespo_lambda_pos=_checks.finite(vespo_lambda_pos, "vespo_lambda_pos"),
        vespo_k_neg=_checks.finite(vespo_k_neg, "vespo_k_neg"),
        vespo_lambda_neg=_checks.finite(vespo_lambda_neg, "vespo_lambda_neg"))
    names = ["policy_loss", "num_tokens"]
    if beta != 0:
        names.append("kl")
    if has_entropy:
        names.append("entropy")
    if lt in _CLIPPED:
        names += ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/low_min",
                  "clip_ratio/high_max"]
    elif lt in ("cispo", "vespo"):
        names.append("cispo_clip_ratio" if lt == "cispo" else "vespo/phi_seq_mean")
    if mode != "none":
        names += [f"sampling/importance_sampling_ratio/{k}" for k in ("mean", "min", "max")]
    token_local = level == "token" and q == 1 and math.isnan(opsm) and lt != "vespo"
    return _Options(lt, level, est, agg, mode, q, beta, ent_coef, token_local, tuple(params),
                    {k: METRIC_NAMES.index(k) for k in names})
