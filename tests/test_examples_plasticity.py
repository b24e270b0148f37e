"""Smoke test of examples/continual_alignment.py (quick mode)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "continual_alignment.py"


def test_continual_alignment_example_runs():
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--quick"], capture_output=True, text=True,
                          timeout=300, cwd="/", env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[1:] if line.strip()}
    assert set(lines) == {"none", "EWC", "SI", "MAS"}, proc.stdout
    kept = {k: float(v[1 + 3].rstrip("%")) for k, v in lines.items()}
    # Every consolidation method keeps more of task A than plain fine-tuning.
    for k in ("EWC", "SI", "MAS"):
        assert kept[k] > kept["none"], proc.stdout
