"""Memory of the fused linear head: the peak and retained memory of forward + backward measured
from torch's allocator accounting (pyalign.bench.memory: the CPU allocator's events, on CUDA
torch.cuda.max_memory_allocated; deterministic either way, so the bounds are exact and hold on
every device; chunk sizes are given explicitly, since the automatic ones differ between devices:
their budget is tested with the other automatic sizes in test_linear_backward_paths.py)."""
from __future__ import annotations

import torch

from pyalign.bench.memory import measure
from pyalign.logprob import linear_cross_entropy, linear_token_logprobs

MIB = 2 ** 20


def _measure(run, device):
    """``measure(run)``'s MemoryUse on ``device``. On CUDA a first call runs unmeasured: cuBLAS takes
    its workspace from torch's allocator on its first GEMM and keeps it for the process, which is
    not the measured call's memory."""
    if torch.device(device).type == "cuda":
        run()
    return measure(run, device)[1]


def test_peak_memory_within_documented_bound(force_path, device):
    """bf16 head, gradients for hidden and weight, memory from torch's allocator accounting
    (pyalign.bench.memory: deterministic). The automatic (vocab-blocked) path's temporaries stay
    within the documented bound: the logits block (<= chunk*V*2) + the fp32 dhidden accumulator
    (n*H*4) + O(n*H) + the GEMMs' own packing scratch (< 2 MiB here), far below the V*H*4 of an
    fp32 [V, H] accumulator, which the token-outer path holds and must show."""
    n, H, V, chunk = 256, 512, 32000, 64
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, H, generator=g).to(torch.bfloat16).to(device)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(torch.bfloat16).to(device)
    labels = torch.randint(0, V, (n,), generator=g).to(device)

    def run():
        h, w = hidden.clone().requires_grad_(), weight.requires_grad_()
        lp = linear_token_logprobs(h, w, labels, chunk_size=chunk)
        return torch.autograd.grad(lp.sum(), (h, w))
    use = {}
    for path in (None, "token"):
        force_path(path)
        use[path] = _measure(run, device)
    force_path(None)
    results = V * H * 2 + n * H * 2  # the gradients returned: dW and dh (bf16)
    assert use[None].retained == use["token"].retained == results, use
    bound = chunk * V * 2 + n * H * 4 + 4 * n * H * 4 + 2 * MIB
    acc = V * H * 4  # 62.5 MiB
    assert use[None].transient <= bound, (use, bound)
    assert acc <= use["token"].transient <= acc + bound, (use, acc)


def test_forward_grad_backward_memory(device):
    """The backward holds the saved dW and its scaled copy, nothing more (no zero-filled [V, H]
    upstream gradient for the dW output): the peak of forward+backward (torch's allocator
    accounting) is below 2 dW + two logits buffers + O(n * H), where a third [V, H] would exceed it."""
    n, H, V, chunk = 256, 512, 32000, 64
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, H, generator=g).to(device).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(device).requires_grad_()
    labels = torch.randint(0, V, (n,), generator=g).to(device)

    def run():
        return torch.autograd.grad(linear_cross_entropy(hidden, weight, labels, chunk_size=chunk), (hidden, weight))
    use = _measure(run, device)
    dw = V * H * 4
    assert use.retained == dw + n * H * 4, use  # the two gradients returned
    bound = 2 * dw + 2 * chunk * V * 4 + 4 * n * H * 4 + 2 ** 20
    assert use.peak <= bound, (use, bound)
    assert use.peak < 3 * dw, use
