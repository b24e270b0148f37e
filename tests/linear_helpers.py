"""Shared helpers of the fused linear-head tests (tests/test_linear_*.py): inputs, the float64
materialized references, error measures, the GEMM counter and hypothesis settings for tests that
take the ``device`` fixture. Fixtures (``device``, ``force_path``, ``recompute_path``) are in
tests/conftest.py.

Inputs are drawn on the CPU from seeded generators and then moved, so a CPU case and its CUDA twin
see the same numbers; the float64 oracles run on the CPU, and every comparison moves both sides to
the CPU first (:func:`max_err`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, settings

from pyalign.logprob import linear_cross_entropy, linear_token_logprobs
from pyalign.reference.linear import linear_token_stats

ALL = ("entropy", "log_sum_sq_probs", "mean_logit", "is_top1")
FLOATS = ("logprobs", "entropy", "log_sum_sq_probs", "mean_logit")
LOW_TOL = {torch.bfloat16: 2 ** -6, torch.float16: 2 ** -9}  # block-by-block rounding (relative to max)

# ``@settings(WITH_DEVICE, ...)`` on a hypothesis test that takes the ``device`` fixture: the fixture
# is a constant string, so that hypothesis does not reset it between examples is harmless.
WITH_DEVICE = settings(suppress_health_check=[*settings.default.suppress_health_check,
                                              HealthCheck.function_scoped_fixture])


def examples(n: int) -> int:
    """A test's own example count, lowered by the profile's (PYALIGN_HYPOTHESIS_EXAMPLES, as the
    GPU check's sanitizer runs set it) but never raised."""
    return min(n, settings.default.max_examples)


def make(shape, H, V, dtype, device, *, bias=True, ignore=0.2, scale=1.0, seed=0):
    """``hidden [*shape, H]``, ``weight [V, H]``, ``bias [V]`` (or None) in ``dtype`` and labels with
    a fraction ``ignore`` of -100, drawn on the CPU (seeded) and moved to ``device``."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(*shape, H, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5).to(dtype).to(device)
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.5).to(dtype).to(device) if bias else None
    labels = torch.randint(0, V, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore] = -100
    return hidden, weight, b, labels.to(device)


def class_weights(V, device, seed=0):
    """Positive float64 class weights in [0.5, 1.5), seeded."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(V, generator=g, dtype=torch.float64) + 0.5).to(device)


def cpu64(*ts):
    """float64 CPU leaves requiring grad (None stays None): the inputs of a float64 oracle."""
    return [None if t is None else t.detach().cpu().double().requires_grad_() for t in ts]


def max_err(a, b):
    """The largest absolute difference, both sides moved to the CPU in float64."""
    return (a.detach().cpu().double() - b.detach().cpu().double()).abs().max().item() if a.numel() else 0.0


def ref_grads(hidden, weight, bias, labels, w_lp, w_ent, dtype=torch.float64, **kw):
    """Reference values and gradients of ``sum(w_lp * logp + w_ent * entropy)`` through materialized
    logits in ``dtype``: float64 on the CPU (the oracle); another dtype on the inputs' device (what
    eager PyTorch makes at that precision there)."""
    dev = "cpu" if dtype == torch.float64 else hidden.device
    leaves = [t.detach().to(dev, dtype).requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    r = linear_token_stats(leaves[0], leaves[1], labels.to(dev), bias=leaves[2], dtype=dtype, **kw)
    loss = (r["logprobs"] * w_lp.to(dev, dtype)).sum() + (r["entropy"] * w_ent.to(dev, dtype)).sum()
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    return r, list(grads) + ([None] if bias is None else [])


def check_against_reference(hidden, weight, bias, labels, *, chunk_size=None, needs=(True, True, True), **kw):
    """Compares values and the gradients of the inputs in ``needs`` (hidden, weight, bias) with the
    fp64 reference; low precision gets twice the error that the eager (materialized, same dtype)
    computation makes, plus a small floor."""
    leaves = [t.clone().requires_grad_(n) if t is not None else None for t, n in zip((hidden, weight, bias), needs)]
    if not any(t is not None and t.requires_grad for t in leaves):
        leaves[0].requires_grad_()
    got = linear_token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], outputs=ALL,
                                chunk_size=chunk_size, **kw)
    g = torch.Generator().manual_seed(1)
    w_lp = torch.randn(got.logprobs.shape, generator=g).to(hidden.device)
    w_ent = torch.randn(got.logprobs.shape, generator=g).to(hidden.device)
    ref, rgrads = ref_grads(hidden, weight, bias, labels, w_lp, w_ent, **kw)
    loss = (got.logprobs * w_lp).sum() + (got.entropy * w_ent).sum()
    present = [t for t in leaves if t is not None and t.requires_grad]
    it = iter(torch.autograd.grad(loss, present))
    ggrads = [next(it) if (t is not None and t.requires_grad) else None for t in leaves]
    if hidden.dtype in (torch.float64, torch.float32):
        tol = {torch.float64: 1e-9, torch.float32: 1e-4}[hidden.dtype]
        for name in FLOATS:
            assert max_err(getattr(got, name), ref[name]) <= tol * (1 + ref[name].abs().max().item()), name
        for gg, rg in zip(ggrads, rgrads):
            if rg is not None and gg is not None:
                assert max_err(gg, rg) <= tol * (1 + rg.abs().max().item())
    else:
        eager, egrads = ref_grads(hidden, weight, bias, labels, w_lp, w_ent, dtype=hidden.dtype, **kw)
        for name in FLOATS:
            e_err = max_err(eager[name], ref[name])
            assert max_err(getattr(got, name), ref[name]) <= 2 * e_err + 0.02 * (1 + ref[name].abs().max().item()), name
        for gg, eg, rg in zip(ggrads, egrads, rgrads):
            if rg is not None and gg is not None:
                e_err = max_err(eg, rg)
                assert max_err(gg, rg) <= 2 * e_err + 0.02 * (1 + rg.abs().max().item())
    # is_top1 can only differ where the label's logit ties the max within rounding.
    z_ok = got.is_top1.cpu() == ref["is_top1"].cpu()
    assert z_ok.float().mean().item() >= (1.0 if hidden.dtype == torch.float64 else 0.9)


