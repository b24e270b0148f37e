"""How pyalign is found and loaded: from the repository root as from site-packages, with the compiled
core's stamps checked at import and the CPU instruction set chosen by PYALIGN_CPU_ISA."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import pyalign

ROOT = Path(__file__).resolve().parents[1]
LEVELS = ("baseline", "avx2", "avx512")


def _python(code: str, *, cwd=ROOT, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_imports_from_the_repository_root():
    # `python -m ...` and `python -c` put the current folder first on sys.path: from the root that is
    # the source folder pyalign/, which must work with the installed compiled core.
    proc = _python("import pyalign, _pyalign; print(pyalign.__file__); print(pyalign.token_logprobs.__module__)",
                   env={"PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == str(ROOT / "pyalign" / "__init__.py")


def test_bench_module_runs_from_the_repository_root():
    proc = subprocess.run([sys.executable, "-m", "pyalign.bench", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr
    assert "--full" in proc.stdout


@pytest.mark.parametrize("abi, version, what", [(0, pyalign.__version__, "ABI 0"), (None, "0.0.1", "version 0.0.1")])
def test_stale_core_is_refused_with_a_clear_error(tmp_path, abi, version, what):
    fake = tmp_path / "_pyalign.py"
    fake.write_text(f"__version__ = {version!r}\n" + ("" if abi is None else f"ABI_VERSION = {abi}\n"))
    proc = _python("import pyalign", env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr and "stale" in proc.stderr and what in proc.stderr, proc.stderr
    assert "pip install ." in proc.stderr


def test_missing_core_is_a_clear_error(tmp_path):
    (tmp_path / "_pyalign.py").write_text("raise ImportError('no such module')\n")
    proc = _python("import pyalign", env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
    assert proc.returncode != 0
    assert "compiled core (the module _pyalign) is not installed" in proc.stderr, proc.stderr


def test_forced_instruction_sets():
    best = pyalign._ext.kernels.cpu_isa_supported()
    assert pyalign.cpu_isa() in LEVELS and LEVELS.index(pyalign.cpu_isa()) <= LEVELS.index(best)
    for level in LEVELS:
        proc = _python("import pyalign; print(pyalign.cpu_isa())", env={"PYALIGN_CPU_ISA": level})
        if LEVELS.index(level) <= LEVELS.index(best):
            assert proc.returncode == 0 and proc.stdout.strip() == level, proc.stderr
        else:
            assert proc.returncode != 0 and "not supported by this CPU" in proc.stderr, proc.stderr
    proc = _python("import pyalign", env={"PYALIGN_CPU_ISA": "sse9"})
    assert proc.returncode != 0 and "PYALIGN_CPU_ISA: expected one of" in proc.stderr, proc.stderr


def test_forced_instruction_sets_compute_the_same_results():
    code = ("import torch, pyalign\n"
            "g = torch.Generator().manual_seed(0)\n"
            "x = torch.randn(64, 3001, generator=g, dtype=torch.float64).float() * 4\n"
            "y = torch.randint(0, 3001, (64,), generator=g)\n"
            "lp, ent = pyalign.token_logprobs(x, y, return_entropy=True)\n"
            "print(repr(lp.double().sum().item()), repr(ent.double().sum().item()))\n")
    best = pyalign._ext.kernels.cpu_isa_supported()
    sums = {}
    for level in LEVELS[:LEVELS.index(best) + 1]:
        proc = _python(code, env={"PYALIGN_CPU_ISA": level})
        assert proc.returncode == 0, proc.stderr
        sums[level] = [float(v) for v in proc.stdout.split()]
    ref = sums["baseline"]
    for level, v in sums.items():  # every path is accurate; they may differ in the last bits
        assert v == pytest.approx(ref, rel=1e-6), sums
