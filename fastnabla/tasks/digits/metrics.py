"""Metrics of the ``digits`` yardstick: pure functions on tensors (no models, no files).

A fine-tuned sampler is compared with the target ``p#(x) R(x)^beta`` (:mod:`fastnabla.tasks.digits.target`),
which is known through importance weights over pretrained samples. With classifier labels (argmax of the logits)
and penultimate features of the samples:

* **mean log-reward** of the samples against the target's ``E_target[log R]``;
* **class-histogram total variation** ``TV(h, h*) = 1/2 sum_k |h_k - h*_k|`` to the target's weighted histogram;
* **diversity**: per class, the mean pairwise Euclidean distance of features between *distinct* samples of that
  class, against the same quantity of the target. With weights ``w`` (the target's importance weights) the
  reference is ``sum_{i != j} w_i w_j d_ij / sum_{i != j} w_i w_j`` over same-class pairs: the value an
  importance-resampled set converges to as it grows, without the zero distances its duplicates add;
* **Frechet distance** between Gaussians fitted to the features (weighted mean and covariance for the target):
  ``|mu_1 - mu_2|^2 + tr(C_1 + C_2 - 2 (C_1^{1/2} C_2 C_1^{1/2})^{1/2})``;
* the **class-TV floor** (:func:`class_tv_floor`): what an exact sampler of the target scores with the same number
  of samples, given the target's importance-sampling error.
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


def _check_weights(weights: Tensor | None, n: int, what: str) -> Tensor | None:
    if weights is None:
        return None
    w = torch.as_tensor(weights, dtype=torch.float64)
    if w.shape != (n,):
        raise ValueError(f"{what}: weights must have shape [{n}] (one per sample), got {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"{what}: weights must be finite, non-negative and not all zero")
    return w / w.sum()


def class_histogram(labels: Tensor, num_classes: int = 10, weights: Tensor | None = None) -> Tensor:
    """Normalised (weighted) histogram ``[num_classes]`` (float64) of integer ``labels`` ``[N]``."""
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.numel() == 0 or labels.dtype.is_floating_point:
        raise ValueError(f"class_histogram: labels must be a non-empty 1-D integer tensor, got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"class_histogram: labels must lie in [0, {num_classes}), got {int(labels.min())}.."
                         f"{int(labels.max())}")
    w = _check_weights(weights, labels.numel(), "class_histogram")
    w = torch.full((labels.numel(),), 1.0 / labels.numel(), dtype=torch.float64) if w is None else w
    return torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels.long().cpu(), w.cpu())


def total_variation(p: Tensor, q: Tensor) -> float:
    """``1/2 sum |p - q|`` of two probability vectors of one shape (each must sum to 1 within 1e-6)."""
    p, q = torch.as_tensor(p, dtype=torch.float64), torch.as_tensor(q, dtype=torch.float64)
    if p.shape != q.shape or p.dim() != 1:
        raise ValueError(f"total_variation: needs two 1-D histograms of one shape, got {tuple(p.shape)} and "
                         f"{tuple(q.shape)}")
    for name, h in (("p", p), ("q", q)):
        if bool((h < 0).any()) or abs(float(h.sum()) - 1) > 1e-6:
            raise ValueError(f"total_variation: {name} is not a probability vector (sum {float(h.sum()):.6g})")
    return 0.5 * float((p - q).abs().sum())


def class_tv_floor(labels: Tensor, weights: Tensor, n: int, draws: int = 200, seed: int = 0,
                   num_classes: int = 10) -> dict[str, float | int]:
    """The class-TV an *exact* sampler of the target scores with ``n`` evaluation samples: the metric's floor.

    Two errors add up. (1) Sampling: the histogram ``h_n`` of ``n`` i.i.d. draws from the target (here: labels
    drawn with probabilities ``w``) differs from the target histogram ``h*``; ``E TV ~ 1/2 sum_k sqrt(2/pi)
    sqrt(h*_k (1 - h*_k) / n)``. (2) The target's own importance-sampling error: ``h*`` is itself estimated from
    ``N`` weighted samples (ESS ``1/sum w_i^2``); a bootstrap resample ``b`` of the ``N`` samples with weights
    ``w_b / sum w_b`` gives a histogram ``h_b`` with that error. Per draw, ``TV(h_n, h_b)``; returns its mean and
    95th percentile over ``draws`` draws, the mean of ``TV(h_n, h*)`` (sampling error alone), ``n`` and ``draws``.
    """
    labels = torch.as_tensor(labels).long().cpu()
    w = _check_weights(weights, labels.numel(), "class_tv_floor")
    if w is None or n < 1 or draws < 1:
        raise ValueError(f"class_tv_floor: needs weights, n >= 1 and draws >= 1, got n={n}, draws={draws}")
    h_star = class_histogram(labels, num_classes, w)
    gen = torch.Generator().manual_seed(seed)
    drawn = labels[torch.multinomial(w, n * draws, replacement=True, generator=gen)].reshape(draws, n)
    h_n = torch.zeros(draws, num_classes, dtype=torch.float64).scatter_add_(
        1, drawn, torch.full(drawn.shape, 1.0 / n, dtype=torch.float64))
    boot = torch.randint(labels.numel(), (draws, labels.numel()), generator=gen)
    wb = w[boot]
    h_b = torch.zeros(draws, num_classes, dtype=torch.float64).scatter_add_(1, labels[boot], wb)
    h_b = h_b / wb.sum(1, keepdim=True)
    tv = 0.5 * (h_n - h_b).abs().sum(1)
    return {"mean": float(tv.mean()), "p95": float(tv.quantile(0.95)),
            "sampling_only": float((0.5 * (h_n - h_star).abs().sum(1)).mean()), "n": int(n), "draws": int(draws)}


def mean_pairwise_distance(features: Tensor, weights: Tensor | None = None) -> float:
    """Mean Euclidean distance over pairs ``i != j`` of rows of ``features`` ``[N, F]`` (pair weight ``w_i w_j``);
    NaN with fewer than 2 rows (or positive weights)."""
    f = torch.as_tensor(features, dtype=torch.float64)
    if f.dim() != 2:
        raise ValueError(f"mean_pairwise_distance: features must be [N, F], got {tuple(f.shape)}")
    w = _check_weights(weights, f.shape[0], "mean_pairwise_distance") if f.shape[0] else None
    if f.shape[0] < 2:
        return math.nan
    w = torch.ones(f.shape[0], dtype=torch.float64) if w is None else w
    d = torch.cdist(f, f)
    pair = w[:, None] * w[None, :]
    pair.fill_diagonal_(0)
    total = float(pair.sum())
    return float((pair * d).sum() / total) if total > 0 else math.nan


def per_class_diversity(
    features: Tensor, labels: Tensor, num_classes: int = 10, weights: Tensor | None = None
) -> Tensor:
    """``[num_classes]`` (float64): :func:`mean_pairwise_distance` within each class (NaN where undefined)."""
    f, labels = torch.as_tensor(features), torch.as_tensor(labels)
    if f.dim() != 2 or labels.shape != (f.shape[0],):
        raise ValueError(f"per_class_diversity: needs features [N, F] and labels [N], got {tuple(f.shape)} and "
                         f"{tuple(labels.shape)}")
    w = _check_weights(weights, f.shape[0], "per_class_diversity")
    out = torch.full((num_classes,), math.nan, dtype=torch.float64)
    for k in range(num_classes):
        mask = labels == k
        wk = None if w is None else w[mask]
        if int(mask.sum()) >= 2 and (wk is None or float(wk.sum()) > 0):
            out[k] = mean_pairwise_distance(f[mask], wk)
    return out


def feature_stats(features: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(mean [F], covariance [F, F])`` in float64; unbiased (``N - 1``), or with weights normalised to ``w``:
    ``sum_i w_i (f_i - mu)(f_i - mu)^T / (1 - sum_i w_i^2)`` (the same estimator for equal weights)."""
    f = torch.as_tensor(features, dtype=torch.float64)
    if f.dim() != 2 or f.shape[0] < 2:
        raise ValueError(f"feature_stats: needs features [N >= 2, F], got {tuple(f.shape)}")
    w = _check_weights(weights, f.shape[0], "feature_stats")
    w = torch.full((f.shape[0],), 1.0 / f.shape[0], dtype=torch.float64) if w is None else w
    mu = w @ f
    c = f - mu
    denom = 1 - float((w**2).sum())
    if denom <= 0:
        raise ValueError("feature_stats: all weight on one sample; the covariance is undefined")
    return mu, (c * w[:, None]).T @ c / denom


