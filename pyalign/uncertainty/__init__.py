"""Bayesian ensemble uncertainty for alignment: reward ensembles (:mod:`.ensembles`), token
distributions (:mod:`.tokens`), calibration (:mod:`.calibration`), conformal bounds
(:mod:`.conformal`), a last-layer Laplace reward head (:mod:`.laplace`), an ensemble of reward heads
trained with the bootstrap (:mod:`.ensemble_head`) and the aggregation of conflicting objectives
(:mod:`.objectives`).

Conventions: an ensemble puts its members on the first dimension (``[M, N]`` rewards,
``[M, ..., V]`` logits). Results are fp32 (fp64 for fp64 inputs). Entropies are in nats.

References: Lakshminarayanan et al. 2017 (deep ensembles); Depeweg et al. 2018 (entropy
decomposition into aleatoric + epistemic mutual information); Kendall & Gal 2017
(heteroscedastic members); Coste et al. 2023 (UWO: mean - lambda * variance, worst case);
Guo et al. 2017 (ECE, reliability diagrams); Vovk et al. 2005 / Angelopoulos & Bates 2021
(split conformal prediction); Sadinle et al. 2019 (LAC sets); MacKay 1992 (Laplace, evidence,
probit approximation); Immer et al. 2021 / Daxberger et al. 2021 (last-layer Laplace, prior
precision by marginal likelihood); Osband et al. 2016 (bootstrapped heads); Chakraborty et al.
2024 (MaxMin-RLHF); Nash 1950 (social welfare); Guo et al. 2017 (temperature scaling).
"""
from pyalign.uncertainty.calibration import Calibration, TemperatureFit, calibration, fit_temperature, plot_reliability
from pyalign.uncertainty.conformal import (ConformalInterval, ConformalSets, conformal_quantile, conformal_reward_interval,
                                           conformal_token_sets)
from pyalign.uncertainty.ensembles import (METHODS, PreferenceUncertainty, RewardAggregate, VarianceDecomposition,
                                           aggregate_rewards, heteroscedastic_decomposition, penalized_reward,
                                           posterior_weights, preference_uncertainty, uncertainty_weights)
from pyalign.uncertainty.ensemble_head import BOOTSTRAP_METHODS, EnsembleRewardHead
from pyalign.uncertainty.laplace import LaplaceRewardHead, last_layer_laplace
from pyalign.uncertainty.objectives import OBJECTIVE_METHODS, aggregate_objectives
from pyalign.uncertainty.tokens import SequenceUncertainty, TokenUncertainty, sequence_uncertainty, token_uncertainty

__all__ = [
    "RewardAggregate", "posterior_weights", "aggregate_rewards", "VarianceDecomposition",
    "heteroscedastic_decomposition", "penalized_reward", "PreferenceUncertainty", "preference_uncertainty",
    "uncertainty_weights", "TokenUncertainty", "token_uncertainty", "SequenceUncertainty",
    "sequence_uncertainty", "Calibration", "calibration", "plot_reliability", "conformal_quantile",
    "ConformalInterval", "conformal_reward_interval", "ConformalSets", "conformal_token_sets",
    "LaplaceRewardHead", "last_layer_laplace", "METHODS", "TemperatureFit", "fit_temperature",
    "EnsembleRewardHead", "BOOTSTRAP_METHODS", "aggregate_objectives", "OBJECTIVE_METHODS",
]
