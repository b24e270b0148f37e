"""``python -m pyalign.bench``: time every kernel family against what a user would use otherwise.

Quick by default (1 to 2.5 minutes on a 2-core CPU); ``--full`` runs the real sizes. Prints the
machine first and a per-family summary last; the full table goes to the Markdown and JSON files it
writes (``pyalign-bench.md`` and ``pyalign-bench.json`` in the current folder unless named).
Reports, never asserts. Baselines that are not installed are listed as such.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import re
import sys
import time

import torch

import pyalign
from pyalign.bench.common import copy_bandwidth_gbs, installed

SUITES = ["logprob", "linear", "losses", "rl", "distill", "uncertainty", "robust", "plasticity"]
OPTIONAL_BASELINES = ["liger_kernel", "cut_cross_entropy", "flash_attn", "trl"]  # flash_attn: its fused cross-entropy


def machine_info(device: str) -> dict:
    """The machine, without the measured copy bandwidth (added by :func:`main`)."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "pyalign": pyalign.__version__,
            "cpu_isa": pyalign.cpu_isa(), "python": platform.python_version(), "device": device,
            "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    info["baselines_installed"] = {m: installed(m) for m in OPTIONAL_BASELINES}
    return info


def machine_line(info: dict) -> str:
    where = info.get("gpu") or f"{info['cpu']} ({info['cores']} cores, {info.get('threads', '?')} threads)"
    return (f"pyalign {info['pyalign']} on {where}, CPU kernels {info['cpu_isa']}, torch {info['torch']}, "
            f"Python {info['python']}")


# Baseline families of the summary: a baseline counts as "eager" or "compile" by its name's prefix.
SUMMARY_BASELINES = (("eager", "vs eager"), ("compile", "vs torch.compile"))


def _range(values: list[float]) -> str:
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return f"{lo:.2f}x" if abs(hi - lo) < 0.005 else f"{lo:.2f}x .. {hi:.2f}x"


def summary(rows: list[dict]) -> str:
    """Per suite: the range over its (op, size) grid of pyalign's speedup (baseline time / pyalign
    time, > 1: pyalign faster) against eager PyTorch and against torch.compile (the best of the
    baselines of that kind at each point), and of the memory ratio (eager's peak / pyalign's)."""
    per_suite: dict[str, dict[str, list[float]]] = {}
    for (suite, _, _), impls in _grouped(rows).items():
        acc = per_suite.setdefault(suite, {"points": [], "mem": [], **{k: [] for k, _ in SUMMARY_BASELINES}})
        ours = impls.get("pyalign", {})
        t = ours.get("median_ms")
        if not t:
            continue
        acc["points"].append(1.0)
        for kind, _ in SUMMARY_BASELINES:
            speedups = [speedup(r, t) for name, r in impls.items() if name.startswith(kind) and r.get("median_ms")]
            if speedups:
                acc[kind].append(min(speedups))
        mems = [r["peak_mem_mb"] for name, r in impls.items() if name.startswith("eager") and r.get("peak_mem_mb")]
        if mems and ours.get("peak_mem_mb") is not None:
            acc["mem"].append(min(mems) / max(ours["peak_mem_mb"], 1.0))
    head = f"{'suite':<12}{'points':>7}  " + "".join(f"{label:<22}" for _, label in SUMMARY_BASELINES) + "memory vs eager"
    lines = ["summary: pyalign's speedup (baseline time / pyalign time; > 1: faster) and memory ratio "
             "(eager's peak / pyalign's) over each suite's grid", head]
    for suite, acc in per_suite.items():
        lines.append(f"{suite:<12}{len(acc['points']):>7}  " + "".join(f"{_range(acc[k]):<22}" for k, _ in SUMMARY_BASELINES)
                     + _range(acc["mem"]))
    return "\n".join(lines)


def available_suites() -> list[str]:
    return [s for s in SUITES if importlib.util.find_spec(f"pyalign.bench.{s}") is not None]


def _fmt(v, spec):
    if v is None:
        width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit())
        return "-".rjust(int(width)) if width else "-"
    return format(v, spec)


