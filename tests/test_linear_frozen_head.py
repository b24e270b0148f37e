"""The fused linear head with a frozen head (only ``hidden`` requires grad): the basis path
(``pyalign::linear_token_logprobs_basis``, the hidden gradient's basis formed in the forward and
scaled in the backward) against the recompute path and the materialized float64 reference; on
every device. Its GEMM count is in test_linear_gemm.py."""
from __future__ import annotations

import pytest
import torch

import pyalign
from linear_helpers import make, max_err, ref_grads
from pyalign._outputs import ENTROPY
from pyalign.logprob import linear_token_logprobs
from pyalign.ops.linear import linear_token_logprobs_basis_op, linear_token_logprobs_op


def _frozen_run(hidden, weight, b, labels, g, **kw):
    """Log-probs and the hidden gradient of ``sum(g * logp)`` with weight and bias frozen."""
    h = hidden.clone().requires_grad_()
    lp = linear_token_logprobs(h, weight, labels, bias=b, **kw)
    (gh,) = torch.autograd.grad((lp * g).sum(), h)
    return lp.detach(), gh


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opts", [dict(), dict(temperature=0.7, logit_scale=1.3, softcap=2.5), dict(shift=True)])
@pytest.mark.parametrize("bias", [False, True])
def test_frozen_head_basis_matches_recompute(dtype, opts, bias, device):
    """Only hidden requires grad: the basis path (hidden gradient formed in the forward) gives the
    recompute path's log-probs bitwise and its gradient within rounding, ignored tokens included;
    fp64 against the materialized reference."""
    hidden, weight, b, labels = make((3, 13), 16, 150, dtype, device, bias=bias, ignore=0.25, seed=11)
    g = torch.randn(labels[..., 1:].shape if opts.get("shift") else labels.shape,
                    generator=torch.Generator().manual_seed(2), dtype=torch.float64).float().to(device)
    if dtype == torch.float64:
        g = g.double()
    got = _frozen_run(hidden, weight, b, labels, g, chunk_size=8, **opts)
    with pyalign.overrides(forward_gradients=False):
        want = _frozen_run(hidden, weight, b, labels, g, chunk_size=8, **opts)
    assert torch.equal(got[0], want[0])
    tol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2}[dtype]
    assert max_err(got[1], want[1]) <= tol * (1 + want[1].abs().max().item())
    if dtype == torch.float64:
        ref, (rg, *_) = ref_grads(hidden, weight, b, labels, g, torch.zeros_like(g), **opts)
        assert max_err(got[0], ref["logprobs"]) < 1e-9
        assert max_err(got[1], rg) < 1e-9


def test_frozen_head_basis_op_other_gradients_are_exact(device):
    """The basis op differentiated through lse and entropy as well (reachable by calling the op
    directly): those parts go through the recompute loop, and the hidden gradient equals the
    ordinary op's; a weight that requires grad is refused in the backward."""
    hidden, weight, b, labels = make((40,), 12, 90, torch.float64, device, ignore=0.2, seed=6)
    args = (labels, -100, 0.9, 1.0, 3.0, ENTROPY, 16)
    coef = [torch.randn(40, generator=torch.Generator().manual_seed(k), dtype=torch.float64).to(device)
            for k in range(3)]
    grads = []
    for op in (linear_token_logprobs_basis_op, linear_token_logprobs_op):
        h = hidden.clone().requires_grad_()
        logp, lse, ent, *_ = op(h, weight, b, *args)
        (gh,) = torch.autograd.grad((coef[0] * logp + coef[1] * lse + coef[2] * ent).sum(), h)
        grads.append(gh)
    assert max_err(grads[0], grads[1]) < 1e-12
    logp = linear_token_logprobs_basis_op(hidden, weight.clone().requires_grad_(), b, *args)[0]
    with pytest.raises(RuntimeError, match="weight requires grad"):
        logp.sum().backward()


def test_frozen_head_torch_compile_fullgraph(device):
    hidden, weight, b, labels = make((2, 9), 8, 19, torch.float32, device, ignore=0.2, seed=9)

    def loss_fn(h):
        return -linear_token_logprobs(h, weight, labels, bias=b, chunk_size=4, shift=True).sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    ha, hb = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    la, lb = loss_fn(ha), compiled(hb)
    la.backward()
    lb.backward()
    assert max_err(la, lb) < 1e-5 and max_err(ha.grad, hb.grad) < 1e-5
