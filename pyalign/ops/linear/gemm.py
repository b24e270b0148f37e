"""The GEMMs of the fused linear head: the chunk's logits, ``dhidden = g @ W``, the fp32
accumulation of ``dW`` for low-precision weights, and the probes of what the device and torch offer
(oneDNN's matmul on CPU, fp32-output products on CUDA), each made once and remembered."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pyalign import _overrides

# The fp32 staging block of the low-precision dW accumulation is at most this fraction of the
# logits buffer (see accumulate_dw).
DW_BLOCK_FRACTION = 8

_MM_OUT_DTYPE = {}  # device type -> whether torch.mm(..., out_dtype=float32) works there


def _mm_fp32(a: Tensor, b: Tensor) -> Optional[Tensor]:
    """``a @ b`` of bf16/fp16 operands produced directly in fp32 (no rounding of the product), where
    torch offers it for the device (``torch.mm(out_dtype=...)``, CUDA); None elsewhere."""
    dev = a.device.type
    if _MM_OUT_DTYPE.get(dev) is False:
        return None
    try:
        out = torch.mm(a, b, out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError):
        _MM_OUT_DTYPE[dev] = False
        return None
    _MM_OUT_DTYPE[dev] = True
    return out


def accumulate_dw(dw_acc: Tensor, g: Tensor, h: Tensor) -> None:
    """``dw_acc += g.T @ h`` for one chunk (``g [c, V]``, ``h [c, H]``).

    Same dtype (fp32/fp64): one in-place ``addmm_``. bf16/fp16 chunk into the fp32 accumulator: the
    product is formed in fp32 and never rounded to the low precision, block by block over V so the
    fp32 staging stays at most ``1/DW_BLOCK_FRACTION`` of the logits buffer (no ``[V, H]``
    temporary): with ``torch.mm(out_dtype=float32)`` where the device has it (a ``[Vb, H]`` fp32
    block, tensor-core speed), else ``addmm_`` on fp32 copies of the blocks (``[c, Vb]``).
    """
    if dw_acc.dtype == g.dtype:
        dw_acc.addmm_(g.t(), h)
        return
    c, V = g.shape
    H = h.shape[1]
    cap = max(1 << 20, c * V * g.element_size() // DW_BLOCK_FRACTION)
    vb = max(64, cap // (4 * max(H, c, 1)))
    h32 = None
    for v0 in range(0, V, vb):
        v1 = min(V, v0 + vb)
        part = _mm_fp32(g[:, v0:v1].t(), h) if g.device.type != "cpu" else None
        if part is not None:
            dw_acc[v0:v1] += part
            continue
        if h32 is None:
            h32 = h.to(dw_acc.dtype)
        dw_acc[v0:v1].addmm_(g[:, v0:v1].t().to(dw_acc.dtype), h32)


_ADDMM_FP32 = {}  # device -> whether torch.addmm(acc, a, b, out_dtype=float32, out=acc) accumulates correctly


def _addmm_fp32_ok(device: torch.device) -> bool:
    """Whether ``torch.addmm(acc, a, b, out_dtype=float32, out=acc)`` with bf16 ``a, b`` adds the
    fp32 product into ``acc`` in place here (checked once per device on a tiny exact case: the op
    exists on CUDA in recent torch only, and its dtype rules changed between releases)."""
    key = str(device)
    if key in _ADDMM_FP32:
        return _ADDMM_FP32[key]
    ok = False
    if device.type != "cpu" and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        try:
            a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], device=device).to(torch.bfloat16)
            acc = torch.full((2, 2), 0.5, device=device)
            r = torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
            want = torch.tensor([[7.5, 10.5], [15.5, 22.5]], device=device)
            ok = r.data_ptr() == acc.data_ptr() and bool(torch.equal(acc, want))
        except (RuntimeError, TypeError, NotImplementedError):
            ok = False
        _ADDMM_FP32[key] = ok
    return ok


def acc_mm(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` with ``acc`` in the accumulation dtype. Same dtype: ``addmm_``. bf16/fp16
    operands into fp32: the product in fp32 in place (``addmm(out_dtype=float32)``) where the device
    has it, else an fp32 product (``mm(out_dtype=float32)``), else (CPU: torch has neither) the
    product in the operands' dtype (fp32-accumulated inside the GEMM, rounded once) added in fp32."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
        return
    if _addmm_fp32_ok(acc.device):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        return
    part = _mm_fp32(a, b) if a.device.type != "cpu" else None
    acc += torch.mm(a, b) if part is None else part


# CPU fp32: the GEMMs whose one side is the whole vocabulary (the chunk's logits ``h @ W.T`` and
# ``dh = g @ W``) run through oneDNN's matmul (``mkldnn::_linear_pointwise``, the op torch.compile's
# CPU backend emits for linear layers), not the BLAS behind ``torch.mm``: at chunk shapes (a few
# hundred rows against V = 32000, H = 1024) it measured 185-204 GFLOP/s against MKL sgemm's 135-166
# on the 2-core EPYC (fp32 arithmetic either way, bitwise the same for 1 and 2 threads). It returns
# a fresh tensor (no ``out=``), so the chunk's logits buffer is allocated per chunk there. ``dW``
# stays ``addmm_`` (it accumulates in place, and there BLAS was the faster).
# ``pyalign.overrides(gemm="blas")`` makes every GEMM a BLAS one (tests, bench).
_ONEDNN_WORKS: Optional[bool] = None  # set by the first call: False if the op is missing or fails


def use_onednn(*tensors: Optional[Tensor]) -> bool:
    """Whether the vocabulary-sized GEMMs of these operands go through oneDNN (see above): CPU, all
    fp32 and contiguous, oneDNN present and enabled (``torch.backends.mkldnn``), no override."""
    ts = [t for t in tensors if t is not None]
    return (_overrides.current().gemm == "auto" and _ONEDNN_WORKS is not False and ts[0].device.type == "cpu"
            and all(t.dtype == torch.float32 and t.is_contiguous() for t in ts)
            and torch.backends.mkldnn.is_available() and torch._C._get_mkldnn_enabled())


def _onednn_linear(x: Tensor, w: Tensor, bias: Optional[Tensor]) -> Optional[Tensor]:
    """``x @ w.T + bias`` by oneDNN, or None (remembered) where the op is missing or refuses."""
    global _ONEDNN_WORKS
    try:
        out = torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")
    except (AttributeError, RuntimeError, NotImplementedError):
        _ONEDNN_WORKS = False
        return None
    _ONEDNN_WORKS = True
    return out


def logits_buffer(rows: int, hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Optional[Tensor]:
    """The reused ``[rows, V]`` logits buffer of a token-outer loop, or None where the chunk GEMM
    goes through oneDNN (which makes its own output)."""
    if use_onednn(hidden, weight, bias):
        return None
    return torch.empty(rows, weight.shape[0], dtype=hidden.dtype, device=hidden.device)


def logits_into(buf: Optional[Tensor], h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The chunk's logits ``h @ weight.T + bias``: into ``buf``, or (``buf`` None, see
    :func:`logits_buffer`) a fresh tensor from oneDNN."""
    if buf is None:
        out = _onednn_linear(h, weight, bias) if use_onednn(h, weight, bias) else None
        if out is not None:
            return out
        buf = torch.empty(h.shape[0], weight.shape[0], dtype=h.dtype, device=h.device)
    if bias is None:
        return torch.mm(h, weight.t(), out=buf)
    return torch.addmm(bias, h, weight.t(), out=buf)


def dhidden_into(out: Tensor, g: Tensor, weight: Tensor) -> None:
    """``out = g @ weight`` (the chunk's ``dhidden`` rows), by oneDNN where :func:`use_onednn`."""
    part = _onednn_linear(g, weight.t(), None) if use_onednn(g, weight) else None
    if part is None:
        torch.mm(g, weight, out=out)
    else:
        out.copy_(part)
