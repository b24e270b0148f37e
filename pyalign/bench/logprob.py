"""Log-prob suite: pyalign.token_logprobs vs eager PyTorch (log_softmax + gather), torch.compile,
and, when importable, the fused cross-entropy kernels of flash-attn and Liger-Kernel (Triton, GPU
only; their per-token loss is ``-log p(label)``, the same one-read-one-write work; no entropy).
The forward's ``read floor`` row is one plain pass over the same logits (a row sum) in the same
run: pyalign's ``% copy bw`` against that row's says how close the forward is to the read."""
from __future__ import annotations

import torch

import pyalign
from pyalign.bench.common import compare, compiled, installed


def _eager(x, y, entropy):
    logp = torch.log_softmax(x.float(), dim=-1)
    lp = logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    if entropy:
        ent = -(logp.exp() * logp).sum(-1)
        return lp, ent
    return lp, None


def _ours(x, y, entropy):
    if entropy:
        return pyalign.token_logprobs(x, y, return_entropy=True)
    return pyalign.token_logprobs(x, y), None


def _flash_attn():
    from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

    return lambda x, y, entropy: (-cross_entropy_loss(x, y)[0], None)


def _liger():
    from liger_kernel.transformers.functional import liger_cross_entropy

    return lambda x, y, entropy: (-liger_cross_entropy(x, y, reduction="none"), None)


def _other_libraries(device: str):
    """``(impls, notes)``: the fused cross-entropy baselines as ``(name, fn)``, fn None with a note in
    ``notes`` for those not installed or unusable here."""
    impls, notes = [], {}
    for name, module, factory in (("flash_attn", "flash_attn", _flash_attn), ("liger", "liger_kernel", _liger)):
        note = ("not installed" if not installed(module) else
                "needs a CUDA device (Triton)" if device != "cuda" else "")
        if not note:
            try:
                impls.append((name, factory()))
                continue
            except Exception as e:  # importable but unusable here
                note = f"unusable: {type(e).__name__}"
        impls.append((name, None))
        notes[name] = note
    return impls, notes


def _read(x, y, entropy):
    """The read floor: one plain pass over the logits (a row sum), what a bandwidth-bound forward costs."""
    return x.sum(-1), None


def _fwd_bwd(impl, x, y, entropy):
    def run():
        xr = x.detach().requires_grad_()
        lp, ent = impl(xr, y, entropy)
        loss = lp.sum() if ent is None else lp.sum() + ent.sum()
        loss.backward()
        return xr.grad
    return run


def sizes(device: str, quick: bool):
    if device == "cuda":
        return [(4096, 32000, torch.bfloat16)] if quick else [(4096, 32000, torch.bfloat16), (16384, 128256, torch.bfloat16)]
    return [(1024, 32000, torch.float32)] if quick else [(4096, 32000, torch.float32)]


def run(device: str, quick: bool) -> list[dict]:
    rows = []
    compiled_eager = compiled(_eager, dynamic=False)
    for n, V, dtype in sizes(device, quick):
        x = torch.randn(n, V, device=device).to(dtype)
        y = torch.randint(0, V, (n,), device=device)
        size = f"{n}x{V} {str(dtype).replace('torch.', '')}"
        read = x.numel() * x.element_size()
        others, notes = _other_libraries(device)
        for entropy in (False, True):
            impls = [("pyalign", _ours), ("eager", _eager)] + ([] if entropy else others)
            if not (quick and entropy):  # each compiled variant costs seconds of compile time
                impls.append(("compile", compiled_eager))
            op = "token_logprobs+entropy" if entropy else "token_logprobs"
            fwd = impls + ([] if entropy else [("read floor", _read)])
            rows += compare("logprob", f"{op} fwd", size,
                            [(name, impl and (lambda impl=impl: impl(x, y, entropy))) for name, impl in fwd],
                            device, bytes_moved=read, notes=notes)
            rows += compare("logprob", f"{op} fwd+bwd", size,
                            [(name, impl and _fwd_bwd(impl, x, y, entropy)) for name, impl in impls],
                            device, bytes_moved=2 * read + read, notes=notes)
        del x
    return rows
