"""pyalign.rl against verl's own ``verl.trainer.ppo.core_algos`` where it imports (``pip install --no-deps
verl`` plus ``packaging numpy ray tensordict omegaconf codetiming orjson``): PPO's clipped surrogate with
the dual clip under every ``loss_agg_mode``, the KL estimators with verl's clamps and straight-through
forms, and the clipped value loss; values and gradients."""
from __future__ import annotations

import pytest
import torch

from pyalign import rl

ca = pytest.importorskip("verl.trainer.ppo.core_algos")

AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


class _ActorConfig(dict):
    """The fields of verl's ActorConfig that compute_policy_loss_vanilla reads."""

    def __init__(self, eps_low, eps_high, clip_ratio_c):
        super().__init__(clip_ratio_c=clip_ratio_c)
        self.clip_ratio, self.clip_ratio_low, self.clip_ratio_high = eps_low, eps_low, eps_high
        self.global_batch_info = {}


def _batch(seed=0, B=5, T=9):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = lp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) < 0.8).double()
    mask[2] = 0  # an empty sequence
    return lp, old, adv, mask


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("eps_high", [0.2, 0.28])
def test_ppo_dual_clip_matches_verl(mode, eps_high):
    lp, old, adv, mask = _batch()
    x, y = lp.clone().requires_grad_(), lp.clone().requires_grad_()
    want, _ = ca.compute_policy_loss_vanilla(old, x, adv, mask, loss_agg_mode=mode,
                                             config=_ActorConfig(0.2, eps_high, 3.0))
    got, _ = rl.policy_loss(y, old, adv, mask, loss_type="ppo", epsilon=0.2, epsilon_high=eps_high, dual_clip=3.0,
                            loss_agg_mode=mode)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), (got, want)
    gw, = torch.autograd.grad(want, x)
    gg, = torch.autograd.grad(got, y)
    assert torch.allclose(gg, gw, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ours,theirs", [("k1", "kl"), ("abs", "abs"), ("k2", "mse"), ("k3", "low_var_kl"),
                                         ("k1+", "k1+"), ("k3+", "k3+")])
def test_kl_estimators_match_verl(ours, theirs):
    lp, old, _, _ = _batch(1)
    ref = old.clone()
    ref[0, :3] = lp[0, :3] + torch.tensor([30.0, -30.0, 15.0], dtype=torch.float64)  # verl's clamps engaged
    x, y = lp.clone().requires_grad_(), lp.clone().requires_grad_()
    want = ca.kl_penalty(x, ref, theirs)
    got = rl.kl_penalty(y, ref, estimator=ours)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    up = torch.randn(lp.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    gw, = torch.autograd.grad(want, x, up)
    gg, = torch.autograd.grad(got, y, up)
    assert torch.allclose(gg, gw, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_value_loss_matches_verl(mode):
    g = torch.Generator().manual_seed(3)
    v = torch.randn(4, 6, generator=g, dtype=torch.float64)
    old = v + 0.3 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    ret = torch.randn(4, 6, generator=g, dtype=torch.float64)
    mask = (torch.rand(4, 6, generator=g) < 0.8).double()
    x, y = v.clone().requires_grad_(), v.clone().requires_grad_()
    want, want_frac = ca.compute_value_loss(x, ret, old, mask, cliprange_value=0.2, loss_agg_mode=mode)
    got, frac = rl.value_loss(y, old, ret, mask, cliprange_value=0.2, loss_agg_mode=mode)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), (got, want)
    assert abs(float(frac) - float(want_frac)) < 1e-9  # verl's masked_mean adds 1e-8 to the count
    gw, = torch.autograd.grad(want, x)
    gg, = torch.autograd.grad(got, y)
    assert torch.allclose(gg, gw, rtol=1e-12, atol=1e-12)
