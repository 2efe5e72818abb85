"""Diversity of a set of images from their feature vectors (one set = the images of one prompt).

For features ``f_1 .. f_n`` (``[n, d]``, ``n >= 2``):

* mean pairwise cosine distance (DreamSim's distance is the cosine distance of its embeddings, Fu et al., 2023,
  "DreamSim: learning new dimensions of human visual similarity using synthetic data")::

      D_pair = 1/(n (n - 1)) sum_{i != j} (1 - <f_i, f_j> / (||f_i|| ||f_j||))

* total variance (the trace of the unbiased covariance; "the variance of latent features" over a batch of images
  per prompt, as the paper's section 4 does after Domingo-Enrich et al., 2024, "Adjoint matching")::

      V = 1/(n - 1) sum_i ||f_i - mean(f)||^2

For unit-norm features the two coincide: ``sum_{i != j} ||f_i - f_j||^2 = 2 n sum_i ||f_i - mean||^2`` and
``||f_i - f_j||^2 = 2 (1 - <f_i, f_j>)`` give ``D_pair = V(f / ||f||)``. ``V`` of un-normalised features also
measures their spread in norm. Every statistic here is computed in float64 on the CPU.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def _as_features(features: Tensor) -> Tensor:
    if not isinstance(features, Tensor):
        raise TypeError(f"features must be a torch.Tensor [n, d], got {type(features).__name__}")
    if features.dim() != 2:
        raise ValueError(f"features must be [n, d] (one feature vector per image), got shape {tuple(features.shape)}")
    if features.shape[0] < 2:
        raise ValueError(f"diversity needs at least 2 images per set, got {features.shape[0]}")
    if not torch.isfinite(features).all():
        raise ValueError("features hold non-finite values")
    return features.detach().to(device="cpu", dtype=torch.float64)


def mean_pairwise_cosine_distance(features: Tensor) -> float:
    """``1/(n(n-1)) sum_{i != j} (1 - cos(f_i, f_j))`` of ``features`` ``[n, d]`` (a zero vector raises)."""
    x = _as_features(features)
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError("features hold a zero vector: its cosine distance is undefined")
    unit = x / norms
    n = x.shape[0]
    gram = unit @ unit.T  # [n, n]
    off_diagonal_sum = float(gram.sum() - gram.diagonal().sum())
    return 1.0 - off_diagonal_sum / (n * (n - 1))


def feature_variance(features: Tensor) -> float:
    """Total variance ``1/(n-1) sum_i ||f_i - mean(f)||^2`` (trace of the unbiased covariance) of ``[n, d]``."""
    x = _as_features(features)
    return float(((x - x.mean(0)) ** 2).sum() / (x.shape[0] - 1))
