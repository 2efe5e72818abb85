"""Evaluation metrics against independent computations: closed forms for Gaussians, scipy.linalg.sqrtm, numpy
covariances, brute-force pair loops and the Python statistics module."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import scipy.linalg
import torch

from fastnabla.eval.diversity import feature_variance, mean_pairwise_cosine_distance
from fastnabla.eval.frechet import (
    frechet_distance,
    frechet_distance_from_features,
    gaussian_statistics,
    trace_sqrt_product,
)
from fastnabla.eval.reward_stats import reward_statistics


def _random_spd(d: int, gen: torch.Generator, rank: int | None = None) -> torch.Tensor:
    a = torch.randn(d, rank or d, generator=gen, dtype=torch.float64)
    return a @ a.T / (rank or d) + (0 if rank else 0.1) * torch.eye(d, dtype=torch.float64)


def _scipy_frechet(mu1, s1, mu2, s2) -> float:
    """The textbook formula with scipy's general matrix square root of S1 S2."""
    mu1, s1, mu2, s2 = (np.asarray(t, dtype=np.float64) for t in (mu1, s1, mu2, s2))
    root = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root).real)


# --- Frechet distance ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 3, 17], ids=lambda d: f"d{d}")
def test_frechet_closed_form_diagonal(d, gen):
    """Diagonal covariances: d^2 = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2."""
    mu1, mu2 = torch.randn(d, generator=gen, dtype=torch.float64), torch.randn(d, generator=gen, dtype=torch.float64)
    a, b = torch.rand(d, generator=gen, dtype=torch.float64) + 0.1, torch.rand(d, generator=gen, dtype=torch.float64)
    expected = float(((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    got = frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b))
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_frechet_closed_form_shared_eigenvectors(gen):
    """S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T commute: the trace term is sum_i sqrt(a_i b_i)."""
    d = 9
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    a, b = torch.rand(d, generator=gen, dtype=torch.float64) * 3, torch.rand(d, generator=gen, dtype=torch.float64)
    s1, s2 = q @ torch.diag(a) @ q.T, q @ torch.diag(b) @ q.T
    assert trace_sqrt_product(s1, s2) == pytest.approx(float((a * b).sqrt().sum()), rel=1e-10)
    zero = torch.zeros(d, dtype=torch.float64)
    assert frechet_distance(zero, s1, zero, s2) == pytest.approx(float(((a.sqrt() - b.sqrt()) ** 2).sum()), rel=1e-9)


def test_frechet_closed_form_isotropic_against_general(gen):
    """S1 = s^2 I: Tr((S1 S2)^{1/2}) = s Tr(S2^{1/2}) for any S2 (no shared basis needed)."""
    d, s = 6, 1.7
    s2 = _random_spd(d, gen)
    expected = s * float(torch.linalg.eigvalsh(s2).clamp(min=0).sqrt().sum())
    assert trace_sqrt_product(s**2 * torch.eye(d, dtype=torch.float64), s2) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("d", [2, 5, 31], ids=lambda d: f"d{d}")
def test_frechet_matches_scipy_sqrtm(d, gen):
    mu1, mu2 = torch.randn(d, generator=gen, dtype=torch.float64), torch.randn(d, generator=gen, dtype=torch.float64)
    s1, s2 = _random_spd(d, gen), _random_spd(d, gen)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_scipy_frechet(mu1, s1, mu2, s2), rel=1e-8)


@pytest.mark.parametrize(
    ("n1", "n2", "d"),
    [(40, 50, 7), (9, 12, 33), (2, 3, 5), (6, 6, 512)],
    ids=["n>d", "n<d", "tiny-sets", "n<<d-rank-deficient"],
)
def test_frechet_from_features_matches_statistics_and_scipy(n1, n2, d, gen):
    """Samples -> (mean, unbiased covariance) -> formula, against the nuclear-norm path; scipy where full-rank."""
    x1 = torch.randn(n1, d, generator=gen, dtype=torch.float64) * 2 + 0.5
    x2 = torch.randn(n2, d, generator=gen, dtype=torch.float64) @ torch.diag(torch.linspace(0.2, 1.5, d,
                                                                                          dtype=torch.float64))
    got = frechet_distance_from_features(x1, x2)
    mu1, s1 = x1.mean(0).numpy(), np.cov(x1.numpy(), rowvar=False).reshape(d, d)
    mu2, s2 = x2.mean(0).numpy(), np.cov(x2.numpy(), rowvar=False).reshape(d, d)
    via_statistics = frechet_distance(torch.from_numpy(mu1), torch.from_numpy(s1), torch.from_numpy(mu2),
                                      torch.from_numpy(s2))
    assert got == pytest.approx(via_statistics, rel=1e-8)
    if min(n1, n2) > d:  # scipy's general sqrtm is accurate on full-rank products only
        assert got == pytest.approx(_scipy_frechet(mu1, s1, mu2, s2), rel=1e-8)


def test_frechet_of_samples_converges_to_the_closed_form():
    """Gaussians with known covariances: the distance of large samples approaches the population value."""
    gen = torch.Generator().manual_seed(7)
    d, n = 3, 200_000
    mu1, mu2 = torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64), torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64)
    l1 = torch.tensor([[1.0, 0, 0], [0.5, 1.0, 0], [0.2, -0.3, 0.7]], dtype=torch.float64)
    l2 = torch.tensor([[0.6, 0, 0], [-0.4, 1.2, 0], [0.0, 0.3, 0.9]], dtype=torch.float64)
    x1 = mu1 + torch.randn(n, d, generator=gen, dtype=torch.float64) @ l1.T
    x2 = mu2 + torch.randn(n, d, generator=gen, dtype=torch.float64) @ l2.T
    population = _scipy_frechet(mu1, l1 @ l1.T, mu2, l2 @ l2.T)
    assert frechet_distance_from_features(x1, x2) == pytest.approx(population, rel=0.02)