def table(rows: list[dict], bandwidth: float | None) -> str:
    """One line per (op, size): pyalign's time, each baseline's time and the ratio baseline/pyalign."""
    groups = _grouped(rows)
    lines = [f"{'suite':<12}{'op':<46}{'size':<46}{'pyalign ms':>11}{'peak MB':>9}{'%copy bw':>9}  baselines (ms, speedup, peak MB)"]
    for (suite, op, size), impls in groups.items():
        ours = impls.get("pyalign", {})
        t = ours.get("median_ms")
        pct = None
        if bandwidth and ours.get("gbps"):
            pct = 100 * ours["gbps"] / bandwidth
        lines.append(f"{suite:<12}{op:<46}{size:<46}{_fmt(t, '11.2f')}{_fmt(ours.get('peak_mem_mb'), '9.0f')}"
                     f"{_fmt(pct, '9.0f')}  " + _baselines(impls, t, lambda v: f"{v:.2f}", False))
    return "\n".join(lines)


def _ms(v) -> str:
    return "-" if v is None else f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def _baselines(impls: dict, t, fmt_ms, markdown_style: bool) -> str:
    """Each baseline's time, speedup of pyalign (baseline time / pyalign time) and peak memory."""
    out = []
    for name, r in impls.items():
        if name == "pyalign":
            continue
        if r.get("median_ms") is None:
            out.append(f"{name}: {r.get('note') or 'not installed'}")
        else:
            ratio = speedup(r, t)
            speed, mem = f"{_fmt(ratio, '.2f')}x", _fmt(r.get("peak_mem_mb"), ".0f")
            out.append(f"{name} {fmt_ms(r['median_ms'])} " + (f"({speed}), {mem}" if markdown_style else f"({speed}, {mem})"))
    return "; ".join(out)


def speedup(row: dict, pyalign_ms) -> float | None:
    """pyalign's speedup over a baseline's row: the median of per-round ratios when the row was
    timed interleaved (``compare``), else (older results) the ratio of the two medians."""
    if row.get("speedup") is not None:
        return row["speedup"]
    return row["median_ms"] / pyalign_ms if pyalign_ms and row.get("median_ms") else None


def _grouped(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["suite"], r["op"], r["size"]), {})[r["impl"]] = r
    return groups


def markdown(rows: list[dict], info: dict) -> str:
    """One table row per (op, size): pyalign's time and memory, then each baseline's time, speedup
    (baseline time / pyalign time) and peak memory."""
    where = info.get("gpu") or f"{info['cpu']} ({info['cores']} cores, CPU kernels {info['cpu_isa']})"
    out = [f"Measured on {where}, torch {info['torch']}, {info['date']}; copy bandwidth "
           f"{info['copy_bandwidth_gbs']} GB/s. Times are medians in ms; memory is peak extra MiB.", "",
           "| suite | op | size | pyalign ms | pyalign MiB | % copy bw | baselines: ms (speedup of pyalign), MiB |",
           "|---|---|---|---|---|---|---|"]
    bandwidth = info.get("copy_bandwidth_gbs")
    for (suite, op, size), impls in _grouped(rows).items():
        ours = impls.get("pyalign", {})
        t = ours.get("median_ms")
        pct = 100 * ours["gbps"] / bandwidth if bandwidth and ours.get("gbps") else None
        out.append(f"| {suite} | {op} | {size} | {_ms(t)} | {_fmt(ours.get('peak_mem_mb'), '.0f')} | "
                   f"{_fmt(pct, '.0f')} | " + _baselines(impls, t, _ms, True) + " |")
    return "\n".join(out) + "\n"


def report(paths: list[str]) -> str:
    """A Markdown page of saved results (docs/benchmarks.md is this page of bench/results/*.json)."""
    out = ["# Benchmarks", "",
           "Generated by `python -m pyalign.bench --report " + " ".join(paths) + "` from the committed results; "
           "do not edit by hand. Each table is one machine's run: times are medians of repeated calls in one "
           "process, the implementations of a row timed interleaved (one call of each per round), each baseline's "
           "speedup the median over rounds of its time over pyalign's (> 1: pyalign is faster; results saved "
           "before interleaving: the ratio of the medians), memory is the "
           "peak extra MiB of a call. How the bench measures: [development.md](development.md#the-bench-suite).", ""]
    for path in paths:
        with open(path) as f:
            saved = json.load(f)
        kind = "quick" if saved.get("quick") else "full"
        out += [f"## `{os.path.basename(path)}` ({kind} run)", "", markdown(saved["rows"], saved["machine"])]
        if saved.get("notes"):
            out += [saved["notes"], ""]
        out += ["```text", summary(saved["rows"]), "```", ""]
    return "\n".join(out)