# ---- cross-entropy ---------------------------------------------------------------------------------

CE_OPTIONS = [dict(reduction=r, label_smoothing=e, z_loss_scale=z, weighted=w)
              for r in ("mean", "sum", "none") for e in (0.0, 0.25) for z in (0.0, 1e-2) for w in (False, True)]


def ref_cross_entropy(logits, labels, *, reduction, label_smoothing, z_loss_scale, class_weights,
                      temperature=1.0, logit_scale=1.0, softcap=None, ignore_index=-100):
    """F.cross_entropy on materialized transformed logits plus the z-loss (the oracle)."""
    z = logits * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    zf, lf = z.reshape(-1, z.shape[-1]), labels.reshape(-1)
    loss = F.cross_entropy(zf, lf, weight=class_weights, reduction=reduction, ignore_index=ignore_index,
                           label_smoothing=label_smoothing)
    valid = lf != ignore_index
    zl = z_loss_scale * torch.logsumexp(zf.to(torch.float32 if z.dtype != torch.float64 else z.dtype), -1) ** 2 * valid
    if reduction == "mean":
        zl = zl.sum() / valid.sum()
    elif reduction == "sum":
        zl = zl.sum()
    else:
        loss, zl = loss.view(labels.shape), zl.view(labels.shape)
    return loss + zl, zl


def ce_case(dtype, opts, device, seed=0, shape=(3, 7), H=16, V=37, ignore=0.25):
    """A cross-entropy case: :func:`make`'s inputs, float64 class weights when ``opts["weighted"]``,
    and the remaining options as keyword arguments."""
    hidden, weight, b, labels = make(shape, H, V, dtype, device, ignore=ignore, seed=seed)
    cw = class_weights(V, device, seed=seed + 5) if opts["weighted"] else None
    kw = {k: v for k, v in opts.items() if k != "weighted"}
    return hidden, weight, b, labels, cw, kw


def ce_grads(fn, leaves, upstream):
    """``fn(*leaves)`` (detached) and the gradients of the leaves for the upstream ``upstream(out)``."""
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves, upstream(out))


def lce_run(hidden, weight, b, labels, needs, upstream=(1.0, None), **kw):
    """Loss (and z-loss), and the gradients of the leaves in ``needs`` for ``g_loss * loss (+ g_z *
    z_loss)``; absent gradients are None."""
    leaves = [None if t is None else t.clone().requires_grad_(bool(nd)) for t, nd in zip((hidden, weight, b), needs)]
    out = linear_cross_entropy(leaves[0], leaves[1], labels, bias=leaves[2], **kw)
    loss, zl = out if isinstance(out, tuple) else (out, None)
    total = loss * upstream[0] + (0 if upstream[1] is None else zl * upstream[1])
    present = [t for t in leaves if t is not None and t.requires_grad]
    it = iter(torch.autograd.grad(total, present))
    grads = [next(it) if (t is not None and t.requires_grad) else None for t in leaves]
    return loss.detach(), None if zl is None else zl.detach(), grads


# ---- GEMM counts -----------------------------------------------------------------------------------

class GemmCounter:
    """Counts the GEMM calls (torch.mm, torch.addmm, Tensor.addmm_, and oneDNN's linear, which the
    CPU fp32 path uses) made while active."""

    def __init__(self, monkeypatch):
        self.n = 0
        targets = [(torch, "mm"), (torch, "addmm"), (torch.Tensor, "addmm_")]
        if hasattr(torch.ops.mkldnn, "_linear_pointwise"):  # absent from torch builds without oneDNN
            targets.append((torch.ops.mkldnn, "_linear_pointwise"))
        for owner, name in targets:
            orig = getattr(owner, name)

            def counted(*a, _orig=orig, **k):
                self.n += 1
                return _orig(*a, **k)
            monkeypatch.setattr(owner, name, counted)