def test_frechet_identities(gen):
    x = torch.randn(10, 40, generator=gen, dtype=torch.float64)
    y = torch.randn(12, 40, generator=gen, dtype=torch.float64) * 1.3
    shift = torch.randn(40, generator=gen, dtype=torch.float64)
    assert frechet_distance_from_features(x, x) == pytest.approx(0.0, abs=1e-10)
    assert frechet_distance_from_features(x + shift, x) == pytest.approx(float((shift**2).sum()), rel=1e-9)
    assert frechet_distance_from_features(x, y) == pytest.approx(frechet_distance_from_features(y, x), rel=1e-10)
    assert frechet_distance_from_features(x.float(), y.float()) == pytest.approx(
        frechet_distance_from_features(x, y), rel=1e-5)


def test_gaussian_statistics_match_numpy(gen):
    x = torch.randn(13, 4, generator=gen)
    mu, sigma = gaussian_statistics(x)
    np.testing.assert_allclose(mu.numpy(), x.double().numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), np.cov(x.double().numpy(), rowvar=False), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.randn(1, 4), torch.randn(5, 4)), "features1 needs at least 2 samples"),
        ((torch.randn(5, 4), torch.randn(5, 3)), "different widths"),
        ((torch.randn(5), torch.randn(5, 4)), r"features1 must be \[n, d\]"),
        ((torch.randn(3, 2), torch.full((3, 2), float("nan"))), "features2 holds non-finite"),
    ],
    ids=["one-sample", "widths", "1-d", "nan"],
)
def test_frechet_errors_name_the_argument(args, match):
    with pytest.raises(ValueError, match=match):
        frechet_distance_from_features(*args)


# --- diversity ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "d"), [(2, 3), (7, 5), (11, 64)], ids=["pair", "odd", "wide"])
def test_pairwise_cosine_distance_against_a_pair_loop(n, d, gen):
    x = torch.randn(n, d, generator=gen) * torch.rand(n, 1, generator=gen) * 5
    pairs = [1 - float(torch.nn.functional.cosine_similarity(x[i].double(), x[j].double(), dim=0))
             for i in range(n) for j in range(n) if i != j]
    assert mean_pairwise_cosine_distance(x) == pytest.approx(sum(pairs) / len(pairs), rel=1e-10)


def test_pairwise_cosine_distance_known_values():
    assert mean_pairwise_cosine_distance(torch.tensor([[1.0, 0.0], [0.0, 3.0]])) == pytest.approx(1.0)
    assert mean_pairwise_cosine_distance(torch.tensor([[2.0, 1.0], [-4.0, -2.0]])) == pytest.approx(2.0)
    assert mean_pairwise_cosine_distance(torch.tensor([[1.0, 2.0]] * 4)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(("n", "d"), [(2, 1), (9, 4), (5, 300)], ids=["pair", "tall", "wide"])
def test_feature_variance_is_the_covariance_trace(n, d, gen):
    x = torch.randn(n, d, generator=gen) * 3 + 1
    expected = float(np.trace(np.atleast_2d(np.cov(x.double().numpy(), rowvar=False))))
    assert feature_variance(x) == pytest.approx(expected, rel=1e-10)


def test_pairwise_distance_equals_variance_of_unit_features(gen):
    """sum_{i != j} |f_i - f_j|^2 = 2 n sum_i |f_i - mean|^2 and |f_i - f_j|^2 = 2 (1 - cos) for unit vectors."""
    x = torch.randn(8, 16, generator=gen, dtype=torch.float64) * torch.rand(8, 1, generator=gen, dtype=torch.float64)
    unit = x / x.norm(dim=1, keepdim=True)
    assert mean_pairwise_cosine_distance(x) == pytest.approx(feature_variance(unit), rel=1e-10)


def test_diversity_errors():
    with pytest.raises(ValueError, match="at least 2 images"):
        feature_variance(torch.randn(1, 3))
    with pytest.raises(ValueError, match="zero vector"):
        mean_pairwise_cosine_distance(torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        mean_pairwise_cosine_distance(torch.randn(3, 2, 2))


# --- reward statistics --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 5, 64], ids=lambda n: f"n{n}")
def test_reward_statistics_match_the_statistics_module(n, gen):
    scores = torch.randn(n, generator=gen) * 2 + 6
    values = [float(v) for v in scores.double()]
    got = reward_statistics(scores)
    assert got["count"] == n
    assert got["mean"] == pytest.approx(statistics.fmean(values), rel=1e-12)
    assert got["std"] == pytest.approx(statistics.stdev(values), rel=1e-10)


def test_reward_statistics_single_image_and_errors():
    assert math.isnan(reward_statistics(torch.tensor([0.3]))["std"])
    with pytest.raises(ValueError, match="non-finite"):
        reward_statistics(torch.tensor([1.0, float("inf")]))
    with pytest.raises(ValueError, match="non-empty"):
        reward_statistics(torch.zeros(0))
