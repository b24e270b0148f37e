"""Fused linear-head suite, forward+backward with gradients for hidden and weight.

* ``linear_token_logprobs``: pyalign against eager PyTorch (``hidden @ W.T`` then log_softmax +
  gather) and TRL's chunked fused LM head (``trl.kernels.ChunkedLogProbFunction``, what
  ``add_fused_lm_head`` runs) when importable; on CPU with ``--full`` also pyalign with its GEMMs
  through BLAS instead of oneDNN (``pyalign-blas``); forward+backward also with a frozen head
  (only ``hidden`` requires grad, as in LoRA).
* ``linear_cross_entropy`` (mean cross-entropy): pyalign (the gradient formed in the forward, 3
  GEMMs per chunk, as Liger does) against pyalign's recompute path (``pyalign-recompute``: the
  backward recomputes the logits, 4 GEMMs), eager PyTorch (``hidden @ W.T`` then
  ``F.cross_entropy``) and, when importable, Liger-Kernel's and Cut Cross-Entropy's fused linear
  cross-entropy, which compute exactly that loss.

Each op's ``gemm floor`` row is the time of its GEMMs alone at the full shapes, into preallocated
outputs, in the same run: per-token log-probs forward 1 GEMM (the logits), forward+backward 4
(the logits, their recomputation in the backward, ``dhidden`` and ``dweight``), with a frozen head 2
(the logits and ``dhidden``'s basis, formed in the forward);
the reduced cross-entropy, whose gradient is formed in the forward, 3. pyalign's speedup over that
row (< 1) is the inverse of its time as a multiple of the floor.

Peak extra memory as measured by :func:`pyalign.bench.common.peak_extra_mb` (it includes the
gradients every implementation produces).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import pyalign
from pyalign.bench.common import compare, installed


def _eager(h, w, y):
    logits = h @ w.t()
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


def _ours(h, w, y):
    return pyalign.logprob.linear_token_logprobs(h, w, y)


def _ours_blas(h, w, y):
    """The same with every GEMM through ``torch.mm`` (BLAS), not oneDNN (see pyalign.ops.linear.gemm):
    what the CPU fp32 path ran before its vocabulary-sized GEMMs moved to oneDNN (the backward
    follows the forward's overrides)."""
    with pyalign.overrides(gemm="blas"):
        return pyalign.logprob.linear_token_logprobs(h, w, y)


def _trl():
    from trl.kernels import ChunkedLogProbFunction

    # TRL's fused LM head (Triton on GPU, a torch fold elsewhere), with its own default tile.
    return lambda h, w, y: ChunkedLogProbFunction.apply(h, w, None, y, 1.0, 32768, None, 1.0, ())[0]


def _eager_ce(h, w, y):
    return F.cross_entropy((h @ w.t()).float(), y)


def _ours_ce(h, w, y):
    return pyalign.logprob.linear_cross_entropy(h, w, y)


def _ours_ce_recompute(h, w, y):
    """The recompute path (the backward recomputes each chunk's logits: 4 GEMMs), what
    ``linear_cross_entropy`` ran for reduced losses before the gradient moved into the forward."""
    with pyalign.overrides(forward_gradients=False):
        return pyalign.logprob.linear_cross_entropy(h, w, y)


def _liger_ce():
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return lambda h, w, y: liger_fused_linear_cross_entropy(h, w, y)  # mean CE


def _cce(device: str, reduction: str):
    """Cut Cross-Entropy (Wijmans et al. 2024, arXiv:2411.09009): its Triton kernel on CUDA, its
    torch.compile implementation on CPU. ``reduction="none"`` gives the per-token -log p."""
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if device == "cuda" else "torch_compile"
    if reduction == "none":
        return lambda h, w, y: -linear_cross_entropy(h, w, y, reduction="none", impl=impl)  # log-probs
    return lambda h, w, y: linear_cross_entropy(h, w, y, impl=impl)  # mean CE


def _fwd_bwd(impl, h, w, y):
    def run():
        hr, wr = h.detach().requires_grad_(), w.detach().requires_grad_()
        impl(hr, wr, y).sum().backward()
        return hr.grad, wr.grad
    return run


def _fwd_bwd_frozen_head(impl, h, w, y):
    """Only hidden requires grad (a frozen LM head, as in LoRA)."""
    def run():
        hr = h.detach().requires_grad_()
        impl(hr, w, y).sum().backward()
        return hr.grad
    return run


def sizes(device: str, quick: bool):
    if device == "cuda":
        return [(4096, 4096, 32000, torch.bfloat16)] if quick else [(16384, 4096, 128256, torch.bfloat16)]
    return [(512, 1024, 32000, torch.float32)] if quick else [(8192, 1024, 32000, torch.float32)]


def _baselines(device: str, candidates) -> tuple[list, dict]:
    """``(impls, notes)``: the baselines among ``(name, module, factory)`` as ``(name, fn)``, fn None
    with a note for those not installed or unusable here."""
    found, notes = [], {}
    for name, module, factory in candidates:
        if not installed(module):
            found.append((name, None))
            continue
        try:
            found.append((name, factory()))
        except Exception as e:  # importable but unusable here (e.g. Triton without a GPU)
            found.append((name, None))
            notes[name] = f"unusable: {type(e).__name__}"
    return found, notes


def _gemm_floor(h, w, logits: int, grads: tuple[bool, bool]):
    """The GEMMs of a fused head alone, into preallocated outputs: ``logits`` logits GEMMs, then the
    ``dhidden`` and ``dweight`` products as ``grads`` asks (the logits stand in for their gradient)."""
    z = torch.empty(h.shape[0], w.shape[0], device=h.device, dtype=h.dtype)
    dh, dw = torch.empty_like(h), torch.empty_like(w)

    def run():
        for _ in range(logits):
            torch.mm(h, w.t(), out=z)
        if grads[0]:
            torch.mm(z, w, out=dh)
        if grads[1]:
            torch.mm(z.t(), h, out=dw)
        return z
    return run


def run(device: str, quick: bool) -> list[dict]:
    rows = []
    for n, H, V, dtype in sizes(device, quick):
        g = torch.Generator(device="cpu").manual_seed(0)
        h = torch.randn(n, H, generator=g).to(device=device, dtype=dtype)
        w = (torch.randn(V, H, generator=g) / H ** 0.5).to(device=device, dtype=dtype)
        y = torch.randint(0, V, (n,), generator=g).to(device)
        size = f"{n}x{H}x{V} {str(dtype).replace('torch.', '')}"
        op = "linear_token_logprobs"
        impls = [("pyalign", _ours), ("eager", _eager)]
        if not quick and device == "cpu" and dtype == torch.float32:  # what oneDNN's GEMMs give, for the record
            impls.insert(1, ("pyalign-blas", _ours_blas))
        found, notes = _baselines(device, [("trl", "trl", _trl), ("cce", "cut_cross_entropy", lambda: _cce(device, "none"))])
        impls += found
        live = [(name, impl) for name, impl in impls if impl is not None and name != "pyalign-blas"]
        rows += compare("linear", f"{op} fwd", size, [(name, impl and (lambda impl=impl: impl(h, w, y)))
                                                      for name, impl in impls]
                        + [("gemm floor", _gemm_floor(h, w, 1, (False, False)))], device, notes=notes, reps=3)
        rows += compare("linear", f"{op} fwd+bwd", size, [(name, impl and _fwd_bwd(impl, h, w, y)) for name, impl in impls]
                        + [("gemm floor", _gemm_floor(h, w, 2, (True, True)))], device, notes=notes, reps=3)
        rows += compare("linear", f"{op} fwd+bwd, frozen head", size,
                        [(name, _fwd_bwd_frozen_head(impl, h, w, y)) for name, impl in live]
                        + [("gemm floor", _gemm_floor(h, w, 1, (True, False)))], device, reps=3)
        op = "linear_cross_entropy fwd+bwd"
        impls = [("pyalign", _ours_ce), ("eager", _eager_ce)]
        if not quick:  # the path the forward-gradient one replaces, for the record
            impls.insert(1, ("pyalign-recompute", _ours_ce_recompute))
        found, notes = _baselines(device, [("liger", "liger_kernel", _liger_ce),
                                           ("cce", "cut_cross_entropy", lambda: _cce(device, "mean"))])
        rows += compare("linear", op, size, [(name, impl and _fwd_bwd(impl, h, w, y)) for name, impl in impls + found]
                        + [("gemm floor", _gemm_floor(h, w, 1, (True, True)))], device, notes=notes, reps=3)
    return rows
