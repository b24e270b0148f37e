"""Every remaining public function of the loss, uncertainty and plasticity families, called with
hostile tensors for each required argument (random dtype, shape, layout, NaN/Inf) and absurd
scalars: it must return or raise a clean exception that names an argument — never crash. (Values
are checked against references in fuzz_families.py and the unit tests.) Run in a subprocess by
tests/test_fuzz.py."""
from __future__ import annotations

import inspect
import os

import pytest
from hypothesis import given, settings, strategies as st

from pyalign import losses, plasticity, uncertainty
from strategies import ABSURD_SCALARS, CLEAN, names_argument, tensors

EXAMPLES = settings(max_examples=int(os.environ.get("PYALIGN_FUZZ_EXAMPLES", "150")) // 3 + 10, deadline=None,
                    derandomize=True)
FUNCTIONS = [
    losses.kto_loss, losses.bco_loss, losses.orpo_loss, losses.cpo_loss, losses.simpo_loss, losses.reward_model_loss,
    losses.fused_linear_dpo_loss,
    uncertainty.posterior_weights, uncertainty.heteroscedastic_decomposition, uncertainty.penalized_reward,
    uncertainty.uncertainty_weights, uncertainty.sequence_uncertainty, uncertainty.calibration,
    uncertainty.conformal_quantile, uncertainty.conformal_reward_interval, uncertainty.conformal_token_sets,
    uncertainty.last_layer_laplace,
    plasticity.sanger, plasticity.bcm, plasticity.soft_hebb, plasticity.stdp, plasticity.three_factor,
]
SCALAR_KW = {"lr": 0.01, "alpha": 0.1, "beta": 0.1}


def _required(fn):
    sig = inspect.signature(fn)
    pos = [p.name for p in sig.parameters.values()
           if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    kw = [p.name for p in sig.parameters.values() if p.default is inspect.Parameter.empty and p.kind == p.KEYWORD_ONLY]
    optional_tensors = [p.name for p in sig.parameters.values()
                        if p.default is None and p.kind != p.VAR_KEYWORD and p.name != "validate"]
    return sig, pos, kw, optional_tensors


@pytest.mark.parametrize("fn", FUNCTIONS, ids=lambda f: f.__name__)
@EXAMPLES
@given(data=st.data())
def test_returns_or_refuses_cleanly(fn, data):
    sig, pos, kw, optional = _required(fn)
    shared = tuple(data.draw(st.lists(st.integers(0, 5), min_size=1, max_size=3)))
    def draw_tensor():
        if data.draw(st.booleans()):  # mutually consistent shapes reach deeper than the shape checks
            return data.draw(tensors(shape=shared))
        return data.draw(tensors())
    args = [draw_tensor() for _ in pos]
    kwargs = {name: data.draw(st.one_of(st.just(SCALAR_KW.get(name, 1.0)), st.sampled_from(ABSURD_SCALARS)))
              for name in kw}
    for name in optional[:3]:
        if data.draw(st.booleans()):
            kwargs[name] = draw_tensor()
    try:
        fn(*args, **kwargs)
    except BaseException as e:  # noqa: BLE001 - classifying is the point
        assert isinstance(e, CLEAN), f"{fn.__name__}: unclean exception {type(e).__name__}: {e}"
        names = list(sig.parameters) + ["weights", "lengths", "labels", "targets", "probs"]
        assert names_argument(str(e), names), f"{fn.__name__}: exception names no argument: {e}"
