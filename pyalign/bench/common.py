"""Timing and memory measurement shared by every bench suite.

Time: median of repeated calls after warm-up (CUDA events on GPU, perf_counter on CPU).
:func:`compare` times the implementations of one (op, size) interleaved, one call of each per round
(A B C A B C ...), and gives each baseline's speedup as the median over rounds of its time over
pyalign's in the same round: on a shared, noisy machine that ratio is steadier than a ratio of
separately measured medians, because a slow phase of the machine slows both calls of a round.
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


def time_ms(fn: Callable[[], object], device: str) -> float:
    """Wall time of one call of ``fn()`` in milliseconds (CUDA events on GPU)."""
    if device == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b)
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def median_ms(fn: Callable[[], object], device: str, *, warmup: int = 2, reps: int = 5,
              max_seconds: float = 10.0) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    start_all = time.perf_counter()
    for _ in range(reps):
        times.append(time_ms(fn, device))
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


def _failed(e: Exception) -> str:
    return f"failed: {type(e).__name__}: {str(e)[:120]}"


def compare(suite: str, op: str, size: str, impls, device: str, *, bytes_moved: int | None = None,
            measure_memory: bool = True, note: str = "", notes: dict | None = None, reps: int = 5,
            warmup: int = 2, max_seconds: float = 20.0, per_call: int = 1) -> list[dict]:
    """Rows for the implementations of one (op, size), timed interleaved.

    ``impls``: ``(name, fn)`` pairs (or a dict), "pyalign" among them; ``fn`` None records that
    implementation as unavailable. A row's note is ``notes[name]`` if given, else ``note`` (for an
    unavailable one "not installed"). After ``warmup``
    calls of each, ``reps`` rounds call each once, the order rotating by one each round so that
    no implementation always runs first; a round costs every implementation's time, and rounds stop
    after ``max_seconds`` once two are done. Each row holds its median time (divided by
    ``per_call`` when ``fn`` makes that many calls) and, for baselines, ``speedup``: the median over
    rounds of the baseline's time over pyalign's. An implementation that raises is reported with
    the error, not fatal."""
    pairs = list(impls.items()) if isinstance(impls, dict) else list(impls)
    notes = notes or {}
    rows = {name: {"suite": suite, "op": op, "size": size, "impl": name, "device": device, "median_ms": None,
                   "peak_mem_mb": None, "gbps": None, "speedup": None,
                   "note": notes.get(name, "not installed" if fn is None else note)}
            for name, fn in pairs}
    live = {}
    for name, fn in pairs:
        if fn is None:
            continue
        try:
            for _ in range(max(warmup, 1)):  # at least one untimed call: a failure shows here
                fn()
            sync(device)
            live[name] = fn
        except Exception as e:  # a baseline that fails on this machine is reported, not fatal
            rows[name]["note"] = _failed(e)
    times: dict[str, list[float]] = {name: [] for name in live}
    names, start = list(live), time.perf_counter()
    for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)] if names else []:
            times[name].append(time_ms(live[name], device) / per_call)
        if time.perf_counter() - start > max_seconds and r >= 1:
            break
    for name, ts in times.items():
        row = rows[name]
        row["median_ms"] = statistics.median(ts)
        if bytes_moved:
            row["gbps"] = bytes_moved / (row["median_ms"] * 1e-3) / 1e9
        if "pyalign" in times and name != "pyalign":
            row["speedup"] = statistics.median(t / o for t, o in zip(ts, times["pyalign"]))
    if measure_memory:
        for name, fn in live.items():
            try:
                rows[name]["peak_mem_mb"] = peak_extra_mb(fn, device)
            except Exception as e:
                rows[name]["note"] = _failed(e)
    return list(rows.values())
