"""Runs the hostile-input cases (tests/fuzz/fuzz_cases.py) in a subprocess per module, so that a crash
is caught and reported with its output instead of killing the test session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ_DIR = Path(__file__).parent / "fuzz"
CASE_FILES = sorted(p.name for p in FUZZ_DIR.glob("fuzz_*.py"))


@pytest.mark.parametrize("case_file", CASE_FILES)
def test_fuzz_module_survives(case_file):
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", case_file],
        cwd=FUZZ_DIR, capture_output=True, text=True, timeout=1200, env={**os.environ},
    )
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode >= 0, f"fuzz process killed by signal {-proc.returncode} (a crash):\n{tail}"
    assert proc.returncode == 0, f"fuzz cases failed:\n{tail}"
    assert " passed" in proc.stdout, tail
