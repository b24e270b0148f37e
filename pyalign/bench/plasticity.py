"""Bench of the plasticity family: fused rule updates and consolidation penalty vs eager PyTorch.

Each rule update (matmul included) is timed for pyalign (``pyalign``: a fresh matmul result per
call; ``pyalign_ws``: a reused workspace, as the rule objects do), for the formula written the way the
papers state it (``eager``: out of place, then copied into the weight) and for a hand-tuned
in-place eager version (``eager_inplace``), and, unless ``quick``, for ``torch.compile`` of the
out-of-place formula; ``gemm floor`` is the rules' GEMM ``y^T x`` alone (fp32, into a preallocated
output), so a fp32 rule's time as a multiple of its floor is the inverse of its speedup over that
row. The elementwise-only row reports its bandwidth (the weight and the GEMM result read, the
weight written). The consolidation penalty is timed with its gradient added to ``.grad``.

Timed interleaved and measured for peak memory by :func:`pyalign.bench.common.compare`.
"""
from __future__ import annotations

import torch

from pyalign import plasticity as P
from pyalign.bench.common import compare, compiled


LR, WD, W_MIN, W_MAX, NORM, DECAY, MOD = 1e-3, 1e-2, -0.05, 0.05, 1.0, 0.9, 0.5


def _hebb_formula(w, x, y):
    dw = y.t() @ x / x.shape[0]
    w2 = w + LR * dw - LR * WD * w
    n = w2.norm(dim=1, keepdim=True)
    w2 = w2 * torch.where(n > NORM, NORM / n, torch.ones_like(n))
    return w2.clamp(W_MIN, W_MAX)


def _hebb_inplace(w, x, y):
    h = y.t() @ x
    w.mul_(1 - LR * WD).add_(h, alpha=LR / x.shape[0])
    w.mul_((NORM / w.norm(dim=1, keepdim=True)).clamp_(max=1.0))
    w.clamp_(W_MIN, W_MAX)


def _oja_formula(w, x, y):
    return w + LR * (y.t() @ x / x.shape[0] - (y * y).mean(0)[:, None] * w)


def _oja_inplace(w, x, y):
    h = y.t() @ x
    h.div_(x.shape[0]).addcmul_((y * y).mean(0)[:, None], w, value=-1.0)
    w.add_(h, alpha=LR)


def _tf_formula(w, e, x, y):
    e2 = DECAY * e + y.t() @ x / x.shape[0]
    return w + LR * MOD * e2, e2


def _tf_inplace(w, e, x, y):
    e.mul_(DECAY).add_(y.t() @ x, alpha=1.0 / x.shape[0])
    w.add_(e, alpha=LR * MOD)


