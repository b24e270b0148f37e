"""The bench CLI (the main job, ``python -m pyalign.bench``): a quick suite runs end to end, prints the
machine first and the per-family summary last, and records measured numbers; saved results render with
``--report``."""
from __future__ import annotations

import json

from pyalign.bench.__main__ import main, summary


def test_quick_suite_writes_measured_rows_and_reports(tmp_path, capsys):
    out = tmp_path / "r.json"
    md = tmp_path / "r.md"
    assert main(["--device", "cpu", "--only", "plasticity", "--json", str(out), "--markdown", str(md)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0].startswith("pyalign ") and "CPU kernels" in printed[0]
    assert printed[-3].startswith("summary:") and printed[-1].startswith("plasticity ")
    saved = json.loads(out.read_text())
    assert saved["quick"] is True and saved["machine"]["device"] == "cpu"
    rows = saved["rows"]
    assert rows and all(r["suite"] == "plasticity" for r in rows)
    ours = [r for r in rows if r["impl"] == "pyalign"]
    assert ours and all(r["median_ms"] is not None and r["median_ms"] > 0 for r in ours)
    assert all(not (r["note"] or "").startswith("failed") for r in rows), [r["note"] for r in rows]
    assert "| plasticity |" in md.read_text()
    assert main(["--report", str(out)]) == 0
    page = capsys.readouterr().out
    assert page.startswith("# Benchmarks") and "| plasticity | oja |" in page and "summary:" in page


def test_summary_ranges_over_the_grid():
    rows = [{"suite": "s", "op": "a", "size": "1", "impl": "pyalign", "median_ms": 2.0, "peak_mem_mb": 10.0},
            {"suite": "s", "op": "a", "size": "1", "impl": "eager", "median_ms": 4.0, "peak_mem_mb": 30.0},
            {"suite": "s", "op": "a", "size": "1", "impl": "eager_inplace", "median_ms": 3.0, "peak_mem_mb": 20.0},
            {"suite": "s", "op": "a", "size": "2", "impl": "pyalign", "median_ms": 1.0, "peak_mem_mb": 0.0},
            {"suite": "s", "op": "a", "size": "2", "impl": "compile", "median_ms": 0.5, "peak_mem_mb": None},
            {"suite": "s", "op": "a", "size": "2", "impl": "eager", "median_ms": 5.0, "peak_mem_mb": 4.0}]
    line = summary(rows).splitlines()[-1].split()
    # vs eager: the best eager-kind baseline at each point (3/2 and 5/1); vs compile only at size 2;
    # memory: the smallest eager peak over pyalign's (floored at 1 MiB): 20/10 and 4/1
    assert line == ["s", "2", "1.50x", "..", "5.00x", "0.50x", "2.00x", "..", "4.00x"]


def test_compare_times_interleaved_and_takes_the_median_of_per_round_ratios(monkeypatch):
    from pyalign.bench import common

    calls = []
    planned = {"pyalign": iter([1.0, 1.0, 10.0]), "eager": iter([20.0, 2.0, 20.0])}  # per timed call
    fns = {name: (lambda name=name: calls.append(name)) for name in planned}

    def fake_time(fn, device):
        fn()
        return next(planned[calls[-1]])

    def failing():
        raise RuntimeError("no such kernel here")

    monkeypatch.setattr(common, "time_ms", fake_time)
    rows = common.compare("s", "op", "n", [("pyalign", fns["pyalign"]), ("eager", fns["eager"]),
                                           ("broken", failing), ("peer", None)],
                          "cpu", reps=3, warmup=0, measure_memory=False, notes={"peer": "needs a GPU"})
    by = {r["impl"]: r for r in rows}
    # one untimed call of each, then one call of each per round, the order rotating: the ratios are 20, 2, 2 (median 2), while the
    # medians alone (1 and 20) would say 20
    assert calls == ["pyalign", "eager"] + ["pyalign", "eager", "eager", "pyalign", "pyalign", "eager"]
    assert by["pyalign"]["median_ms"] == 1.0 and by["pyalign"]["speedup"] is None
    assert by["eager"]["median_ms"] == 20.0 and by["eager"]["speedup"] == 2.0
    assert by["broken"]["median_ms"] is None and by["broken"]["note"].startswith("failed: RuntimeError")
    assert by["peer"]["median_ms"] is None and by["peer"]["note"] == "needs a GPU"
    assert summary(rows).splitlines()[-1].split()[:3] == ["s", "1", "2.00x"]


def test_speedup_curves_follow_each_op_over_its_sizes():
    from pyalign.bench.__main__ import size_work, speedup_curves

    assert size_work("4096 pairs fp32") == 4096 and size_work("64x4096 tokens fp32") == 64 * 4096
    assert size_work("M=8 N=4096") is None
    rows = [{"suite": "s", "op": "a", "size": "64 pairs", "impl": "pyalign", "median_ms": 1.0},
            {"suite": "s", "op": "a", "size": "64 pairs", "impl": "eager", "median_ms": 3.0, "speedup": 2.5},
            {"suite": "s", "op": "a", "size": "8 pairs", "impl": "pyalign", "median_ms": 1.0},
            {"suite": "s", "op": "a", "size": "8 pairs", "impl": "eager", "median_ms": 0.5},
            {"suite": "s", "op": "a", "size": "8 pairs", "impl": "compile", "median_ms": 2.0}]
    # sorted by size; an interleaved row's own speedup wins over the ratio of medians
    assert speedup_curves(rows) == {"s": {("a", "eager"): [(8, 0.5), (64, 2.5)], ("a", "compile"): [(8, 2.0)]}}
    rows += [{"suite": "p", "op": "oja", "size": f"1024x1024 B=64 {d}", "impl": i, "median_ms": t}
             for d in ("float32", "bfloat16") for i, t in (("pyalign", 1.0), ("eager", 2.0))]
    assert set(speedup_curves(rows)["p"]) == {("oja float32", "eager"), ("oja bfloat16", "eager")}
