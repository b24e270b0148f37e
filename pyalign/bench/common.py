"""Timing and memory measurement shared by every bench suite.

Time: median of repeated calls after warm-up (CUDA events on GPU, perf_counter on CPU).
Peak extra memory: on CUDA, ``torch.cuda.max_memory_allocated`` minus the allocation before the
call. On CPU, the process's peak resident set (VmHWM) is reset through ``/proc/self/clear_refs``
before the call and read after it, minus the resident set before (after handing freed heap pages
back to the OS with ``malloc_trim``): this counts every allocation the call makes (torch's CPU
allocator returns large blocks to the OS, and the trim returns the freed heap, so earlier calls'
freed buffers neither hide nor inflate it).
"""
from __future__ import annotations

import ctypes
import gc
import importlib.util
import statistics
import time
from typing import Callable

import torch


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], device: str, *, warmup: int = 2, reps: int = 5,
              max_seconds: float = 10.0) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    start_all = time.perf_counter()
    for _ in range(reps):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        if time.perf_counter() - start_all > max_seconds and len(times) >= 2:
            break
    return statistics.median(times)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_peak_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim_heap() -> None:
    """Hands freed heap pages back to the OS (glibc's ``malloc_trim``; a no-op elsewhere). Without
    it pages freed by earlier calls stay resident, count in the resident set before the call, and a
    call that reuses them does not raise the high-water mark: its peak would read too low."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_extra_mb(fn: Callable[[], object], device: str) -> float | None:
    """Peak memory of ``fn()`` above what was allocated before it, in MiB (None if unmeasurable)."""
    gc.collect()
    if device == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated() - before
        del out
        return peak / 2**20
    if not cpu_peak_supported():
        return None
    _trim_heap()
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    out = fn()
    peak = _status_kb("VmHWM") - before
    del out
    return max(peak, 0) / 1024


def copy_bandwidth_gbs(device: str, nbytes: int = 256 * 2**20) -> float:
    """Measured device copy bandwidth (read + write bytes per second), the floor for streaming kernels."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, warmup=2, reps=7)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def compiled(fn: Callable, **kwargs) -> Callable:
    """``torch.compile(fn)`` with a fresh dynamo cache: baselines share code objects (one lambda per
    case, one loss per size), and past dynamo's recompile limit a compiled function silently runs
    eagerly, which would time eager code under the "compile" label."""
    torch._dynamo.reset()
    return torch.compile(fn, **kwargs)


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def record(suite: str, op: str, size: str, impl: str, fn: Callable[[], object] | None, device: str,
           *, bytes_moved: int | None = None, measure_memory: bool = True, note: str = "",
           reps: int = 5) -> dict:
    """Times (and measures memory of) one implementation; ``fn=None`` records it as unavailable."""
    row = {"suite": suite, "op": op, "size": size, "impl": impl, "device": device,
           "median_ms": None, "peak_mem_mb": None, "gbps": None, "note": note}
    if fn is None:
        return row
    try:
        row["median_ms"] = median_ms(fn, device, reps=reps)
        if measure_memory:
            row["peak_mem_mb"] = peak_extra_mb(fn, device)
        if bytes_moved:
            row["gbps"] = bytes_moved / (row["median_ms"] * 1e-3) / 1e9
    except Exception as e:  # a baseline that fails on this machine is reported, not fatal
        row["note"] = f"failed: {type(e).__name__}: {str(e)[:120]}"
    return row
