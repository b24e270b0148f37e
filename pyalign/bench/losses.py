"""Preference-loss suite: pyalign's fused losses vs the same formulas in eager PyTorch and torch.compile.

Each row times forward + backward of one loss on a batch of per-sequence log-probs (fp32). A call on
64 pairs takes microseconds, so each timed function runs the loss ``REPEAT`` times and the row
reports the time per call. ``pyalign`` is the public function (its eager path skips the dispatcher,
see :mod:`pyalign.ops._op`); ``pyalign-op`` calls the registered custom op itself, to show the
dispatcher's overhead that path avoids. A row at 8 pairs splits a small call's time into the kernel
call, the autograd floor and the rest (Python). The eager baseline is :mod:`pyalign.reference.losses` evaluated in fp32 (TRL's formulas).
"""
from __future__ import annotations

import torch

from pyalign import losses as L
from pyalign.bench.common import compare, compiled, installed
from pyalign.ops.losses import DPO_TYPES, needed_grad_rows, params_list, preference_loss_op
from pyalign.reference import losses as R

REPEAT = 50


def _batch(n: int, device: str):
    g = torch.Generator().manual_seed(0)
    lc = torch.randint(20, 400, (n,), generator=g)
    lr = torch.randint(20, 400, (n,), generator=g)
    rc = -torch.rand(n, generator=g) * lc
    rr = -torch.rand(n, generator=g) * lr
    pc, pr = rc + torch.randn(n, generator=g), rr + torch.randn(n, generator=g)
    return [t.to(device) for t in (pc, pr, rc, rr, lc, lr)]


