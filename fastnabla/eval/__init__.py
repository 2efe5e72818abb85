"""Evaluation of fine-tuned Stable Diffusion models: reward, diversity and prior following (docs/evaluation.md).

Metrics (pure functions on tensors): :mod:`~fastnabla.eval.reward_stats`, :mod:`~fastnabla.eval.diversity`,
:mod:`~fastnabla.eval.frechet`. Feature extractors (local weights only): :mod:`~fastnabla.eval.clip_features`,
:mod:`~fastnabla.eval.inception`, :mod:`~fastnabla.eval.dreamsim_features`. Sampling and per-prompt summaries:
:mod:`~fastnabla.eval.image_sets`; run directories: :mod:`~fastnabla.eval.runs`; the multi-run loop:
:mod:`~fastnabla.eval.driver`; plots: :mod:`~fastnabla.eval.plots`; the CLI: :mod:`~fastnabla.eval.cli`
(``python -m fastnabla.eval``).
"""

from fastnabla.eval.diversity import feature_variance, mean_pairwise_cosine_distance
from fastnabla.eval.frechet import frechet_distance, frechet_distance_from_features, gaussian_statistics
from fastnabla.eval.reward_stats import reward_statistics

__all__ = [
    "feature_variance",
    "frechet_distance",
    "frechet_distance_from_features",
    "gaussian_statistics",
    "mean_pairwise_cosine_distance",
    "reward_statistics",
]
