"""Bayesian ensemble uncertainty for alignment: reward ensembles (:mod:`.ensembles`), token
distributions (:mod:`.tokens`), calibration (:mod:`.calibration`), conformal bounds
(:mod:`.conformal`) and a last-layer Laplace reward head (:mod:`.laplace`).

Conventions: an ensemble puts its members on the first dimension (``[M, N]`` rewards,
``[M, ..., V]`` logits). Results are fp32 (fp64 for fp64 inputs). Entropies are in nats.

References: Lakshminarayanan et al. 2017 (deep ensembles); Depeweg et al. 2018 (entropy
decomposition into aleatoric + epistemic mutual information); Kendall & Gal 2017
(heteroscedastic members); Coste et al. 2023 (UWO: mean - lambda * variance, worst case);
Guo et al. 2017 (ECE, reliability diagrams); Vovk et al. 2005 / Angelopoulos & Bates 2021
(split conformal prediction); Sadinle et al. 2019 (LAC sets); MacKay 1992 (Laplace, evidence,
probit approximation); Immer et al. 2021 / Daxberger et al. 2021 (last-layer Laplace, prior
precision by marginal likelihood).
"""
from pyalign.uncertainty.calibration import Calibration, calibration, plot_reliability
from pyalign.uncertainty.conformal import (ConformalInterval, ConformalSets, conformal_quantile, conformal_reward_interval,
                                           conformal_token_sets)
from pyalign.uncertainty.ensembles import (METHODS, PreferenceUncertainty, RewardAggregate, VarianceDecomposition,
                                           aggregate_rewards, heteroscedastic_decomposition, penalized_reward,
                                           posterior_weights, preference_uncertainty, uncertainty_weights)
from pyalign.uncertainty.laplace import LaplaceRewardHead, last_layer_laplace
from pyalign.uncertainty.tokens import SequenceUncertainty, TokenUncertainty, sequence_uncertainty, token_uncertainty

__all__ = [
    "RewardAggregate", "posterior_weights", "aggregate_rewards", "VarianceDecomposition",
    "heteroscedastic_decomposition", "penalized_reward", "PreferenceUncertainty", "preference_uncertainty",
    "uncertainty_weights", "TokenUncertainty", "token_uncertainty", "SequenceUncertainty",
    "sequence_uncertainty", "Calibration", "calibration", "plot_reliability", "conformal_quantile",
    "ConformalInterval", "conformal_reward_interval", "ConformalSets", "conformal_token_sets",
    "LaplaceRewardHead", "last_layer_laplace", "METHODS",
]
