"""Shared test fixtures: the device parametrization and reproducible hypothesis settings."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

import pyalign

# The tests must exercise the installed package (with its compiled _C), never the source tree.
_SRC = Path(__file__).resolve().parents[1] / "pyalign"
if Path(pyalign.__file__).resolve().parent == _SRC:
    raise RuntimeError("tests imported pyalign from the source tree; install it (pip install .) and run pytest "
                       "from outside the repository root or with `pytest` (not `python -m pytest`)")

settings.register_profile(
    "ci", max_examples=int(os.environ.get("PYALIGN_HYPOTHESIS_EXAMPLES", "40")), deadline=None,
    derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("ci")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not (torch.cuda.is_available() and pyalign.cuda_available()), reason="needs a CUDA device and a CUDA build"))]


@pytest.fixture(params=DEVICES)
def device(request):
    """Run a test once per device: 'cpu' always, 'cuda' where a GPU and a CUDA build exist."""
    return request.param
