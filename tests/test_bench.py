"""The bench CLI (the main job, ``python -m pyalign.bench``): a quick suite runs end to end and
records measured numbers; saved results render with ``--report``."""
from __future__ import annotations

import json

from pyalign.bench.__main__ import main


def test_quick_suite_writes_measured_rows_and_reports(tmp_path, capsys):
    out = tmp_path / "r.json"
    md = tmp_path / "r.md"
    assert main(["--device", "cpu", "--only", "plasticity", "--json", str(out), "--markdown", str(md)]) == 0
    saved = json.loads(out.read_text())
    assert saved["quick"] is True and saved["machine"]["device"] == "cpu"
    rows = saved["rows"]
    assert rows and all(r["suite"] == "plasticity" for r in rows)
    ours = [r for r in rows if r["impl"] == "pyalign"]
    assert ours and all(r["median_ms"] is not None and r["median_ms"] > 0 for r in ours)
    assert all(not (r["note"] or "").startswith("failed") for r in rows), [r["note"] for r in rows]
    assert "| plasticity |" in md.read_text()
    capsys.readouterr()
    assert main(["--report", str(out)]) == 0
    assert "| plasticity | oja |" in capsys.readouterr().out
