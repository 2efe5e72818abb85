"""Distances from samples to the closed-form target ``p# R^beta`` of the analytic benchmark.

* mode weights: the mean posterior responsibility of each target component over the samples
  (an unbiased estimate of the weights for exact target samples, lower variance than hard counts);
* total variation between mode weights;
* mean log-reward;
* energy distance ``2 E||X - Y|| - E||X - X'|| - E||Y - Y'||`` to exact target samples
  (a V-statistic; zero iff the distributions match).
"""

from __future__ import annotations

import torch

from fastnabla.tasks.gmm.mixture import GaussianMixture

Tensor = torch.Tensor


def mode_weights(samples: Tensor, modes: GaussianMixture) -> Tensor:
    """Mean responsibility of each component of ``modes`` over ``samples``, shape ``[K]``."""
    return modes.responsibilities(samples.to(modes.means.dtype)).mean(0)


def total_variation(p: Tensor, q: Tensor) -> float:
    """``0.5 * sum |p - q|`` for two weight vectors."""
    return 0.5 * float((p - q).abs().sum())


def _mean_pairwise_distance(x: Tensor, y: Tensor, chunk: int = 2048) -> Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for i in range(0, x.shape[0], chunk):
        total += torch.cdist(x[i : i + chunk], y).sum()
    return total / (x.shape[0] * y.shape[0])


def energy_distance(x: Tensor, y: Tensor) -> float:
    """Energy distance between two sample sets ``[N, d]`` and ``[M, d]`` (float64)."""
    x, y = x.double(), y.double()
    return float(2 * _mean_pairwise_distance(x, y) - _mean_pairwise_distance(x, x) - _mean_pairwise_distance(y, y))