def _cases():
    """(op name, pyalign fn, eager fn, custom-op args builder or None)."""
    def dpo(types, weights=None, eps=0.0):
        ours = lambda pc, pr, rc, rr, lc, lr: L.dpo_loss(pc, pr, rc, rr, loss_type=types, loss_weights=weights,
                                                          label_smoothing=eps, chosen_lengths=lc, rejected_lengths=lr)[0]
        eager = lambda pc, pr, rc, rr, lc, lr: R.dpo_losses(pc, pr, rc, rr, loss_type=types, loss_weights=weights,
                                                            label_smoothing=eps, chosen_lengths=lc, rejected_lengths=lr,
                                                            dtype=torch.float32).mean()
        tl = [types] if isinstance(types, str) else types
        params = params_list(beta=0.1, label_smoothing=eps, f_alpha=0.5, tau=0.05, gamma=0.5, alpha=0, cpo_alpha=0,
                             desirable_weight=1, undesirable_weight=1, center=0)
        op = lambda pc, pr, rc, rr, lc, lr: preference_loss_op.op(
            pc, pr, rc, rr, lc, lr, None, None, None, None, None, "dpo", [DPO_TYPES.index(t) for t in tl],
            [1.0] * len(tl) if weights is None else list(weights), params, "reverse_kl", "mean", 1.0,
            needed_grad_rows(pc, pr, rc, rr, None))[0]
        return ours, eager, op

    cases = [("dpo sigmoid", *dpo("sigmoid")),
             ("dpo ipo", *dpo("ipo")),
             ("dpo mpo (sigmoid+bco_pair+sft)", *dpo(["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0])),
             ("dpo aot", *dpo("aot", eps=0.1))]
    ours = lambda pc, pr, rc, rr, lc, lr: L.kto_loss(pc, rc, lc > 200)[0]
    eager = lambda pc, pr, rc, rr, lc, lr: R.kto_losses(pc, rc, lc > 200, dtype=torch.float32).mean()
    cases.append(("kto", ours, eager, None))
    ours = lambda pc, pr, rc, rr, lc, lr: L.orpo_loss(pc, pr, chosen_lengths=lc, rejected_lengths=lr)[0]
    eager = lambda pc, pr, rc, rr, lc, lr: R.orpo_losses(pc, pr, lc, lr, dtype=torch.float32)[0].mean()
    cases.append(("orpo", ours, eager, None))
    ours = lambda pc, pr, rc, rr, lc, lr: L.simpo_loss(pc, pr, chosen_lengths=lc, rejected_lengths=lr)[0]
    eager = lambda pc, pr, rc, rr, lc, lr: R.cpo_losses(pc, pr, loss_type="simpo", beta=2.0, cpo_alpha=0.0, lc=lc,
                                                        lr=lr, dtype=torch.float32)[0].mean()
    cases.append(("simpo", ours, eager, None))
    return cases


class _Floor(torch.autograd.Function):
    """The autograd floor of a fused loss: a Function that returns a saved number and whose backward
    returns saved gradients, with no kernel at all."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(a, b)
        return a.new_zeros(())

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        return a * g, b * g


def _overhead_rows(device: str) -> list[dict]:
    """Where the time of a small call goes (dpo sigmoid, 8 pairs, fwd+bwd): the public function, the
    op's implementation alone (the kernel call with its descriptors and output allocations, no
    argument checks, no autograd), the autograd floor (:class:`_Floor`) and eager PyTorch. The public
    call's time minus the other two pyalign rows is its Python overhead (checks, options, result)."""
    inputs = _batch(8, device)
    ours, eager, _ = _cases()[0][1:]
    pc, pr, rc, rr, lc, lr = inputs
    params = params_list(beta=0.1, label_smoothing=0.0, f_alpha=0.5, tau=0.05, gamma=0.5, alpha=0, cpo_alpha=0,
                         desirable_weight=1, undesirable_weight=1, center=0)
    sigmoid = [DPO_TYPES.index("sigmoid")]

    def impl_only():
        for _ in range(REPEAT):
            preference_loss_op.impl(pc, pr, rc, rr, lc, lr, None, None, None, None, None, "dpo", sigmoid, [1.0],
                                    params, "reverse_kl", "mean", 1.0, 0b00011)  # the policy's gradients

    impls = [("pyalign", _fwd_bwd(ours, inputs)), ("op impl (no autograd)", impl_only),
             ("autograd floor", _fwd_bwd(lambda a, b, *_: _Floor.apply(a, b), inputs)),
             ("eager", _fwd_bwd(eager, inputs))]
    return compare("losses", "dpo sigmoid per-call overhead fwd+bwd", "8 pairs fp32", impls, device,
                   measure_memory=False, note=f"per call (batches of {REPEAT})", per_call=REPEAT, reps=9)


def _fwd_bwd(fn, inputs):
    pc, pr, rc, rr, lc, lr = inputs

    def run():
        for _ in range(REPEAT):
            a, b = pc.detach().requires_grad_(), pr.detach().requires_grad_()
            loss = fn(a, b, rc, rr, lc, lr)
            loss.backward()
        return loss
    return run


def run(device: str, quick: bool) -> list[dict]:
    rows = []
    sizes = [64, 4096] if quick else [8, 64, 512, 4096, 65536]
    for n in sizes:
        inputs = _batch(n, device)
        for name, ours, eager, op in _cases():
            if n > 4096 and "aot" in name and device == "cuda":
                continue  # the rank count is O(n^2) on one block
            impls = [("pyalign", ours), ("eager", eager)]
            if not quick or name == "dpo sigmoid":  # compiling every case takes minutes on a small CPU
                impls.append(("compile", compiled(eager, dynamic=False)))
            if op is not None:
                impls.insert(1, ("pyalign-op", op))
            rows += compare("losses", f"{name} fwd+bwd", f"{n} pairs fp32",
                            [(impl, _fwd_bwd(fn, inputs)) for impl, fn in impls], device, measure_memory=False,
                            note=f"per call (batches of {REPEAT})", per_call=REPEAT, reps=9)
    rows.extend(_overhead_rows(device))
    rows.extend(_fused_linear_dpo(device, quick))
    return rows


def _fused_linear_dpo(device: str, quick: bool) -> list[dict]:
    """fused_linear_dpo_loss (policy log-probs from the fused head, no logits) vs eager
    ``hidden @ W.T`` -> log_softmax -> gather -> DPO, forward + backward."""
    pairs, T, H, V = (4, 256, 256, 8000) if quick else (8, 1024, 1024, 32000)
    if device == "cuda" and not quick:
        pairs, T, H, V = 8, 2048, 4096, 128256
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = (torch.randn(2 * pairs, T, H, generator=g) * 0.5).to(device, dtype)
    weight = (torch.randn(V, H, generator=g) * H ** -0.5).to(device, dtype)
    labels = torch.randint(0, V, (2 * pairs, T), generator=g).to(device)
    labels[:, : T // 4] = -100  # the prompt
    ref = (torch.randn(2 * pairs, generator=g) - 300.0).to(device)

    def ours():
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        loss, _ = L.fused_linear_dpo_loss(h, w, labels, ref_logps=ref, beta=0.1)
        loss.backward()
        return loss

    def eager():
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        loss = _shifted_policy_loss(h, w, labels, ref)
        loss.backward()
        return loss

    size = f"{pairs} pairs x {T} tok, H {H}, V {V} {str(dtype).replace('torch.', '')}"
    impls = [("pyalign", ours), ("eager", eager)]
    if not quick:  # compiling the eager loss over these sizes costs a minute on a small CPU
        impls.append(("compile", _compiled_eager(hidden, weight, labels, ref)))
    notes = {}
    if installed("liger_kernel"):
        try:
            impls.append(("liger", _liger_dpo(hidden, weight, labels)))
            notes["liger"] = "reference-free (Liger takes no precomputed reference log-probs)"
        except Exception as e:  # importable but unusable here
            impls.append(("liger", None))
            notes["liger"] = f"unusable: {type(e).__name__}"
    else:
        impls.append(("liger", None))
    return compare("losses", "fused_linear_dpo_loss fwd+bwd", size, impls, device, notes=notes, reps=3)


def _shifted_policy_loss(h, w, labels, ref):
    """The eager DPO loss of the fused case: materialized logits, log_softmax, gather, sigmoid loss."""
    logits = (h @ w.T).float()
    lab = labels[:, 1:]
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    seq = (lp * (lab != -100)).sum(-1)
    c, r = seq.chunk(2)
    rc, rr = ref.chunk(2)
    return -torch.nn.functional.logsigmoid(0.1 * ((c - rc) - (r - rr))).mean()


def _compiled_eager(hidden, weight, labels, ref):
    fn = compiled(_shifted_policy_loss, dynamic=False)

    def run():
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        loss = fn(h, w, labels, ref)
        loss.backward()
        return loss
    return run


def _liger_dpo(hidden, weight, labels):
    """Liger-Kernel's chunked fused linear DPO loss on the same shifted tokens (sigmoid loss)."""
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    loss_fn = LigerFusedLinearDPOLoss(beta=0.1, compute_nll_loss=False, use_ref_model=False)
    inputs, target = hidden[:, :-1].contiguous(), labels[:, 1:].contiguous()

    def run():
        h, w = inputs.detach().requires_grad_(), weight.detach().requires_grad_()
        out = loss_fn(w, h, target)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        return loss
    return run
