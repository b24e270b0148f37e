"""Memory a call allocates, from torch's own accounting (deterministic, unlike the resident set).

CUDA: ``torch.cuda.max_memory_allocated`` and ``memory_allocated`` around the call. CPU: the
allocation and free events of torch's CPU allocator, recorded by the profiler
(``profile_memory=True``): every tensor and every scratch buffer an op takes through torch's
allocator, in order; the maximum of their running total is the peak. The same code path makes the
same allocations whatever the allocator's or the OS's state, the CPU's instruction set or the
thread count, so tests can assert these numbers exactly where the resident set would need slack.
Buffers that a library allocates outside torch's allocator are not seen (pyalign's kernels
allocate nothing: every buffer they use is a torch tensor).

Terms, in bytes, relative to what was allocated before the call:

- ``peak``: the most allocated at any moment during the call;
- ``retained``: what is still allocated after it (its outputs, and gradients it stored);
- ``transient = peak - retained``: the temporaries on top of what the caller keeps (a ``[V, H]``
  weight gradient the call returns is the caller's, not overhead).
"""
from __future__ import annotations

import gc
from typing import Any, Callable, NamedTuple

import torch


class MemoryUse(NamedTuple):
    peak: int
    retained: int

    @property
    def transient(self) -> int:
        return self.peak - self.retained


def _cpu_allocations(prof) -> list[tuple[int, int]]:
    """``(time_ns, bytes)`` of every allocation (> 0) and free (< 0) the profiler recorded on CPU."""
    from torch._C._profiler import _EventType

    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
    return sorted(events)


def measure(fn: Callable[[], Any], device: str = "cpu") -> tuple[Any, MemoryUse]:
    """Runs ``fn()`` once and returns ``(its result, MemoryUse)``; the result is held until the
    accounting is done, so it counts as retained."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return out, MemoryUse(torch.cuda.max_memory_allocated() - before, torch.cuda.memory_allocated() - before)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    total = peak = 0
    for _, nbytes in _cpu_allocations(prof):
        total += nbytes
        peak = max(peak, total)
    return out, MemoryUse(peak, total)
