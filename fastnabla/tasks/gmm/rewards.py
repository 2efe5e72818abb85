"""Analytic rewards with closed-form tilts and conditional expectations.

For a diagonal mixture prior ``p`` both rewards keep everything Gaussian:

* bump ``R(y) = exp(-||y - c||^2 / (2 rho^2))``: tilting component ``k`` by ``R^beta`` gives
  variance ``s'^2 = (1/s^2 + beta/rho^2)^-1``, mean ``s'^2 (m/s^2 + beta c/rho^2)`` and weight
  ``~ w_k N(c; m_k, s_k^2 + rho^2/beta)`` (docs/analytic-benchmark.md);
* log-linear ``R(y) = exp(a^T y)``: mean ``m + beta s^2 a``, same variance, weight
  ``~ w_k exp(beta a^T m + beta^2 sum(s^2 a^2) / 2)``.

``log_expected_reward_power`` gives the oracle flow ``log E[R(y)^beta | x_t]`` from the mixture
posterior: the exact log-flow of the pretrained process, whose gradient is the oracle used by the
flow-floor diagnostic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastnabla.tasks.gmm.mixture import GaussianMixture

Tensor = torch.Tensor


def _as_alpha_bar(alpha_bar: Tensor | float, x: Tensor) -> Tensor:
    ab = torch.as_tensor(alpha_bar, dtype=x.dtype, device=x.device)
    return ab.reshape(-1, 1) if ab.ndim else ab.expand(x.shape[0], 1)


@dataclass(frozen=True)
class GaussianBumpReward:
    """``R(y) = exp(-||y - center||^2 / (2 width^2))`` (positive, ``log R`` is quadratic)."""

    center: Tensor
    width: float

    kind = "bump"

    def __post_init__(self) -> None:
        if self.center.ndim != 1:
            raise ValueError(f"reward center must be a vector, got shape {tuple(self.center.shape)}")
        if not self.width > 0:
            raise ValueError(f"reward width must be > 0, got {self.width}")

    def log_reward(self, y: Tensor) -> Tensor:
        return -((y - self.center.to(y)) ** 2).sum(-1) / (2 * self.width**2)

    def tilt(self, prior: GaussianMixture, beta: float) -> GaussianMixture:
        """The normalised ``prior(y) R(y)^beta`` (a mixture)."""
        c = self.center.to(prior.means)
        rho2 = self.width**2 / beta
        s2 = prior.stds**2
        var = 1 / (1 / s2 + 1 / rho2)
        mean = var * (prior.means / s2 + c / rho2)
        log_w = prior.weights.log() - 0.5 * (
            (c - prior.means) ** 2 / (s2 + rho2) + (s2 + rho2).log() + math.log(2 * math.pi)
        ).sum(-1)
        return GaussianMixture(mean, var.sqrt(), torch.softmax(log_w, 0))

    def log_expected_reward_power(
        self, prior: GaussianMixture, x: Tensor, alpha_bar: Tensor | float, beta: float
    ) -> Tensor:
        """``log E[R(y)^beta | x]`` with ``y ~ prior`` noised to ``x`` at ``abar``; ``[B]``."""
        ab = _as_alpha_bar(alpha_bar, x)
        clean = (ab >= 1).reshape(-1)
        ab_safe = torch.where(ab >= 1, torch.full_like(ab, 0.5), ab)
        log_w, mean, var = prior.posterior(x, ab_safe)  # [B, K], [B, K, d], [B, K, d]
        rho2 = self.width**2 / beta
        c = self.center.to(x)
        log_e = -0.5 * ((mean - c) ** 2 / (rho2 + var) + (1 + var / rho2).log()).sum(-1)
        out = torch.logsumexp(log_w + log_e, dim=-1)
        return torch.where(clean, beta * self.log_reward(x), out)

    def expected_log_reward(self, mixture: GaussianMixture) -> float:
        """``E[log R(y)]`` for ``y ~ mixture``, closed form: ``-sum_k w_k (||m_k - c||^2 + sum s_k^2) / (2 rho^2)``."""
        c = self.center.to(mixture.means)
        per = ((mixture.means - c) ** 2 + mixture.stds**2).sum(-1) / (2 * self.width**2)
        return -float((mixture.weights * per).sum())


@dataclass(frozen=True)
class LogLinearReward:
    """``R(y) = exp(weights^T y)`` (``log R`` is linear)."""

    weights: Tensor

    kind = "loglinear"

    def __post_init__(self) -> None:
        if self.weights.ndim != 1:
            raise ValueError(f"reward weights must be a vector, got shape {tuple(self.weights.shape)}")

    def log_reward(self, y: Tensor) -> Tensor:
        return y @ self.weights.to(y)

    def tilt(self, prior: GaussianMixture, beta: float) -> GaussianMixture:
        a = self.weights.to(prior.means)
        s2 = prior.stds**2
        mean = prior.means + beta * s2 * a
        log_w = prior.weights.log() + beta * prior.means @ a + 0.5 * beta**2 * (s2 * a**2).sum(-1)
        return GaussianMixture(mean, prior.stds.clone(), torch.softmax(log_w, 0))

    def log_expected_reward_power(
        self, prior: GaussianMixture, x: Tensor, alpha_bar: Tensor | float, beta: float
    ) -> Tensor:
        ab = _as_alpha_bar(alpha_bar, x)
        clean = (ab >= 1).reshape(-1)
        ab_safe = torch.where(ab >= 1, torch.full_like(ab, 0.5), ab)
        log_w, mean, var = prior.posterior(x, ab_safe)
        a = self.weights.to(x)
        log_e = beta * (mean * a).sum(-1) + 0.5 * beta**2 * (var * a**2).sum(-1)
        out = torch.logsumexp(log_w + log_e, dim=-1)
        return torch.where(clean, beta * self.log_reward(x), out)

    def expected_log_reward(self, mixture: GaussianMixture) -> float:
        """``E[log R(y)] = sum_k w_k a^T m_k`` for ``y ~ mixture`` (closed form)."""
        return float((mixture.weights * (mixture.means @ self.weights.to(mixture.means))).sum())


AnalyticReward = GaussianBumpReward | LogLinearReward
