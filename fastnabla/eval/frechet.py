"""Frechet distance between Gaussians fitted to two feature sets: the distance behind FID.

For feature sets ``X1`` ``[n1, d]`` and ``X2`` ``[n2, d]`` with means ``mu_k`` and unbiased covariances ``S_k``
(Dowson & Landau, 1982, "The Frechet distance between multivariate normal distributions"; FID: Heusel et al., 2017,
"GANs trained by a two time-scale update rule converge to a local Nash equilibrium")::

    d^2 = ||mu_1 - mu_2||^2 + Tr(S_1) + Tr(S_2) - 2 Tr((S_1^{1/2} S_2 S_1^{1/2})^{1/2})

``S_1^{1/2} S_2 S_1^{1/2}`` is symmetric positive semi-definite and has the eigenvalues of ``S_1 S_2``, so the last
trace is the sum of the square roots of those eigenvalues: :func:`trace_sqrt_product` computes it with two symmetric
eigendecompositions in float64 (no general, possibly complex, matrix square root).

From samples there is a cheaper exact form. With ``A_k = (X_k - mu_k) / sqrt(n_k - 1)`` (``[n_k, d]``),
``S_k = A_k^T A_k`` and the non-zero eigenvalues of ``S_1 S_2 = A_1^T (A_1 A_2^T) A_2`` are those of
``(A_1 A_2^T)(A_1 A_2^T)^T``, so::

    Tr((S_1 S_2)^{1/2}) = || A_1 A_2^T ||_*        (nuclear norm: sum of singular values, an [n1, n2] matrix)

which costs ``O(n1 n2 d)`` and never forms a ``d x d`` matrix. Per-prompt FID (tens of images, 2048 features) is
rank-deficient by construction; both forms handle that exactly. :func:`frechet_distance_from_features` picks the
cheaper one.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def _as_features(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [n, d], got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be [n, d] (one feature vector per row), got shape {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples for a covariance, got {x.shape[0]}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} holds non-finite values")
    return x.detach().to(device="cpu", dtype=torch.float64)


def gaussian_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``[d]`` and unbiased covariance ``[d, d]`` (float64, CPU) of ``features`` ``[n, d]``, ``n >= 2``."""
    x = _as_features(features, "features")
    mu = x.mean(0)
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


def _drop_rounding(values: Tensor) -> Tensor:
    """Eigenvalues of a PSD matrix with those below ``d * eps * max|value|`` (rounding noise) set to 0: their square
    roots would otherwise add up to ``d * sqrt(eps)``-sized errors on rank-deficient (per-prompt) covariances."""
    tol = values.numel() * torch.finfo(values.dtype).eps * float(values.abs().max().clamp(min=1e-300))
    return torch.where(values > tol, values, torch.zeros_like(values))


def _psd_sqrt(matrix: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * _drop_rounding(values).sqrt()) @ vectors.T


def trace_sqrt_product(sigma1: Tensor, sigma2: Tensor) -> float:
    """``Tr((S_1^{1/2} S_2 S_1^{1/2})^{1/2}) = Tr((S_1 S_2)^{1/2})`` for symmetric PSD ``[d, d]`` matrices."""
    s1, s2 = sigma1.double().cpu(), sigma2.double().cpu()
    root1 = _psd_sqrt((s1 + s1.T) / 2)
    middle = root1 @ ((s2 + s2.T) / 2) @ root1
    return float(_drop_rounding(torch.linalg.eigvalsh((middle + middle.T) / 2)).sqrt().sum())


def _check_statistics(mu: Tensor, sigma: Tensor, name: str) -> None:
    if mu.dim() != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{name}: mean must be [d] and covariance [d, d], got {tuple(mu.shape)} and "
                         f"{tuple(sigma.shape)}")


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """Squared Frechet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` (float64; clamped at 0)."""
    _check_statistics(mu1, sigma1, "first Gaussian")
    _check_statistics(mu2, sigma2, "second Gaussian")
    if mu1.shape != mu2.shape:
        raise ValueError(f"the Gaussians have different dimensions: {mu1.shape[0]} and {mu2.shape[0]}")
    mu1, mu2 = mu1.double().cpu(), mu2.double().cpu()
    mean_term = float(((mu1 - mu2) ** 2).sum())
    traces = float(torch.trace(sigma1.double()) + torch.trace(sigma2.double()))
    return max(mean_term + traces - 2 * trace_sqrt_product(sigma1, sigma2), 0.0)


def frechet_distance_from_features(features1: Tensor, features2: Tensor) -> float:
    """Squared Frechet distance between Gaussians fitted to ``features1`` ``[n1, d]`` and ``features2`` ``[n2, d]``
    (means and unbiased covariances, float64). Uses the nuclear-norm form when ``min(n1, n2) < d``, else
    :func:`frechet_distance` of the statistics; both are exact."""
    x1, x2 = _as_features(features1, "features1"), _as_features(features2, "features2")
    if x1.shape[1] != x2.shape[1]:
        raise ValueError(f"features1 and features2 have different widths: {x1.shape[1]} and {x2.shape[1]}")
    if min(x1.shape[0], x2.shape[0]) >= x1.shape[1]:
        return frechet_distance(*gaussian_statistics(x1), *gaussian_statistics(x2))
    mu1, mu2 = x1.mean(0), x2.mean(0)
    a1 = (x1 - mu1) / (x1.shape[0] - 1) ** 0.5  # [n1, d]
    a2 = (x2 - mu2) / (x2.shape[0] - 1) ** 0.5  # [n2, d]
    cross = float(torch.linalg.svdvals(a1 @ a2.T).sum())
    value = float(((mu1 - mu2) ** 2).sum()) + float((a1**2).sum() + (a2**2).sum()) - 2 * cross
    return max(value, 0.0)
