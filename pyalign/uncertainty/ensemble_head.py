"""An ensemble of reward heads over shared features: M linear (or two-layer) heads evaluated as one
batched GEMM, trained with every member's Bradley-Terry loss in one fused call, with per-member
bootstrap weights fixed per example by a seed.

A composite: the loss is :func:`pyalign.losses.reward_model_loss` (family ``losses``) on the
members' flattened pairs, and the metrics use :func:`pyalign.uncertainty.preference_uncertainty`;
both reach the core through their own families' public functions and the ops layer."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyalign import _checks
from pyalign._metrics import Metrics
from pyalign.losses.reward_model import reward_model_loss
from pyalign.uncertainty.ensembles import preference_uncertainty

__all__ = ["EnsembleRewardHead", "BOOTSTRAP_METHODS"]


BOOTSTRAP_METHODS = ("bernoulli", "poisson")
_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu}

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_STREAM_INIT, _STREAM_BOOTSTRAP = 1, 2
_POISSON_TERMS = 24  # P(Poisson(1) > 23) ~ 1e-24: below the 2^-53 resolution of the uniforms


def _splitmix64(x: int) -> int:
    """splitmix64's output function (Steele, Lea & Flood 2014) on a Python int, mod 2^64."""
    z = (x + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def _member_keys(seed: int, members: int, stream: int) -> list[int]:
    """One 64-bit key per member: splitmix64(splitmix64(seed + golden * stream) ^ member)."""
    base = _splitmix64((seed + _GOLDEN * stream) & _MASK64)
    return [_splitmix64(base ^ m) for m in range(members)]


def _shr(z: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 tensors (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _splitmix64_tensor(x: Tensor) -> Tensor:
    """splitmix64's output function on int64 tensors (two's-complement wrap-around = mod 2^64)."""
    z = x + _signed(_GOLDEN)
    z = (z ^ _shr(z, 30)) * _signed(0xBF58476D1CE4E5B9)
    z = (z ^ _shr(z, 27)) * _signed(0x94D049BB133111EB)
    return z ^ _shr(z, 31)


def _poisson1_cdf(dtype, device) -> Tensor:
    terms, p = [], math.exp(-1.0)
    for k in range(_POISSON_TERMS):
        terms.append(p)
        p /= k + 1
    return torch.tensor(terms, dtype=torch.float64).cumsum(0).to(dtype=dtype, device=device)


class EnsembleRewardHead(nn.Module):
    """M reward heads over shared features, evaluated as one batched GEMM (deep ensembles,
    Lakshminarayanan et al. 2017), with the online bootstrap for diversity (Oza & Russell 2001;
    Osband et al. 2016, arXiv:1602.04621).

    Each member is a linear head ``r_m(x) = w_m . x (+ b_m)`` (``hidden=None``) or a two-layer MLP
    ``r_m(x) = w_m . act(x U_m + c_m) (+ b_m)`` with ``hidden`` units. Parameters: ``weight``
    ``[M, F]`` (linear) or ``hidden_weight`` ``[M, F, H]``, ``hidden_bias`` ``[M, H]`` and
    ``weight`` ``[M, H]`` (MLP), and ``bias`` ``[M]`` with ``bias=True``. Members are initialized
    independently, member m from a generator seeded by a hash of ``(seed, m)`` (so member m is the
    same whatever M): weights and hidden biases uniform in ``+-1/sqrt(fan_in)`` as ``nn.Linear``,
    the output bias 0 (the Bradley-Terry loss does not see a reward offset, so a random one would be
    a disagreement no data can resolve).

    ``forward(features [..., F]) -> [M, ...]``: every member's reward, in the module's dtype
    (features of another float dtype are cast to it), ready for :func:`aggregate_rewards`,
    :func:`preference_uncertainty` and :func:`uncertainty_weights`. The linear heads are one
    ``addmm`` over all members; the MLP's first layer one ``baddbmm`` over the members (the
    features broadcast, not copied per member), its output layer one batched matrix-vector product.

    Bootstrap (``bootstrap="bernoulli"`` or ``"poisson"``): each (member, example) pair gets a weight
    fixed by ``seed`` — a counter-based hash of ``(seed, member, example_id)`` gives a uniform ``u``
    in [0, 1) with 53 bits, so the same example gets the same weight in every epoch whatever the
    batching, order or device: with ``s`` splitmix64's output function (Steele, Lea & Flood 2014)
    and all arithmetic mod 2^64, ``key_m = s(s(seed + 2 * 0x9E3779B97F4A7C15) ^ m)`` and ``u =
    (s(key_m ^ example_id) >> 11) / 2^53``. ``"bernoulli"``: ``1[u < bootstrap_p] / bootstrap_p``
    (kept with probability ``bootstrap_p``, mean 1); ``"poisson"``: the Poisson(1) count with CDF
    above ``u`` (inverse CDF; mean 1, the online approximation of resampling with replacement).
    """

    def __init__(self, in_features: int, members: int, *, hidden: Optional[int] = None,
                 bootstrap: Optional[str] = None, bootstrap_p: float = 0.5, seed: int = 0,
                 activation: str = "relu", bias: bool = False, device=None, dtype=None):
        super().__init__()
        for name, v in (("in_features", in_features), ("members", members)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        if hidden is not None and (isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1):
            raise ValueError(f"hidden: expected None (linear heads) or an int >= 1, got {hidden!r}")
        if bootstrap is not None:
            _checks.choice(bootstrap, "bootstrap", (None,) + BOOTSTRAP_METHODS)
        bootstrap_p = _checks.positive(bootstrap_p, "bootstrap_p")
        if bootstrap_p > 1:
            raise ValueError(f"bootstrap_p: expected a keep probability in (0, 1], got {bootstrap_p!r}")
        _checks.integer(seed, "seed")
        _checks.choice(activation, "activation", tuple(_ACTIVATIONS))
        if not isinstance(bias, bool):
            raise TypeError(f"bias: expected a bool, got {bias!r}")
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            raise TypeError(f"dtype: expected a floating dtype, got {dtype}")
        self.in_features, self.members, self.hidden = in_features, members, hidden
        self.bootstrap, self.bootstrap_p, self.seed, self.activation = bootstrap, bootstrap_p, seed, activation
        m, f, h = members, in_features, hidden
        gen_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        fan_out = f if h is None else h
        ws, hws, hbs = [], [], []
        for key in _member_keys(seed & _MASK64, m, _STREAM_INIT):
            g = torch.Generator().manual_seed(key >> 1)  # manual_seed takes [0, 2^63)
            if h is not None:
                bound = 1.0 / math.sqrt(f)
                hws.append((torch.rand(f, h, generator=g, dtype=gen_dtype) * 2 - 1) * bound)
                hbs.append((torch.rand(h, generator=g, dtype=gen_dtype) * 2 - 1) * bound)
            ws.append((torch.rand(fan_out, generator=g, dtype=gen_dtype) * 2 - 1) / math.sqrt(fan_out))
        kw = {"device": device, "dtype": dtype}
        if h is not None:
            self.hidden_weight = nn.Parameter(torch.stack(hws).to(**kw))
            self.hidden_bias = nn.Parameter(torch.stack(hbs).to(**kw))
        else:
            self.register_parameter("hidden_weight", None)
            self.register_parameter("hidden_bias", None)
        self.weight = nn.Parameter(torch.stack(ws).to(**kw))
        self.bias = nn.Parameter(torch.zeros(m, **kw)) if bias else None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, members={self.members}, hidden={self.hidden}, "
                f"bootstrap={self.bootstrap!r}, bootstrap_p={self.bootstrap_p}, seed={self.seed}, "
                f"activation={self.activation!r}, bias={self.bias is not None}")

    def _features(self, x, name: str) -> Tensor:
        _checks.float_tensor(x, name)
        _checks.same_device(("weight", self.weight), (name, x))
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"{name}: expected shape [..., {self.in_features}] (in_features), got {tuple(x.shape)}")
        return x

    def forward(self, features: Tensor) -> Tensor:
        """Every member's reward ``[M, ...]`` of ``features`` ``[..., F]``."""
        x = self._features(features, "features")
        lead, m = tuple(x.shape[:-1]), self.members
        x2 = x.reshape(-1, self.in_features).to(self.weight.dtype)
        n = x2.shape[0]
        if self.hidden is None:
            out = self.weight @ x2.T if self.bias is None else torch.addmm(self.bias.unsqueeze(1), self.weight, x2.T)
        else:
            pre = torch.baddbmm(self.hidden_bias.unsqueeze(1), x2.unsqueeze(0).expand(m, n, self.in_features),
                                self.hidden_weight)                                   # [M, N, H]
            act = _ACTIVATIONS[self.activation](pre)
            out = torch.bmm(act, self.weight.unsqueeze(2)).squeeze(2)                 # [M, N]
            if self.bias is not None:
                out = out + self.bias.unsqueeze(1)
        return out.reshape((m,) + lead)

    def bootstrap_weights(self, example_ids: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The bootstrap weights ``[M, P]`` of the examples ``example_ids`` ``[P]`` (int32/int64),
        a pure function of ``(seed, member, example_id)`` (see the class docstring); all ones when
        ``bootstrap`` is None. ``dtype`` defaults to the module's (fp32 for fp16/bf16 modules)."""
        ids = self._example_ids(example_ids, None)
        if dtype is None:
            dtype = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        if self.bootstrap is None:
            return torch.ones(self.members, ids.shape[0], dtype=dtype, device=ids.device)
        keys = torch.tensor([_signed(k) for k in _member_keys(self.seed & _MASK64, self.members, _STREAM_BOOTSTRAP)],
                            dtype=torch.int64, device=ids.device)
        h = _splitmix64_tensor(keys.unsqueeze(1) ^ ids.to(torch.int64).unsqueeze(0))    # [M, P]
        u = _shr(h, 11).to(torch.float64) * (2.0 ** -53)
        if self.bootstrap == "bernoulli":
            w = (u < self.bootstrap_p).to(torch.float64) / self.bootstrap_p
        else:
            w = torch.searchsorted(_poisson1_cdf(torch.float64, ids.device), u, right=True).to(torch.float64)
        return w.to(dtype)

    def _example_ids(self, example_ids, p: Optional[int]) -> Tensor:
        _checks.index_tensor(example_ids, "example_ids")
        _checks.same_device(("weight", self.weight), ("example_ids", example_ids))
        if example_ids.dim() != 1 or (p is not None and example_ids.shape[0] != p):
            want = "[P]" if p is None else f"[{p}] (one per pair)"
            raise ValueError(f"example_ids: expected shape {want}, got {tuple(example_ids.shape)}")
        return example_ids

    def loss(self, chosen_features: Tensor, rejected_features: Tensor, *, example_ids: Optional[Tensor] = None,
             margin: Union[Tensor, float, None] = None, center_rewards_coefficient: Optional[float] = None,
             reduction: str = "mean"):
        """Every member's Bradley-Terry loss in one call; returns ``(loss, metrics)``.

        ``chosen_features``/``rejected_features`` ``[P, F]``: the features of P preference pairs.
        Both go through one forward (``[2P, F]``; linear heads: one GEMM each, without the copy), and
        :func:`pyalign.losses.reward_model_loss` runs once on the ``M * P`` flattened pairs with the
        bootstrap weights ``w_mi`` as its
        ``weights`` (``margin`` — a number or ``[P]`` — and ``center_rewards_coefficient`` as there,
        shared by the members). With ``l_mi = -log sigmoid(r_m(c_i) - r_m(r_i) - margin_i) +
        center (r_m(c_i) + r_m(r_i))^2``:

        - ``reduction="mean"``: ``sum_m (1/P) sum_i w_mi l_mi`` — the sum over members of each
          member's mean (bootstrap-weighted) loss over the batch, so each member's gradient is
          what it would get trained alone;
        - ``"sum"``: ``sum_m sum_i w_mi l_mi``; ``"none"``: ``w_mi l_mi`` as ``[M, P]``.

        ``example_ids`` ``[P]`` (int32/int64, a stable id of each pair in the dataset) is required
        when ``bootstrap`` is set. Metrics: ``reward_model_loss``'s (``rewards/chosen``,
        ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``, over all members and pairs,
        unweighted) plus ``ensemble/margin_std`` (the mean over pairs of the members' margin std)
        and ``ensemble/mutual_information`` (the mean epistemic part of the preference probability,
        :func:`preference_uncertainty`), both 0 for one member.
        """
        c = self._features(chosen_features, "chosen_features")
        r = self._features(rejected_features, "rejected_features")
        if c.dim() != 2 or c.shape[0] < 1:
            raise ValueError(f"chosen_features: expected shape [P, {self.in_features}] with P >= 1, "
                             f"got {tuple(c.shape)}")
        if tuple(r.shape) != tuple(c.shape):
            raise ValueError(f"rejected_features: expected the shape of chosen_features {tuple(c.shape)}, "
                             f"got {tuple(r.shape)}")
        _checks.choice(reduction, "reduction", ("mean", "sum", "none"))
        p, m = c.shape[0], self.members
        if self.bootstrap is not None and example_ids is None:
            raise ValueError(f"example_ids: required with bootstrap={self.bootstrap!r} (a stable int64 id per "
                             "pair, so that each example keeps its bootstrap weight across epochs)")
        if example_ids is not None:
            self._example_ids(example_ids, p)
        if isinstance(margin, Tensor):
            _checks.float_tensor(margin, "margin")
            if tuple(margin.shape) != (p,):
                raise ValueError(f"margin: expected a number or a tensor [{p}] (one per pair), got {tuple(margin.shape)}")
            margin = margin.repeat(m)
        if self.hidden is None:  # linear heads: one GEMM per side, no [2P, F] copy of the features
            rc, rr = self(c), self(r.to(c.dtype))                                       # [M, P] each
        else:  # the MLP: both sides in one batched forward
            rewards = self(torch.cat([c, r.to(c.dtype)]))                               # [M, 2P]
            rc, rr = rewards[:, :p], rewards[:, p:]
        weights = None
        if self.bootstrap is not None:
            weights = self.bootstrap_weights(example_ids, dtype=rc.dtype).reshape(-1)
        loss, rm_metrics = reward_model_loss(rc.reshape(-1), rr.reshape(-1), margin=margin,
                                             center_rewards_coefficient=center_rewards_coefficient,
                                             weights=weights, reduction=reduction)
        if reduction == "mean":
            loss = loss * m
        elif reduction == "none":
            loss = loss.reshape(m, p)
        with torch.no_grad():
            rc_d, rr_d = rc.detach(), rr.detach()
            margins = rc_d - rr_d
            acc = torch.float64 if margins.dtype == torch.float64 else torch.float32
            centered = margins.to(acc)
            centered = centered - centered.mean(0)  # the population std over the members, two-pass
            margin_std = centered.square_().mean(0).sqrt_().mean()
            # one member has no epistemic part (preference_uncertainty's entropy difference leaves ulps)
            mi = preference_uncertainty(rc_d, rr_d).epistemic.mean() if m > 1 else margin_std * 0
            names = list(rm_metrics) + ["ensemble/margin_std", "ensemble/mutual_information"]
            values = torch.stack([rm_metrics[k] for k in rm_metrics] + [margin_std.to(rm_metrics.values.dtype),
                                                                         mi.to(rm_metrics.values.dtype)])
        return loss, Metrics(values, {k: i for i, k in enumerate(names)})
