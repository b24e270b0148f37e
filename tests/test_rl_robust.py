"""pyalign.rl.ensemble_advantages: a reward ensemble's (penalized) rewards to group advantages."""
from __future__ import annotations

import pytest
import torch

from pyalign import rl
from pyalign.reference import rl as R


def _ens(m=5, n=12, seed=0, dtype=torch.float64):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("method,lam", [("mean", 0.0), ("uwo", 0.7), ("lcb", 2.0), ("min", 0.0), ("median", 0.0)])
@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp"])
def test_equals_group_advantages_of_the_aggregate(method, lam, estimator):
    r = _ens()
    mean, var = r.mean(0), r.var(0, unbiased=False)
    agg = {"mean": mean, "uwo": mean - lam * var, "lcb": mean - lam * var.sqrt(), "min": r.min(0).values,
           "median": r.median(0).values if r.shape[0] % 2 else r.quantile(0.5, dim=0)}[method]
    got = rl.ensemble_advantages(r, 4, method=method, lam=lam, estimator=estimator)
    torch.testing.assert_close(got, R.group_advantages(agg, 4, estimator=estimator), rtol=1e-10, atol=1e-10)


def test_group_advantages_options_pass_through():
    r = _ens(3, 8, seed=1, dtype=torch.float32)
    for scale in ("group", "batch", "none"):
        got = rl.ensemble_advantages(r, 4, method="uwo", lam=0.5, scale_rewards=scale)
        agg = r.mean(0) - 0.5 * r.var(0, unbiased=False)
        torch.testing.assert_close(got, R.group_advantages(agg, 4, scale_rewards=scale), rtol=1e-5, atol=1e-5)


def test_reward_variance_lower_bound():
    """AdvPO's lower bound: mean reward minus variance_coef * predictive std, then the group advantage."""
    r = _ens(1, 8, seed=2)
    var = torch.rand(8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = rl.ensemble_advantages(r, 4, method="mean", reward_variance=var, variance_coef=1.5)
    torch.testing.assert_close(got, R.group_advantages(r[0] - 1.5 * var.sqrt(), 4), rtol=1e-10, atol=1e-10)
    # with coefficient 0 the variance changes nothing
    torch.testing.assert_close(rl.ensemble_advantages(r, 4, method="mean", reward_variance=var),
                               rl.group_advantages(r[0], 4))


def test_penalty_moves_advantage_away_from_disputed_completions():
    """Two completions with the same mean reward: the one the members dispute gets the lower advantage."""
    r = torch.tensor([[1.0, 0.0, 2.0, 0.0], [1.0, 0.0, 0.0, 0.0]])  # completions 0 and 2: mean 1
    adv = rl.ensemble_advantages(r, 4, method="uwo", lam=1.0)
    assert adv[0] > adv[2]
    assert torch.equal(rl.ensemble_advantages(r, 4, method="mean")[0], rl.ensemble_advantages(r, 4, method="mean")[2])


def test_unscorable_completion_gets_zero_advantage():
    r = _ens(3, 4, seed=4)
    r[1, 2] = float("nan")
    adv = rl.ensemble_advantages(r, 4, method="mean")
    assert adv[2] == 0 and torch.isfinite(adv).all()


def test_bad_input():
    r = _ens(3, 8)
    with pytest.raises(ValueError, match="member_rewards: expected shape \\[M, N\\]"):
        rl.ensemble_advantages(r[0], 4)
    with pytest.raises(ValueError, match="member_rewards: expected shape \\[M, N\\]"):
        rl.ensemble_advantages(r[:0], 4)
    with pytest.raises(TypeError, match="member_rewards"):
        rl.ensemble_advantages(r.long(), 4)
    with pytest.raises(ValueError, match="method"):
        rl.ensemble_advantages(r, 4, method="max")
    with pytest.raises(ValueError, match="group_size"):
        rl.ensemble_advantages(r, 3)
    with pytest.raises(ValueError, match="reward_variance: expected shape \\[8\\]"):
        rl.ensemble_advantages(r, 4, reward_variance=torch.ones(4, dtype=r.dtype), variance_coef=1.0)
    with pytest.raises(ValueError, match="reward_variance: expected non-negative"):
        rl.ensemble_advantages(r, 4, reward_variance=-torch.ones(8, dtype=r.dtype), variance_coef=1.0)
    with pytest.raises(ValueError, match="variance_coef: given without reward_variance"):
        rl.ensemble_advantages(r, 4, variance_coef=1.0)
    with pytest.raises(ValueError, match="variance_coef: expected a number >= 0"):
        rl.ensemble_advantages(r, 4, reward_variance=torch.ones(8, dtype=r.dtype), variance_coef=-1.0)
    with pytest.raises(ValueError, match="uwo|M >= 2|members"):
        rl.ensemble_advantages(r[:1], 4, method="uwo")


@pytest.mark.parametrize("agg,method", [("min_then_normalize", "min"), ("softmin_then_normalize", "softmin"),
                                        ("nash_then_normalize", "nash")])
@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_multi_objective_aggregations(agg, method, estimator):
    """K reward functions combined by aggregate_objectives' method, then advantages as for one reward."""
    from pyalign.uncertainty import aggregate_objectives

    r = _ens(3, 8, seed=5).abs() + 0.1  # positive: valid utilities for the Nash product
    w = [1.0, 0.5, 2.0]
    got = rl.group_advantages(r, 4, reward_weights=w, multi_objective_aggregation=agg, objective_temperature=0.3,
                              estimator=estimator)
    combined = aggregate_objectives(r, method=method, weights=torch.tensor(w, dtype=r.dtype), temperature=0.3)
    torch.testing.assert_close(got, R.group_advantages(combined, 4, estimator=estimator), rtol=1e-10, atol=1e-10)
    # the independent formulas for the two non-trivial methods
    if method == "min":
        torch.testing.assert_close(combined, r.min(0).values)
    if method == "nash":
        torch.testing.assert_close(combined, (torch.tensor(w, dtype=r.dtype)[:, None] * r.log()).sum(0))


def test_multi_objective_nan_rules():
    r = _ens(2, 8, seed=6).abs() + 0.1
    r[:, 3] = float("nan")  # unscorable: advantage 0, left out of the baselines
    adv = rl.group_advantages(r, 4, multi_objective_aggregation="nash_then_normalize")
    assert adv[3] == 0 and torch.isfinite(adv).all()
    r[0, 5] = float("nan")  # one reward of a scorable completion missing
    with pytest.raises(ValueError, match="needs every reward"):
        rl.group_advantages(r, 4, multi_objective_aggregation="min_then_normalize")
    with pytest.raises(ValueError, match="multi_objective_aggregation"):
        rl.group_advantages(r, 4, multi_objective_aggregation="max_then_normalize")
    with pytest.raises(ValueError, match="nash|disagreement|exceed"):
        rl.group_advantages(-_ens(2, 8).abs(), 4, multi_objective_aggregation="nash_then_normalize")
