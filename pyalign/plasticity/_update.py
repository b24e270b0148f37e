"""Argument handling of the local rules and the call into the fused update kernel."""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch
from torch import Tensor

from pyalign import _checks
from pyalign._tensors import acc_dtype
from pyalign.ops import plasticity as _ops
from pyalign.ops.plasticity import NORM_MODES


def check_weight(weight) -> Tensor:
    _checks.float_tensor(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-d tensor [out, in], got shape {tuple(weight.shape)}")
    return _checks.writable(weight, "weight")


def nonneg(v, name: str) -> float:
    v = _checks.finite(v, name)
    if v < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}")
    return v


def activity(t, name: str, size: int, size_name: str, weight: Tensor, validate: Optional[bool]) -> Tensor:
    _checks.float_tensor(t, name)
    _checks.same_device(("weight", weight), (name, t))
    if t.dim() < 1 or t.shape[-1] != size:
        raise ValueError(f"{name}: expected shape [..., {size}] (last dim = weight's {size_name}), "
                         f"got {tuple(t.shape)}")
    t2 = t.detach().reshape(math.prod(t.shape[:-1]), size).to(acc_dtype(weight))  # size may be 0
    if t2.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one sample, got shape {tuple(t.shape)}")
    if validate is None:
        validate = t.device.type == "cpu"
    if validate and t2.numel():
        lo, hi = torch.aminmax(t2)  # one pass; NaN and +-inf propagate to the extremes
        if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
            raise ValueError(f"{name}: contains NaN or infinite values")
    return t2


def activity_pair(weight, x, y, validate) -> tuple[Tensor, Tensor]:
    out_f, in_f = weight.shape
    x2 = activity(x, "x", in_f, "in_features", weight, validate)
    y2 = activity(y, "y", out_f, "out_features", weight, validate)
    if x2.shape[0] != y2.shape[0]:
        raise ValueError(f"y: expected the leading shape of x ({tuple(x.shape[:-1])}), got {tuple(y.shape[:-1])}")
    return x2, y2


class Common:
    """Validated learning rate, decay, bounds and norm of one update."""

    def __init__(self, lr, weight_decay, w_min, w_max, norm, norm_mode):
        self.lr = nonneg(lr, "lr")
        self.weight_decay = nonneg(weight_decay, "weight_decay")
        self.w_min = -math.inf if w_min is None else _checks.finite(w_min, "w_min")
        self.w_max = math.inf if w_max is None else _checks.finite(w_max, "w_max")
        if self.w_min > self.w_max:
            raise ValueError(f"w_min: expected w_min <= w_max, got {w_min!r} > {w_max!r}")
        _checks.choice(norm_mode, "norm_mode", ("max", "exact"))
        self.norm = 0.0 if norm is None else _checks.positive(norm, "norm")
        self.norm_mode = 0 if norm is None else NORM_MODES[norm_mode]

    def linear_part(self) -> "Common":
        """The same update without the norm constraint and the bounds."""
        part = copy.copy(self)
        part.w_min, part.w_max, part.norm, part.norm_mode = -math.inf, math.inf, 0.0, 0
        return part

    def constraints_part(self) -> "Common":
        """Only the norm constraint and the bounds (keep = 1, lr = 0): for a weight already updated."""
        part = copy.copy(self)
        part.lr = part.weight_decay = 0.0
        return part


def apply_update(weight: Tensor, cm: Common, g: Optional[Tensor], *, g2=None, trace=None, row_coef=None,
           a=1.0, b=0.0, c=0.0, lam=0.0, s=1.0) -> Tensor:
    """Runs the fused kernel (coefficients as in plasticity.h: PlasticCoeffs); handles weights whose
    rows are not contiguous through a copy."""
    keep = 1.0 - cm.lr * cm.weight_decay
    args = (g, g2, trace, row_coef, float(a), float(b), float(c), float(lam), float(s), cm.lr, keep,
            cm.w_min, cm.w_max, cm.norm, cm.norm_mode)
    with torch.no_grad():
        if weight.stride(1) == 1 or weight.shape[1] <= 1:
            _ops.plastic_update_(weight, *args)
        else:
            w = weight.contiguous()
            _ops.plastic_update_(w, *args)
            weight.copy_(w)
    return weight


# Weights of at least this many elements are updated by row blocks of about this many elements
# when no workspace is given (CPU): the block's GEMM result stays in cache for the update.
_BLOCK_ELEMS = 1 << 20