def run(device: str, quick: bool) -> list[dict]:
    out_f = in_f = 1024 if quick else 4096
    B = 64
    size = f"{out_f}x{in_f} B={B}"
    g = torch.Generator().manual_seed(0)
    rows = []

    def record(op, fns: dict, dtype, moved=None):
        rows.extend(compare("plasticity", op, f"{size} {str(dtype).replace('torch.', '')}", fns, device, reps=7,
                            bytes_moved=moved))

    for dtype in (torch.float32, torch.bfloat16):
        w = (torch.randn(out_f, in_f, generator=g) * 0.01).to(dtype).to(device)
        x = torch.randn(B, in_f, generator=g).to(dtype).to(device)
        y = torch.randn(B, out_f, generator=g).to(dtype).to(device)
        e = torch.zeros(out_f, in_f, device=device)
        xf, yf = x.float(), y.float()
        opts = dict(weight_decay=WD, w_min=W_MIN, w_max=W_MAX, norm=NORM)
        # Eager baselines compute in fp32 like the fused kernel (weights cast up and back).
        up = (lambda t: t) if dtype == torch.float32 else (lambda t: t.float())

        ws = torch.empty(out_f, in_f, device=device)  # what the rule objects keep between steps
        floor = torch.empty(out_f, in_f, device=device)
        gemm_floor = lambda: torch.mm(yf.t(), xf, out=floor)  # noqa: E731  the rules' GEMM alone (fp32)
        fns = {"pyalign": lambda: P.hebb(w, x, y, lr=LR, **opts),
               "pyalign_ws": lambda: P.hebb(w, x, y, lr=LR, workspace=ws, **opts),
               "eager": lambda: w.copy_(_hebb_formula(up(w), xf, yf))}
        if dtype == torch.float32:
            fns["eager_inplace"] = lambda: _hebb_inplace(w, xf, yf)
            fns["gemm floor"] = gemm_floor
        record("hebb+decay+norm+bounds", fns, dtype)

        fns = {"pyalign": lambda: P.oja(w, x, y, lr=LR), "pyalign_ws": lambda: P.oja(w, x, y, lr=LR, workspace=ws),
               "eager": lambda: w.copy_(_oja_formula(up(w), xf, yf))}
        if dtype == torch.float32:
            fns["eager_inplace"] = lambda: _oja_inplace(w, xf, yf)
            fns["gemm floor"] = gemm_floor
            if not quick:
                try:
                    oja_c = compiled(_oja_formula)
                    oja_c(w, xf, yf)  # compiles here, outside the timing
                    fns["compile"] = lambda: w.copy_(oja_c(w, xf, yf))
                except Exception as e:  # reported, not fatal
                    rows.append(dict(op="oja", size=size, impl="compile", median_ms=None, peak_mem_mb=None,
                                     note=f"failed: {type(e).__name__}: {str(e)[:100]}"))
        record("oja", fns, dtype)

        def tf_eager():
            w2, e2 = _tf_formula(up(w), e, xf, yf)
            w.copy_(w2)
            e.copy_(e2)
        fns = {"pyalign": lambda: P.three_factor(w, x, y, e, MOD, lr=LR, decay=DECAY),
               "pyalign_ws": lambda: P.three_factor(w, x, y, e, MOD, lr=LR, decay=DECAY, workspace=ws),
               "eager": tf_eager}
        if dtype == torch.float32:
            fns["eager_inplace"] = lambda: _tf_inplace(w, e, xf, yf)
            fns["gemm floor"] = gemm_floor
        record("three_factor", fns, dtype)

    # The elementwise part alone (matmul result given): decay + Oja term + norm + bounds.
    w = (torch.randn(out_f, in_f, generator=g) * 0.01).to(device)
    gm = torch.randn(out_f, in_f, generator=g).to(device)
    r = torch.rand(out_f, generator=g).to(device)
    keep = 1 - LR * WD
    from pyalign.ops.plasticity import plastic_update_

    def ew_eager():
        h = gm / B
        h.addcmul_(r[:, None], w, value=-1.0)
        w.mul_(keep).add_(h, alpha=LR)
        w.mul_((NORM / w.norm(dim=1, keepdim=True)).clamp_(max=1.0))
        w.clamp_(W_MIN, W_MAX)
    record("elementwise only (oja term+decay+norm+bounds)", {
        "pyalign": lambda: plastic_update_(w, gm, None, None, r, 1.0 / B, 0.0, 0.0, 0.0, 1.0, LR, keep, W_MIN, W_MAX,
                                           NORM, 1),
        "eager_inplace": ew_eager}, torch.float32, moved=3 * w.numel() * 4)  # w and the GEMM result read, w written

    # Consolidation: penalty value and its gradient over one weight-sized parameter.
    p = torch.nn.Parameter(torch.randn(out_f, in_f, generator=g).to(device))
    p.grad = torch.zeros_like(p)
    ewc = P.EWC([p], strength=1.0)
    ewc.importance = [torch.rand(out_f, in_f, generator=g).to(device)]
    ewc.anchors = [p.detach() + 0.01]
    def ewc_eager():
        p.grad.zero_()
        loss = 0.5 * (ewc.importance[0] * (p - ewc.anchors[0]) ** 2).sum()
        loss.backward()
        return loss.detach()
    record("ewc_penalty+grad", {"pyalign": ewc.penalty, "eager_autograd": ewc_eager}, torch.float32)
    return rows


if __name__ == "__main__":  # pragma: no cover
    import sys
    for r in run("cuda" if "--cuda" in sys.argv else "cpu", "--quick" in sys.argv):
        print(r)