def _sqrtm_psd(m: Tensor) -> Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """Frechet (2-Wasserstein squared) distance between ``N(mu1, cov1)`` and ``N(mu2, cov2)`` (float64)."""
    mu1, mu2 = torch.as_tensor(mu1, dtype=torch.float64), torch.as_tensor(mu2, dtype=torch.float64)
    cov1, cov2 = torch.as_tensor(cov1, dtype=torch.float64), torch.as_tensor(cov2, dtype=torch.float64)
    d = mu1.numel()
    if mu1.shape != (d,) or mu2.shape != (d,) or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(f"frechet_distance: needs means [F] and covariances [F, F] of one F, got {tuple(mu1.shape)}, "
                         f"{tuple(cov1.shape)}, {tuple(mu2.shape)}, {tuple(cov2.shape)}")
    s1 = _sqrtm_psd(cov1)
    cross = torch.linalg.eigvalsh((s1 @ cov2 @ s1 + (s1 @ cov2 @ s1).T) / 2).clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * cross)


def compare_to_target(
    labels: Tensor,
    features: Tensor,
    log_reward: Tensor,
    target_labels: Tensor,
    target_features: Tensor,
    target_log_reward: Tensor,
    target_weights: Tensor,
    num_classes: int = 10,
    min_class_mass: float = 0.01,
) -> dict[str, object]:
    """Every metric of a sample set (classifier ``labels``, ``features``, ``log_reward``) against the target given
    as weighted pretrained samples. Diversity ratios are averaged over classes holding at least
    ``min_class_mass`` of the target and at least 2 samples."""
    h = class_histogram(labels, num_classes)
    h_target = class_histogram(target_labels, num_classes, target_weights)
    div = per_class_diversity(features, labels, num_classes)
    div_target = per_class_diversity(target_features, target_labels, num_classes, target_weights)
    ratio = div / div_target
    keep = (h_target >= min_class_mass) & torch.isfinite(ratio)
    w = _check_weights(target_weights, len(target_labels), "compare_to_target")
    mu, cov = feature_stats(features)
    mu_t, cov_t = feature_stats(target_features, target_weights)
    return {
        "mean_log_reward": float(torch.as_tensor(log_reward, dtype=torch.float64).mean()),
        "target_mean_log_reward": float(w @ torch.as_tensor(target_log_reward, dtype=torch.float64)),
        "class_tv": total_variation(h, h_target),
        "histogram": h.tolist(),
        "target_histogram": h_target.tolist(),
        "diversity": div.tolist(),
        "target_diversity": div_target.tolist(),
        "diversity_ratio": float(ratio[keep].mean()) if bool(keep.any()) else math.nan,
        "frechet": frechet_distance(mu, cov, mu_t, cov_t),
    }
