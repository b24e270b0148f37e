"""Regression tests of defects found in review, one per defect."""
from __future__ import annotations

import pytest
import torch

import pyalign


def test_sequence_logprobs_refuses_per_token_statistics_clearly():
    # was: AttributeError: 'tuple' object has no attribute 'sum'
    x, y = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    for kw in (dict(return_entropy=True), dict(outputs=("entropy",))):
        with pytest.raises(ValueError, match="sequence_logprobs: return_entropy / outputs are per-token"):
            pyalign.sequence_logprobs(x, y, **kw)
        with pytest.raises(ValueError, match="linear_sequence_logprobs: return_entropy / outputs are per-token"):
            pyalign.linear_sequence_logprobs(torch.randn(2, 5, 4), torch.randn(11, 4), y, **kw)
    seq, counts = pyalign.sequence_logprobs(x, y, outputs=None, return_entropy=False)
    torch.testing.assert_close(seq, pyalign.token_logprobs(x, y).sum(-1))


@pytest.mark.parametrize("lse_weight", [0.0, 0.5])
def test_frozen_head_with_lse_output_under_compile_fullgraph(lse_weight):
    """A frozen head (only hidden requires grad) whose loss also uses the lse output: the backward's
    check for a nonzero lse gradient runs inside an op, so torch.compile(fullgraph=True) traces the
    whole step (it was a data-dependent branch in the autograd formula)."""
    g = torch.Generator().manual_seed(0)
    hidden0, weight = torch.randn(2, 9, 8, generator=g), torch.randn(19, 8, generator=g)
    labels = torch.randint(0, 19, (2, 9), generator=g)

    def step(h):
        stats = pyalign.linear_token_logprobs(h, weight, labels, chunk_size=4, shift=True, outputs=("lse",))
        return -stats.logprobs.sum() + lse_weight * (stats.lse ** 2).sum()

    grads = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        h = hidden0.clone().requires_grad_()
        fn(h).backward()
        grads.append(h.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
    h = hidden0.double().requires_grad_()
    w64 = weight.double()
    z = (h[:, :-1] @ w64.t())
    ref = -torch.log_softmax(z, -1).gather(-1, labels[:, 1:, None]).sum() + lse_weight * (torch.logsumexp(z, -1) ** 2).sum()
    ref.backward()
    torch.testing.assert_close(grads[0].double(), h.grad, rtol=1e-4, atol=1e-5)
