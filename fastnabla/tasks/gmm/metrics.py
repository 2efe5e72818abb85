"""Distances from samples to the closed-form target ``p# R^beta`` of the analytic benchmark.

* mode weights: the mean posterior responsibility of each target component over the samples
  (an unbiased estimate of the weights for exact target samples, lower variance than hard counts);
* total variation between mode weights;
* mean log-reward (against the target's, closed form: ``reward.expected_log_reward``);
* energy distance ``2 E||X - Y|| - E||X - X'|| - E||Y - Y'||`` to exact target samples
  (a V-statistic; zero iff the distributions match). Its *sampling floor* is the same statistic between two
  independent exact target sample sets of the same sizes: ``E = E||Y - Y'|| (1/N + 1/M)`` for the V-statistic
  (:func:`energy_distance_floor` draws it);
* mode shape (:func:`mode_shape`): for each target mode ``k`` with target weight ``>= min_weight``, the
  responsibility-weighted sample mean and std

      mean_k = sum_i r_ik x_i / sum_i r_ik,   std_kd^2 = sum_i r_ik (x_id - mean_kd)^2 / sum_i r_ik,

  with ``r_ik = P_target(k | x_i)`` the target's posterior responsibilities. For exact target samples these are
  consistent for the component's mean and std however much the components overlap, because
  ``r_k(x) p(x) = w_k N_k(x)``: ``E[r_k(X) f(X)] / E[r_k(X)] = E_{N_k}[f]``. For another sampler ``q`` they are the
  moments of ``q`` seen through the target's mode ``k`` (``q(x) r_k(x)`` normalised). From them:
  the standardised mean error ``||(mean_k - m'_k) / s'_k||_2`` (Mahalanobis, diagonal: a shift of one target std
  along one axis is 1, in any dimension; exact samples give ``~ sqrt(d / (N w_k))``), averaged and maxed over the
  kept modes, and the std ratio ``std_kd / s'_kd`` per mode and dimension, summarised by its geometric mean and by
  the worst factor ``max_kd max(r, 1/r)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastnabla.tasks.gmm.mixture import GaussianMixture

Tensor = torch.Tensor

MIN_MODE_WEIGHT = 0.05  # target modes lighter than this are left out of the shape metrics


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


def energy_distance_floor(target: GaussianMixture, n: int, m: int, generator: torch.Generator) -> float:
    """The energy distance between two independent exact ``target`` sample sets of sizes ``n`` and ``m``: what a
    perfect sampler scores (its mean is ``E||Y - Y'|| (1/n + 1/m)``)."""
    return energy_distance(target.sample(n, generator)[0], target.sample(m, generator)[0])


@dataclass
class ModeShape:
    """Per-mode moments of samples against the target's modes (the kept modes only, in target order)."""

    modes: list[int]  # indices of the target modes with weight >= min_weight
    means: Tensor  # [K', d] responsibility-weighted sample means
    stds: Tensor  # [K', d] responsibility-weighted sample stds
    mean_error: Tensor  # [K'] ||(means - target means) / target stds||_2
    std_ratio: Tensor  # [K', d] stds / target stds

    def summary(self) -> dict[str, float]:
        """``mean_error`` (average over kept modes), ``mean_error_max``, ``std_ratio_mean`` (geometric mean over
        modes and dimensions) and ``std_ratio_worst`` (``max max(r, 1/r)``, >= 1)."""
        log_r = self.std_ratio.log()
        return {
            "mean_error": float(self.mean_error.mean()),
            "mean_error_max": float(self.mean_error.max()),
            "std_ratio_mean": math.exp(float(log_r.mean())),
            "std_ratio_worst": math.exp(float(log_r.abs().max())),
        }


def mode_shape(samples: Tensor, target: GaussianMixture, min_weight: float = MIN_MODE_WEIGHT) -> ModeShape:
    """Standardised mean error and std ratio of ``samples`` ``[N, d]`` per target mode (module docstring)."""
    keep = [k for k in range(target.num_components) if float(target.weights[k]) >= min_weight]
    if not keep:
        raise ValueError(f"no target mode has weight >= {min_weight}")
    x = samples.to(target.means.dtype)
    resp = target.responsibilities(x)[:, keep]  # [N, K']
    mass = resp.sum(0).clamp(min=torch.finfo(x.dtype).tiny)  # [K']
    means = resp.T @ x / mass[:, None]
    var = (resp[:, :, None] * (x[:, None, :] - means[None]) ** 2).sum(0) / mass[:, None]
    t_mean, t_std = target.means[keep], target.stds[keep]
    stds = var.clamp(min=0).sqrt()
    return ModeShape(
        modes=keep,
        means=means,
        stds=stds,
        mean_error=((means - t_mean) / t_std).norm(dim=-1),
        std_ratio=stds / t_std,
    )
