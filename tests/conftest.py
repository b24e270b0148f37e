"""Shared test fixtures: the device parametrization, reproducible hypothesis settings and the fused
linear head's path switches."""
from __future__ import annotations

import contextlib
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


@pytest.fixture
def force_path():
    """``set_(path, blocks)``: the fused linear head's backward loop order (``"token"``, ``"vocab"``,
    or None for the automatic choice) and forced ``(token chunk, vocab block)`` sizes
    (``pyalign.overrides``) for the rest of the test."""
    stack = contextlib.ExitStack()

    def set_(path, blocks=None):
        stack.close()
        stack.enter_context(pyalign.overrides(backward_order=path, vocab_blocks=blocks))
    yield set_
    stack.close()


@pytest.fixture
def recompute_path():
    """``set_(True)`` forces the fused cross-entropy's recompute path
    (``pyalign.overrides(forward_gradients=False)``) for the rest of the test; ``set_(False)``
    returns to the automatic choice."""
    stack = contextlib.ExitStack()

    def set_(on):
        stack.close()
        if on:
            stack.enter_context(pyalign.overrides(forward_gradients=False))
    yield set_
    stack.close()
