"""Digits metrics against closed forms and brute-force references."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fastnabla.tasks.digits import metrics as M


def test_histogram_and_total_variation_of_known_histograms():
    h = M.class_histogram(torch.tensor([0, 0, 1, 3]), 4)
    torch.testing.assert_close(h, torch.tensor([0.5, 0.25, 0, 0.25], dtype=torch.float64))
    hw = M.class_histogram(torch.tensor([0, 1, 1]), 3, weights=torch.tensor([2.0, 1.0, 1.0]))
    torch.testing.assert_close(hw, torch.tensor([0.5, 0.5, 0], dtype=torch.float64))
    assert M.total_variation(torch.tensor([0.5, 0.5, 0]), torch.tensor([0, 0.5, 0.5])) == pytest.approx(0.5)
    assert M.total_variation(torch.tensor([1.0, 0]), torch.tensor([0, 1.0])) == pytest.approx(1.0)
    assert M.total_variation(h, h) == 0


def test_pairwise_distance_of_a_square():
    corners = torch.tensor([[0.0, 0], [1, 0], [0, 1], [1, 1]])
    assert M.mean_pairwise_distance(corners) == pytest.approx((4 + 2 * math.sqrt(2)) / 6)
    assert math.isnan(M.mean_pairwise_distance(corners[:1]))


def _brute_diversity(f, labels, w, k):
    num = den = 0.0
    for i, j in itertools.permutations(range(len(f)), 2):
        if labels[i] == k and labels[j] == k:
            num += w[i] * w[j] * float((f[i] - f[j]).norm())
            den += w[i] * w[j]
    return num / den if den > 0 else math.nan


def test_per_class_diversity_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(14, 3, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2, 1, 0, 2, 0, 1, 3])
    w = torch.rand(14, generator=gen, dtype=torch.float64) + 0.1
    for weights in (None, w):
        got = M.per_class_diversity(f, labels, 5, weights)
        ww = [1.0] * 14 if weights is None else w.tolist()
        for k in range(3):
            assert float(got[k]) == pytest.approx(_brute_diversity(f, labels, ww, k), rel=1e-12)
        assert math.isnan(got[3]) and math.isnan(got[4])  # one sample / none


def test_weighted_feature_stats_match_brute_force():
    gen = torch.Generator().manual_seed(1)
    f = torch.randn(30, 4, generator=gen, dtype=torch.float64)
    mu, cov = M.feature_stats(f)
    torch.testing.assert_close(mu, f.mean(0))
    torch.testing.assert_close(cov, torch.cov(f.T))
    w = torch.rand(30, generator=gen, dtype=torch.float64)
    wn = w / w.sum()
    mu_w, cov_w = M.feature_stats(f, w)
    pretrained_mu = sum(wn[i] * f[i] for i in range(30))
    ref_cov = sum(wn[i] * torch.outer(f[i] - pretrained_mu,
                                      f[i] - pretrained_mu) for i in range(30)) / (1 - float((wn**2).sum()))
    torch.testing.assert_close(mu_w, pretrained_mu)
    torch.testing.assert_close(cov_w, ref_cov)


def test_frechet_distance_closed_forms():
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    a, b = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    want = float(((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())  # commuting covariances
    assert M.frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(want, rel=1e-10)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    c1 = x @ x.T + 0.1 * torch.eye(5, dtype=torch.float64)
    y = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    c2 = y @ y.T
    scipy_linalg = pytest.importorskip("scipy.linalg")
    cross = scipy_linalg.sqrtm((c1 @ c2).numpy()).real.trace()
    want = float(torch.trace(c1) + torch.trace(c2)) - 2 * cross
    zero = torch.zeros(5, dtype=torch.float64)
    assert M.frechet_distance(zero, c1, zero, c2) == pytest.approx(want, rel=1e-8)
    assert M.frechet_distance(zero, c2, zero, c1) == pytest.approx(want, rel=1e-8)
    assert abs(M.frechet_distance(zero, c1, zero, c1)) < 1e-9


def test_compare_to_itself_is_perfect():
    gen = torch.Generator().manual_seed(3)
    f = torch.randn(200, 6, generator=gen)
    labels = torch.randint(0, 10, (200,), generator=gen)
    log_r = torch.randn(200, generator=gen)
    out = M.compare_to_target(labels, f, log_r, labels, f, log_r, torch.ones(200))
    assert out["class_tv"] == 0 and abs(out["frechet"]) < 1e-9
    assert out["diversity_ratio"] == pytest.approx(1.0)
    assert out["mean_log_reward"] == pytest.approx(out["target_mean_log_reward"])


@pytest.mark.parametrize("call, match", [
    (lambda: M.class_histogram(torch.tensor([0, 10]), 10), "in \\[0, 10\\)"),
    (lambda: M.class_histogram(torch.tensor([0.5]), 10), "integer"),
    (lambda: M.class_histogram(torch.tensor([0, 1]), 3, torch.tensor([-1.0, 2.0])), "non-negative"),
    (lambda: M.total_variation(torch.tensor([0.5, 0.6]), torch.tensor([0.5, 0.5])), "probability vector"),
    (lambda: M.total_variation(torch.tensor([1.0]), torch.tensor([0.5, 0.5])), "one shape"),
    (lambda: M.per_class_diversity(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long)), "labels \\[N\\]"),
    (lambda: M.feature_stats(torch.zeros(1, 3)), "N >= 2"),
    (lambda: M.frechet_distance(torch.zeros(2), torch.eye(3), torch.zeros(2), torch.eye(2)), "one F"),
])
def test_bad_inputs_name_the_problem(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("p, n", [(0.3, 20), (0.5, 30), (0.05, 40)], ids=["p0.3-n20", "p0.5-n30", "p0.05-n40"])
def test_class_tv_floor_sampling_part_matches_the_binomial(p, n):
    # two classes, uniform weights over a pool with class-1 fraction p: TV(h_n, h*) = |X/n - p|, X ~ Bin(n, p)
    pool = 1000
    labels = (torch.arange(pool) < round(p * pool)).long()
    exact = sum(math.comb(n, k) * p**k * (1 - p) ** (n - k) * abs(k / n - p) for k in range(n + 1))
    f = M.class_tv_floor(labels, torch.ones(pool), n, draws=4000, seed=1, num_classes=2)
    assert f["sampling_only"] == pytest.approx(exact, rel=0.06)
    # the target's own error (a 1,000-sample pool) adds: variance p(1-p)(1/n + 1/pool) in the normal limit
    assert f["mean"] > f["sampling_only"]
    assert f["p95"] > f["mean"]


def test_class_tv_floor_importance_error_grows_as_ess_shrinks():
    # same histogram, one pool with uniform weights, one where 1 % of the samples hold half the weight
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (4000,), generator=gen)
    flat = torch.ones(4000)
    skewed = torch.ones(4000)
    skewed[:40] = 4000 / 40 - 1
    a = M.class_tv_floor(labels, flat, 10**5, draws=100)
    b = M.class_tv_floor(labels, skewed, 10**5, draws=100)
    assert a["sampling_only"] < 5e-3 and b["sampling_only"] < 5e-3  # n large: the sampling part is small
    assert b["mean"] > 3 * a["mean"]
    with pytest.raises(ValueError, match="weights"):
        M.class_tv_floor(labels, torch.ones(3), 100)
