"""Shared test fixtures: the device parametrization and reproducible hypothesis settings."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

import pyalign

# Subprocesses started by the tests import the same pyalign as this process (the source tree or the
# installed package), with the compiled core installed beside either.
_PKG_ROOT = str(Path(pyalign.__file__).resolve().parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join([_PKG_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])

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