def plot(rows: list[dict], info: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault(f"{r['op']}\n{r['size']}", {})[r["impl"]] = r
    labels = list(groups)
    impls = sorted({r["impl"] for r in rows}, key=lambda i: (i != "pyalign", i))
    fig, axes = plt.subplots(1, 3, figsize=(18, max(4, 0.45 * len(labels))), sharey=True)
    h = 0.8 / max(len(impls), 1)
    for k, impl in enumerate(impls):
        ys = [i + k * h for i in range(len(labels))]
        color = plt.cm.tab20(k % 20)  # more implementations than the default cycle's 10 colours
        axes[0].barh(ys, [groups[l].get(impl, {}).get("median_ms") or 0 for l in labels], h, label=impl, color=color)
        axes[1].barh(ys, [groups[l].get(impl, {}).get("peak_mem_mb") or 0 for l in labels], h, label=impl, color=color)
        axes[2].barh(ys, [100 * (groups[l].get(impl, {}).get("gbps") or 0) / info["copy_bandwidth_gbs"] for l in labels], h,
                     color=color)
    axes[0].set_yticks([i + 0.4 - h / 2 for i in range(len(labels))], labels, fontsize=7)
    axes[0].set_xlabel("median time (ms)"); axes[0].set_xscale("log")
    axes[1].set_xlabel("peak extra memory (MiB)")
    axes[2].set_xlabel("% of measured copy bandwidth")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"pyalign bench — {info.get('gpu') or info['cpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    _plot_speedups(rows, info, os.path.splitext(path)[0] + "-speedup.png", plt)


def size_work(size: str) -> int | None:
    """The amount of work a size string names: the product of the numbers of its first word when
    that word is a shape ("4096 pairs fp32" -> 4096, "64x4096 tokens" -> 262144), else None."""
    first = size.split()[0] if size.split() else ""
    if not re.fullmatch(r"\d+(x\d+)*", first):
        return None
    return math.prod(int(n) for n in first.split("x"))


_DTYPE_WORDS = {"fp32", "float32", "bf16", "bfloat16", "fp16", "float16", "fp64", "float64"}


def speedup_curves(rows: list[dict]) -> dict[str, dict[tuple[str, str], list[tuple[int, float]]]]:
    """Per suite, per (op, baseline kind): pyalign's speedup over the best baseline of that kind
    (eager, compile) at each size of the op, as ``(work, speedup)`` sorted by work. An op measured
    in several dtypes (the size's last word) has one curve per dtype, named "op dtype"."""
    curves: dict[str, dict[tuple[str, str], list[tuple[int, float]]]] = {}
    dtypes: dict[tuple[str, str], set[str]] = {}  # (suite, op) -> the dtypes it was measured in
    for r in rows:
        if r["size"].split() and r["size"].split()[-1] in _DTYPE_WORDS:
            dtypes.setdefault((r["suite"], r["op"]), set()).add(r["size"].split()[-1])
    for (suite, op, size), impls in _grouped(rows).items():
        t, work = impls.get("pyalign", {}).get("median_ms"), size_work(size)
        if not t or work is None:
            continue
        last = size.split()[-1]
        if len(dtypes.get((suite, op), ())) > 1:
            op = f"{op} {last}"
        for kind, _ in SUMMARY_BASELINES:
            ups = [speedup(r, t) for name, r in impls.items() if name.startswith(kind) and r.get("median_ms")]
            if ups:
                curves.setdefault(suite, {}).setdefault((op, kind), []).append((work, min(ups)))
    return {suite: {k: sorted(v) for k, v in per.items()} for suite, per in curves.items()}


def _plot_speedups(rows: list[dict], info: dict, path: str, plt) -> None:
    """One panel per suite: pyalign's speedup against size per op, over eager (solid) and
    torch.compile (dashed), log-log, with the break-even line."""
    curves = speedup_curves(rows)
    if not curves:
        return
    cols = min(3, len(curves))
    nrows = -(-len(curves) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 4 * nrows), squeeze=False)
    for ax, (suite, per) in zip(axes.flat, curves.items()):
        ops = sorted({op for op, _ in per})
        for (op, kind), pts in per.items():
            ax.plot([w for w, _ in pts], [u for _, u in pts], "-o" if kind == "eager" else "--s", markersize=4,
                    color=plt.cm.tab20(ops.index(op) % 20), label=f"{op} vs {kind}")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log"); ax.set_yscale("log")
        ax.set_title(suite); ax.set_xlabel("size (elements of the leading shape)"); ax.set_ylabel("speedup")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(curves):]:
        ax.set_visible(False)
    fig.suptitle(f"pyalign speedup against size — {info.get('gpu') or info['cpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write(rows: list[dict], info: dict, args, plot_too: bool) -> list[str]:
    """Writes the requested result files; returns their paths."""
    written = []
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "quick": not args.full, "rows": rows}, f, indent=1)
        written.append(args.json)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(rows, info))
        written.append(args.markdown)
    if plot_too:
        plot(rows, info, args.plot)
        written.append(args.plot)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pyalign.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if pyalign.cuda_available() and torch.cuda.is_available() else "cpu")
    p.add_argument("--full", action="store_true", help="real sizes (minutes) instead of the quick set")
    p.add_argument("--only", default="", help="comma-separated suites: " + ",".join(SUITES))
    p.add_argument("--json", default="pyalign-bench.json",
                   help="write all rows and the machine description to this JSON file (default: %(default)s)")
    p.add_argument("--markdown", default="pyalign-bench.md", help="write the full table to this file (default: %(default)s)")
    p.add_argument("--table", action="store_true", help="also print each suite's table as it finishes")
    p.add_argument("--plot", help="write a PNG plot (needs matplotlib)")
    p.add_argument("--report", nargs="+", metavar="JSON",
                   help="print the Markdown tables of saved --json results (e.g. bench/results/*.json) and exit")
    args = p.parse_args(argv)
    if args.report:
        print(report(args.report))
        return 0

    if args.device == "cuda" and not (torch.cuda.is_available() and pyalign.cuda_available()):
        p.error("--device cuda: no CUDA device, or pyalign was built without CUDA")
    suites = available_suites()
    if args.only:
        wanted = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in SUITES]
        if unknown:
            p.error(f"--only: unknown suite(s) {unknown}; choose from {SUITES}")
        suites = [s for s in suites if s in wanted]
    info = machine_info(args.device)
    print(machine_line(info), flush=True)
    info["copy_bandwidth_gbs"] = round(copy_bandwidth_gbs(args.device), 2)
    print(f"{args.device} copy bandwidth {info['copy_bandwidth_gbs']} GB/s; "
          f"{'full' if args.full else 'quick'} run of {', '.join(suites)}")
    print("optional baselines: " + ", ".join(f"{m} {'installed' if ok else 'not installed'}"
                                            for m, ok in info["baselines_installed"].items()))
    rows: list[dict] = []
    try:
        from tqdm import tqdm
        progress = tqdm(suites, desc="suites", unit="suite", file=sys.stderr)
    except ImportError:
        progress = suites
    for name in progress:
        if hasattr(progress, "set_postfix_str"):
            progress.set_postfix_str(name)
        mod = importlib.import_module(f"pyalign.bench.{name}")
        suite_rows = []
        for row in mod.run(args.device, quick=not args.full):
            row.setdefault("suite", name)
            for key in ("median_ms", "peak_mem_mb", "gbps", "note"):
                row.setdefault(key, None)
            suite_rows.append(row)
        rows += suite_rows
        if args.table:
            print("\n" + table(suite_rows, info["copy_bandwidth_gbs"]), flush=True)
        # Written after every suite, so that a run stopped part-way keeps the suites it finished.
        _write(rows, info, args, plot_too=False)
    print()
    written = _write(rows, info, args, plot_too=bool(args.plot))
    failed = [r for r in rows if (r.get("note") or "").startswith("failed")]
    if written:
        print("full table: " + ", ".join(written))
    if failed:
        print(f"{len(failed)} measurement(s) failed: " + "; ".join(f"{r['op']} {r['impl']}: {r['note']}" for r in failed))
    print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