def _row_blocks(weight: Tensor):
    """``(r0, r1)`` row ranges of about ``_BLOCK_ELEMS`` elements on CPU (one range on other
    devices): a pass over a block after its GEMM finds the block in cache (every term is row-local)."""
    out_f, in_f = weight.shape
    rows = out_f if weight.device.type != "cpu" else max(1, _BLOCK_ELEMS // max(in_f, 1))
    return [(r0, min(out_f, r0 + rows)) for r0 in range(0, out_f, rows)]


def gemm_into_weight(weight: Tensor, cm: Common, u: Tensor, v: Tensor, *, a: float, row_coef=None) -> Tensor:
    """``w' = clip(s_i ((keep - lr r_i) w + lr a u^T v))`` with the GEMM accumulating into the weight
    itself (``addmm_``), so no weight-sized product is allocated, written or read back: the fused
    kernel applies the row factor ``keep - lr r_i`` before the GEMM (its update with G = 0) and the
    norm scaling and clipping after it, each only where there is one, block by block."""
    beta = 1.0 if row_coef is not None else 1.0 - cm.lr * cm.weight_decay  # the row factor holds keep
    linear = cm.linear_part() if row_coef is not None else None
    constraints = cm.constraints_part() if cm.norm_mode or math.isfinite(cm.w_min) or math.isfinite(cm.w_max) \
        else None
    with torch.no_grad():
        for r0, r1 in _row_blocks(weight):
            w = weight[r0:r1]
            if linear is not None:
                apply_update(w, linear, None, row_coef=row_coef[r0:r1])
            w.addmm_(u[:, r0:r1].t(), v, beta=beta, alpha=cm.lr * a)
            if constraints is not None:
                apply_update(w, constraints, None)
    return weight


def gemm_into_trace(weight: Tensor, cm: Common, trace: Tensor, u: Tensor, v: Tensor, *, lam: float, s: float,
                    a: float) -> Tensor:
    """The eligibility-trace update ``e <- lam e + s u^T v`` with the GEMM accumulating into the
    trace, then ``w' = clip(s_i (keep w + lr a e))`` by the fused kernel, block by block."""
    with torch.no_grad():
        for r0, r1 in _row_blocks(weight):
            e = trace[r0:r1]
            e.addmm_(u[:, r0:r1].t(), v, beta=lam, alpha=s)
            apply_update(weight[r0:r1], cm, e, a=a)
    return weight


def outer_update(weight: Tensor, cm: Common, u: Tensor, v: Tensor, workspace: Optional[Tensor], *, g2_factors=None,
                 trace=None, row_coef=None, **coefs) -> Tensor:
    """:func:`apply_update` with ``g = u^T v`` (and ``g2`` from the factors ``g2_factors``). A weight in
    the products' dtype (fp32, fp64) with no trace and no second product is updated by
    :func:`gemm_into_weight`. Otherwise, with a ``workspace`` the product goes there; without one, a
    large contiguous CPU weight is updated by row blocks: each block's GEMM into one reused
    block-sized buffer, then the fused kernel on the block's rows (every term of the update is
    row-local, the row norms included), so no weight-sized product is allocated and page-faulted in,
    and the block is still in cache when the kernel reads it. Other weights get a fresh product."""
    ws = workspace_buffer(workspace, weight)
    if weight.dtype == u.dtype and g2_factors is None and trace is None and set(coefs) <= {"a"}:
        if weight.stride(1) == 1 or weight.shape[1] <= 1:
            return gemm_into_weight(weight, cm, u, v, a=coefs.get("a", 1.0), row_coef=row_coef)
        # A GEMM into a column-major weight rounds differently: the update is the same bits for
        # every layout of the weight (through a row-major copy, as apply_update does).
        w = weight.contiguous()
        gemm_into_weight(w, cm, u, v, a=coefs.get("a", 1.0), row_coef=row_coef)
        with torch.no_grad():
            return weight.copy_(w)
    if ws is not None or weight.device.type != "cpu" or not weight.is_contiguous() or weight.numel() < _BLOCK_ELEMS:
        g2 = None if g2_factors is None else outer(*g2_factors)
        return apply_update(weight, cm, outer(u, v, ws), g2=g2, trace=trace, row_coef=row_coef, **coefs)
    blocks = _row_blocks(weight)
    shape = (blocks[0][1], weight.shape[1])
    buf = torch.empty(shape, dtype=u.dtype, device=weight.device)
    buf2 = None if g2_factors is None else torch.empty(shape, dtype=u.dtype, device=weight.device)
    for r0, r1 in blocks:
        g = torch.matmul(u[:, r0:r1].t(), v, out=buf[:r1 - r0])
        g2 = None if g2_factors is None else torch.matmul(g2_factors[0][:, r0:r1].t(), g2_factors[1],
                                                          out=buf2[:r1 - r0])
        apply_update(weight[r0:r1], cm, g, g2=g2, trace=None if trace is None else trace[r0:r1],
                     row_coef=None if row_coef is None else row_coef[r0:r1], **coefs)
    return weight


def outer(y: Tensor, x: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """y^T x (one GEMM); the 1/N of the sample mean is a coefficient of the fused kernel."""
    return torch.matmul(y.t(), x, out=out)


def workspace_buffer(ws, weight: Tensor) -> Optional[Tensor]:
    """Checks a caller-provided buffer for the matmul result (reusing one avoids allocating, and
    on CPU page-faulting in, a weight-sized tensor on every update)."""
    if ws is None:
        return None
    _checks.tensor(ws, "workspace")
    if ws.dtype != acc_dtype(weight) or tuple(ws.shape) != tuple(weight.shape) or not ws.is_contiguous():
        raise ValueError(f"workspace: expected a contiguous {acc_dtype(weight)} tensor of shape {tuple(weight.shape)}, "
                         f"got {ws.dtype} {tuple(ws.shape)}")
    _checks.same_device(("weight", weight), ("workspace", ws))
    return ws
