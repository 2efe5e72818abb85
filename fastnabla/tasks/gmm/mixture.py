"""Diagonal Gaussian mixtures in any dimension, with the exact noised marginals of the VP process.

The pretrained model of the analytic benchmark is the *exact* noise predictor of a mixture
``p(y) = sum_k w_k N(y; m_k, diag(s_k^2))`` under ``x = sqrt(abar) y + sqrt(1 - abar) eps``:

    p_abar(x) = sum_k w_k N(x; sqrt(abar) m_k, diag(abar s_k^2 + 1 - abar))
    eps*(x, abar) = -sqrt(1 - abar) grad_x log p_abar(x)

and the posterior of ``y`` given ``x`` is again a mixture (weights = component responsibilities of
``x``), which makes ``E[f(y) | x]`` closed-form for the rewards in :mod:`.rewards`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class GaussianMixture:
    """``sum_k weights[k] N(means[k], diag(stds[k]^2))``; ``means``/``stds`` are ``[K, d]``."""

    means: Tensor
    stds: Tensor
    weights: Tensor

    def __post_init__(self) -> None:
        m, s, w = self.means, self.stds, self.weights
        if m.ndim != 2:
            raise ValueError(f"mixture means must be [K, d], got shape {tuple(m.shape)}")
        if s.shape != m.shape:
            raise ValueError(f"mixture stds must match means {tuple(m.shape)}, got {tuple(s.shape)}")
        if w.shape != (m.shape[0],):
            raise ValueError(f"mixture weights must be [K={m.shape[0]}], got {tuple(w.shape)}")
        if bool((s <= 0).any()):
            raise ValueError("mixture stds must be > 0")
        if bool((w <= 0).any()) or abs(float(w.sum()) - 1.0) > 1e-6:
            raise ValueError(f"mixture weights must be > 0 and sum to 1, got {w.tolist()}")

    @classmethod
    def create(
        cls,
        means: list | Tensor,
        stds: list | float | Tensor,
        weights: list | Tensor | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> GaussianMixture:
        """Build from lists; ``stds`` may be a scalar, one per component, or ``[K, d]``.

        ``weights`` are normalised (default uniform)."""
        m = torch.as_tensor(means, dtype=dtype)
        if m.ndim == 1:
            m = m[:, None]
        s = torch.as_tensor(stds, dtype=dtype)
        if s.ndim == 0:
            s = s.expand_as(m)
        elif s.ndim == 1:
            if s.numel() != m.shape[0]:
                raise ValueError(f"mixture stds: need {m.shape[0]} values (one per component), got {s.numel()}")
            s = s[:, None].expand_as(m)
        w = torch.ones(m.shape[0], dtype=dtype) if weights is None else torch.as_tensor(weights, dtype=dtype)
        if w.ndim != 1 or w.numel() != m.shape[0]:
            raise ValueError(f"mixture weights: need {m.shape[0]} values, got {list(w.shape)}")
        if bool((w <= 0).any()):
            raise ValueError(f"mixture weights must be > 0, got {w.tolist()}")
        return cls(m.clone(), s.contiguous().clone(), w / w.sum())

    @property
    def num_components(self) -> int:
        return int(self.means.shape[0])

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def to(self, dtype: torch.dtype) -> GaussianMixture:
        return GaussianMixture(self.means.to(dtype), self.stds.to(dtype), self.weights.to(dtype))

    def noised(self, alpha_bar: float) -> GaussianMixture:
        """The marginal of ``sqrt(abar) y + sqrt(1 - abar) eps`` (a mixture again)."""
        ab = torch.as_tensor(alpha_bar, dtype=self.means.dtype)
        return GaussianMixture(
            ab.sqrt() * self.means, (ab * self.stds**2 + 1 - ab).sqrt(), self.weights.clone()
        )

    def component_log_probs(self, x: Tensor, alpha_bar: Tensor | float = 1.0) -> Tensor:
        """``log w_k + log N(x; sqrt(abar) m_k, abar s_k^2 + 1 - abar)``, shape ``[B, K]``.

        ``alpha_bar`` is a scalar or ``[B, 1]`` (mixed noise levels)."""
        ab = torch.as_tensor(alpha_bar, dtype=x.dtype, device=x.device)
        ab = ab.reshape(-1, 1, 1) if ab.ndim else ab
        mean = ab.sqrt() * self.means.to(x)  # [B|1, K, d]
        var = ab * self.stds.to(x) ** 2 + 1 - ab
        diff = x[:, None, :] - mean
        log_norm = -0.5 * (diff**2 / var + var.log() + math.log(2 * math.pi)).sum(-1)
        return self.weights.to(x).log() + log_norm

    def log_prob(self, x: Tensor, alpha_bar: Tensor | float = 1.0) -> Tensor:
        """``log p_abar(x)``, shape ``[B]``."""
        return torch.logsumexp(self.component_log_probs(x, alpha_bar), dim=-1)

    def responsibilities(self, x: Tensor, alpha_bar: Tensor | float = 1.0) -> Tensor:
        """Posterior component probabilities ``P(k | x)``, shape ``[B, K]``."""
        return torch.softmax(self.component_log_probs(x, alpha_bar), dim=-1)

    def score(self, x: Tensor, alpha_bar: Tensor | float = 1.0) -> Tensor:
        """``grad_x log p_abar(x)``, shape ``[B, d]`` (closed form)."""
        ab = torch.as_tensor(alpha_bar, dtype=x.dtype, device=x.device)
        ab = ab.reshape(-1, 1, 1) if ab.ndim else ab
        resp = self.responsibilities(x, alpha_bar)  # [B, K]
        var = ab * self.stds.to(x) ** 2 + 1 - ab
        comp = -(x[:, None, :] - ab.sqrt() * self.means.to(x)) / var
        return (resp[..., None] * comp).sum(1)

    def eps_star(self, x: Tensor, alpha_bar: Tensor | float) -> Tensor:
        """The exact noise predictor ``eps*(x, abar) = -sqrt(1 - abar) grad log p_abar(x)``."""
        ab = torch.as_tensor(alpha_bar, dtype=x.dtype, device=x.device)
        return -(1 - ab).sqrt() * self.score(x, ab)

    def posterior(self, x: Tensor, alpha_bar: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
        """Posterior of the clean ``y`` given ``x`` at ``abar < 1``: ``(log_weights [B, K],
        means [B, K, d], variances [B, K, d])``."""
        ab = torch.as_tensor(alpha_bar, dtype=x.dtype, device=x.device)
        ab = ab.reshape(-1, 1, 1) if ab.ndim else ab
        s2 = self.stds.to(x) ** 2
        var = s2 * (1 - ab) / (1 - ab + ab * s2)
        mean = var * (self.means.to(x) / s2 + ab.sqrt() * x[:, None, :] / (1 - ab))
        log_w = torch.log_softmax(self.component_log_probs(x, ab.reshape(-1, 1) if ab.ndim else ab), -1)
        return log_w, mean, var.expand_as(mean)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``n`` exact samples and their component labels."""
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=self.means.dtype, generator=generator)
        return self.means[labels] + self.stds[labels] * z, labels
