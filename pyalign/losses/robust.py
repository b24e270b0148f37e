"""Group-robust preference optimization: online mirror-ascent weights over groups of examples.

The weights act on the per-example losses of any pyalign loss (``reduction="none"``), so they
reach the core only through that loss; this module is plain PyTorch. The pairwise losses' other
robust option, the KL-DRO reduction over pairs (``reduction="dro"``), lives with their reductions
(:func:`pyalign.losses.dpo_loss`)."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from pyalign import _checks
from pyalign._metrics import Metrics
from pyalign._tensors import acc_dtype

__all__ = ["GroupRobustWeights"]


def _per_group(x, name: str, n_groups: int, *, allow_zero: bool) -> Tensor:
    """A float64 CPU vector of ``n_groups`` finite numbers, > 0 (>= 0 with ``allow_zero``)."""
    if isinstance(x, Tensor):
        t = x.detach().to("cpu", torch.float64)
    else:
        try:
            t = torch.as_tensor(x, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name}: expected a tensor or a sequence of {n_groups} numbers, "
                            f"got {type(x).__name__}") from None
    if t.dim() == 0:
        t = t.expand(n_groups)
    if tuple(t.shape) != (n_groups,):
        raise ValueError(f"{name}: expected a number or {n_groups} values (one per group), got shape {tuple(t.shape)}")
    bound = ">= 0" if allow_zero else "> 0"
    if not bool(torch.isfinite(t).all()) or not bool(((t >= 0) if allow_zero else (t > 0)).all()):
        raise ValueError(f"{name}: expected finite values {bound}, got {t.tolist()}")
    return t.clone()


class GroupRobustWeights(nn.Module):
    """Group weights on the simplex, updated by online mirror ascent (exponentiated gradient) on the
    per-group losses: Group Robust Preference Optimization (GRPO; Ramesh et al. 2024,
    arXiv:2405.20304) and the online group DRO of Sagawa et al. 2020 (arXiv:1911.08731,
    Algorithm 1), which minimize the worst group's loss ``max_g L_g`` through
    ``min_theta max_{alpha in simplex} sum_g alpha_g L_g(theta)``.

    Called as ``loss, metrics = weights(per_example_losses, group_ids)`` with ``per_example_losses``
    ``[N]`` (any pyalign loss with ``reduction="none"``, or any differentiable per-example loss) and
    ``group_ids`` ``[N]`` (int32/int64 in ``[0, n_groups)``). With ``L_g`` the mean loss of the
    batch's examples of group g (``n_g`` of them), in training mode every group present in the
    batch takes one step ::

        alpha_g <- alpha_g * exp(step_size * (S_g + c_g))     (present groups; absent ones keep alpha_g)
        alpha   <- alpha / sum(alpha)

    where ``S_g`` is ``L_g`` (or its running average, ``loss_ema``) and ``c_g`` the group-size
    adjustment (0 by default); the step runs in log space (``softmax(log alpha + step)``), so a
    large loss cannot overflow it. It returns the loss ``sum_g alpha_g L_g`` with the updated
    weights (groups absent from the batch contribute 0): its gradient reaches each example as
    ``alpha_g / n_g`` for its group g, never the weights, which are detached state. In eval mode
    (``.eval()``) the weights are used as they are, without a step.

    Args:
        n_groups: the number of groups G (>= 1).
        step_size: the mirror-ascent step eta (> 0). Sagawa et al. use 0.01; larger steps track the
            worst group faster and oscillate more.
        initial_weights: ``[G]`` positive numbers (normalized to sum 1); default uniform. A weight
            under multiplicative updates stays positive, so zero is refused (leave such a group's
            examples out instead).
        size_adjustment: the group adjustment of Sagawa et al. 2020: ``c_g = C /
            sqrt(group_sizes_g)`` added to the group losses in the update (not to the returned loss),
            which favours small groups, whose training loss underestimates their test loss. A number
            C >= 0 for all groups or ``[G]`` values; needs ``group_sizes``.
        group_sizes: ``[G]`` positive training-set sizes of the groups (not the batch counts).
        loss_ema: ``None`` (default) or gamma in ``(0, 1]``: the update uses the running average
            ``S_g <- (1 - gamma) S_g + gamma L_g`` of each group's loss (updated only when the group
            is present, started from its first loss) instead of the batch's ``L_g``, which smooths
            the weights when groups have few examples per batch. The returned loss still uses ``L_g``.
        device, dtype: of the state (default float32; use float64 for long runs where a weight may
            fall below float32's range, as after ~100 / step_size steps of one group leading by a
            loss gap of 1, and stay 0).

    The state is buffers: ``weights`` ``[G]`` (the simplex) and, with ``loss_ema``, ``loss_ema``
    ``[G]`` and ``ema_started`` ``[G]`` (bool); they move with ``.to(device)`` and checkpoint with
    ``state_dict`` / ``load_state_dict``. ``reset()`` restores the initial state. The computation runs
    in float32 (float64 for float64 losses); the loss is returned in that dtype.

    Metrics (a :class:`pyalign.losses.Metrics` of detached 0-d tensors): ``group_weight/g`` (alpha_g
    after the step), ``group_loss/g`` (``L_g``, 0 for a group absent from the batch),
    ``group_count/g`` (``n_g`` in the batch), ``worst_group_loss`` (the largest ``L_g`` over the
    groups present). Under data parallelism every rank steps on its own batch: pass the gathered
    losses and group ids to keep the ranks' weights equal.

    Raises ValueError / TypeError for ``n_groups < 1``, ``step_size <= 0``, bad options, a shape
    mismatch, non-integer ids, and (in eager mode: one host sync per call) ids outside ``[0,
    n_groups)`` or non-finite losses; under ``torch.compile`` (which traces the call with no graph
    break, the state updates included) the data checks are skipped and an example with an id out
    of range belongs to no group. The per-group sums are deterministic (the same bits run to run):
    in eager mode on CPU a sequential ``index_add`` in example order; on CUDA and under
    ``torch.compile`` plain row sums over a ``[G, N]`` boolean membership mask (its memory).
    """

    def __init__(self, n_groups: int, *, step_size: float = 0.01,
                 initial_weights: Union[Tensor, Sequence[float], None] = None,
                 size_adjustment: Union[float, Tensor, Sequence[float]] = 0.0,
                 group_sizes: Union[Tensor, Sequence[float], None] = None,
                 loss_ema: Optional[float] = None, device=None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        if isinstance(n_groups, bool) or not isinstance(n_groups, int):
            raise TypeError(f"n_groups: expected an int >= 1, got {n_groups!r}")
        if n_groups < 1:
            raise ValueError(f"n_groups: expected an int >= 1, got {n_groups}")
        self.n_groups = n_groups
        self.step_size = _checks.positive(step_size, "step_size")
        dtype = torch.float32 if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
        if initial_weights is None:
            init = torch.full((n_groups,), 1.0 / n_groups, dtype=torch.float64)
        else:
            init = _per_group(initial_weights, "initial_weights", n_groups, allow_zero=False)
            init = init / init.sum()
        adj = _per_group(size_adjustment, "size_adjustment", n_groups, allow_zero=True)
        if bool((adj > 0).any()):
            if group_sizes is None:
                raise ValueError("group_sizes: required with size_adjustment > 0 (the training-set size of "
                                 "each group, for the adjustment C / sqrt(size))")
            adj = adj / _per_group(group_sizes, "group_sizes", n_groups, allow_zero=False).sqrt()
        elif group_sizes is not None:
            _per_group(group_sizes, "group_sizes", n_groups, allow_zero=False)
        if loss_ema is not None:
            gamma = _checks.positive(loss_ema, "loss_ema")
            if gamma > 1:
                raise ValueError(f"loss_ema: expected None or a number in (0, 1], got {loss_ema!r}")
            loss_ema = gamma
        self.loss_ema_rate = loss_ema
        kw = dict(device=device, dtype=dtype)
        self.register_buffer("weights", init.to(**kw))
        self.register_buffer("initial_weights", init.to(**kw), persistent=False)
        self.register_buffer("adjustment", adj.to(**kw), persistent=False)
        self._adjusted = bool((adj > 0).any())  # the adjustment buffer is fixed at construction
        if loss_ema is not None:
            self.register_buffer("loss_ema", torch.zeros(n_groups, **kw))
            self.register_buffer("ema_started", torch.zeros(n_groups, dtype=torch.bool, device=device))
        self._metric_index = {}
        for kind in ("group_weight", "group_loss", "group_count"):
            for g in range(n_groups):
                self._metric_index[f"{kind}/{g}"] = len(self._metric_index)
        self._metric_index["worst_group_loss"] = len(self._metric_index)

    def extra_repr(self) -> str:
        s = f"n_groups={self.n_groups}, step_size={self.step_size}"
        if self.loss_ema_rate is not None:
            s += f", loss_ema={self.loss_ema_rate}"
        return s

    @torch.no_grad()
    def reset(self) -> None:
        """Restores the initial weights (and clears the running losses)."""
        self.weights.copy_(self.initial_weights)
        if self.loss_ema_rate is not None:
            self.loss_ema.zero_()
            self.ema_started.zero_()

    def _check(self, losses, group_ids) -> None:
        _checks.float_tensor(losses, "per_example_losses")
        if not isinstance(group_ids, Tensor):
            raise TypeError(f"group_ids: expected a torch.Tensor, got {type(group_ids).__name__}")
        if group_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"group_ids: expected an int32 or int64 tensor of group indices, got {group_ids.dtype}")
        if losses.dim() != 1 or losses.shape[0] < 1:
            raise ValueError(f"per_example_losses: expected a 1-d tensor [N] with N >= 1 (a loss with "
                             f"reduction='none'), got shape {tuple(losses.shape)}")
        if tuple(group_ids.shape) != tuple(losses.shape):
            raise ValueError(f"group_ids: expected shape {tuple(losses.shape)} like per_example_losses, "
                             f"got {tuple(group_ids.shape)}")
        _checks.same_device(("per_example_losses", losses), ("group_ids", group_ids))
        if losses.device != self.weights.device:
            raise ValueError(f"per_example_losses: on {losses.device}, but the GroupRobustWeights state is on "
                             f"{self.weights.device}; move the module with .to(device)")

    def _check_values(self, losses: Tensor, group_ids: Tensor) -> None:
        """The data checks (one host sync): ids in ``[0, n_groups)``, finite losses."""
        low, high, finite = torch.stack([group_ids.min() < 0, group_ids.max() >= self.n_groups,
                                         torch.isfinite(losses.detach()).all()]).tolist()
        if low or high:
            bad = group_ids[(group_ids < 0) | (group_ids >= self.n_groups)][0]
            raise ValueError(f"group_ids: expected values in [0, {self.n_groups}) (n_groups={self.n_groups}), "
                             f"got {int(bad)}")
        if not finite:
            raise ValueError("per_example_losses: contains NaN or infinite values; the group weights' "
                             "update needs finite losses")

    def _group_sums(self, x: Tensor, group_ids: Tensor):
        """``(sums, counts, member, checked)``: the sums and counts [G] of each group's examples
        (detached, counts in x's dtype), the ``[G, N]`` membership mask (None on the eager CPU
        path) and whether the losses' finiteness is checked already.

        Eager on CPU: ``index_add`` (a sequential loop over the examples in order, so the same bits
        run to run) and ``bincount`` for the counts; index_add's bounds check stands in for the ids' range check
        (the detailed check runs when it fails), and the finiteness of the returned loss for the
        losses' (a NaN or infinite loss makes the loss NaN or infinite), checked before the state
        changes. Elsewhere (CUDA, where index_add adds with float atomics, and traced graphs, which
        may lower it to atomics): a ``[G, N]`` membership mask and plain row sums, the same bits run
        to run on every device; an id out of range belongs to no group."""
        g = self.n_groups
        x = x.detach()
        if x.device.type == "cpu" and not torch.compiler.is_compiling():
            try:
                sums = torch.zeros(g, dtype=x.dtype).index_add_(0, group_ids, x)
            except (IndexError, RuntimeError):
                self._check_values(x, group_ids)
                raise
            counts = torch.bincount(group_ids, minlength=g).to(x.dtype)  # the ids are in range (index_add)
            return sums, counts, None, False
        if not torch.compiler.is_compiling():
            self._check_values(x, group_ids)
        member = group_ids[None, :] == torch.arange(g, device=group_ids.device)[:, None]
        sums = torch.where(member, x[None, :], torch.zeros((), dtype=x.dtype, device=x.device)).sum(1)
        return sums, member.sum(1).to(x.dtype), member, True

    def forward(self, per_example_losses: Tensor, group_ids: Tensor):
        """``(loss, metrics)``: the group-weighted loss ``sum_g alpha_g L_g`` (a 0-d tensor) after the
        weights' step (training mode only), and the metrics; see the class."""
        self._check(per_example_losses, group_ids)
        acc = acc_dtype(per_example_losses)
        x = per_example_losses.to(acc)
        # everything but the loss is detached (the sums are of x.detach(); the state is buffers),
        # so no grad-mode switch is needed
        sums, counts, member, checked = self._group_sums(x, group_ids)
        present = counts > 0
        sizes = counts.clamp_min(1)
        means = sums / sizes  # 0 for an absent group
        signal = None
        if self.training:
            signal = means
            if self.loss_ema_rate is not None:
                old = self.loss_ema.to(acc)
                blended = torch.where(self.ema_started, old + self.loss_ema_rate * (means - old), means)
                signal = torch.where(present, blended, old)
            if self.loss_ema_rate is None and not self._adjusted:
                step = means * self.step_size  # already 0 for the absent groups
            else:
                step = torch.where(present, self.step_size * (signal + self.adjustment.to(acc)),
                                   torch.zeros_like(signal))
            alpha = torch.softmax(self.weights.to(acc).log() + step, 0)
        else:
            alpha = self.weights.to(acc)
        # sum_g alpha_g L_g = sum_i (alpha_g / n_g)[g_i] l_i: one dot product, whose gradient is each
        # example's alpha_g / n_g (one backward step)
        per_group = alpha / sizes
        coef = per_group.index_select(0, group_ids) if member is None else \
            torch.where(member, per_group[:, None], torch.zeros((), dtype=acc, device=x.device)).sum(0)
        loss = torch.dot(coef, x)
        if not checked and not math.isfinite(float(loss.detach())):  # NaN/inf losses, or a sum that overflows
            self._check_values(x, group_ids)
        if self.training:  # the state changes only after the checks
            if self.loss_ema_rate is not None:
                self.loss_ema.copy_(signal)
                self.ema_started.logical_or_(present)
            self.weights.copy_(alpha)
        worst = torch.where(present, means, -math.inf).max()
        values = torch.cat([alpha, means, counts, worst[None]])
        return loss, Metrics(values, self._metric_index)
