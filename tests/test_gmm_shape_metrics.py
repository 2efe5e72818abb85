"""The shape metrics of the analytic benchmark (per-mode standardised mean error and std ratio), the energy
distance's sampling floor, the closed-form mean log-reward, the reweight-only reference and the last-fifth averages,
each against a brute-force or closed-form value."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastnabla.config.loader import build_config
from fastnabla.run.config import RunConfig
from fastnabla.run.presets import SHAPE_CASES, get_preset
from fastnabla.tasks.gmm.build import build_gmm_task
from fastnabla.tasks.gmm.evaluate import evaluate_mixture, reweight_only_mixture, score_samples
from fastnabla.tasks.gmm.metrics import (
    energy_distance,
    energy_distance_floor,
    mode_shape,
)
from fastnabla.tasks.gmm.mixture import GaussianMixture
from fastnabla.tasks.gmm.rewards import GaussianBumpReward, LogLinearReward
from fastnabla.tasks.gmm.run import last_fifth

F64 = torch.float64

SEPARATED = GaussianMixture.create([[-10.0, 0.0, 3.0], [10.0, 5.0, 0.0], [0.0, -10.0, -4.0]],
                                   [[0.5, 1.0, 0.7], [1.2, 0.6, 0.9], [0.8, 0.8, 0.4]], [0.5, 0.3, 0.2])
# components one std apart: responsibilities are far from hard assignments
OVERLAPPING = GaussianMixture.create([[0.0, 0.0], [1.0, 0.5], [-0.5, 1.0]], [[1.0, 0.8], [0.7, 1.1], [0.9, 0.9]],
                                     [0.45, 0.35, 0.2])


def _brute_shape(x: np.ndarray, mix: GaussianMixture, keep: list[int]):
    """Responsibility-weighted moments with explicit loops over samples and modes (numpy, no torch softmax)."""
    m, s, w = mix.means.numpy(), mix.stds.numpy(), mix.weights.numpy()
    dens = np.stack([w[k] * np.prod(np.exp(-0.5 * ((x - m[k]) / s[k]) ** 2) / (np.sqrt(2 * np.pi) * s[k]), axis=1)
                     for k in range(len(w))], axis=1)
    resp = dens / dens.sum(1, keepdims=True)
    errs, ratios = [], []
    for k in keep:
        r = resp[:, k]
        mean = sum(r[i] * x[i] for i in range(len(x))) / r.sum()
        var = sum(r[i] * (x[i] - mean) ** 2 for i in range(len(x))) / r.sum()
        errs.append(math.sqrt(sum(((mean[j] - m[k, j]) / s[k, j]) ** 2 for j in range(x.shape[1]))))
        ratios.append(np.sqrt(var) / s[k])
    return np.array(errs), np.array(ratios)


def test_mode_shape_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    x = OVERLAPPING.sample(300, g)[0] * 1.2 + 0.3  # not target samples: moments differ from the target's
    shape = mode_shape(x, OVERLAPPING)
    errs, ratios = _brute_shape(x.numpy(), OVERLAPPING, [0, 1, 2])
    assert shape.modes == [0, 1, 2]
    np.testing.assert_allclose(shape.mean_error.numpy(), errs, rtol=1e-10)
    np.testing.assert_allclose(shape.std_ratio.numpy(), ratios, rtol=1e-10)
    assert float(shape.mean_error.min()) > 0.1


@pytest.mark.parametrize("mix", [SEPARATED, OVERLAPPING], ids=["separated", "overlapping"])
def test_exact_samples_have_zero_mean_error_and_unit_std_ratio(mix):
    """Consistent for exact samples however much the components overlap (r_k p = w_k N_k)."""
    n = 100_000
    x = mix.sample(n, torch.Generator().manual_seed(2))[0]
    shape = mode_shape(x, mix)
    d = mix.dim
    for i, k in enumerate(shape.modes):
        n_k = n * float(mix.weights[k])
        # mean error: the norm of d standardised MC errors, ~ sqrt(d / n_k) (the overlap inflates the ratio
        # estimator's variance somewhat); std ratio: ~ 1 / sqrt(2 n_k) per dimension
        assert float(shape.mean_error[i]) < 3 * math.sqrt(d / n_k), (k, shape.mean_error)
        assert float((shape.std_ratio[i] - 1).abs().max()) < 5 / math.sqrt(2 * n_k), (k, shape.std_ratio)


def test_shifted_and_scaled_copies_give_the_known_errors():
    n = 60_000
    x = SEPARATED.sample(n, torch.Generator().manual_seed(3))[0]
    delta = torch.tensor([0.6, 0.0, -0.3], dtype=F64)
    shifted = mode_shape(x + delta, SEPARATED)  # every mode moves by delta: error ||delta / s_k||
    known = (delta / SEPARATED.stds).norm(dim=-1)
    assert torch.allclose(shifted.mean_error, known, atol=0.03)
    summary = shifted.summary()
    assert summary["mean_error"] == pytest.approx(float(known.mean()), abs=0.03)
    assert summary["mean_error_max"] == pytest.approx(float(known.max()), abs=0.03)
    wide = GaussianMixture(SEPARATED.means, SEPARATED.stds * torch.tensor([1.3, 1.0, 0.8], dtype=F64),
                           SEPARATED.weights)
    scaled = mode_shape(wide.sample(n, torch.Generator().manual_seed(4))[0], SEPARATED)
    assert torch.allclose(scaled.std_ratio, torch.tensor([1.3, 1.0, 0.8], dtype=F64).expand(3, 3), atol=0.03)
    s = scaled.summary()
    assert s["std_ratio_worst"] == pytest.approx(1.3, abs=0.03)
    assert s["std_ratio_mean"] == pytest.approx((1.3 * 0.8) ** (1 / 3), abs=0.02)
    assert float(scaled.mean_error.max()) < 0.05


def test_light_modes_are_left_out():
    mix = GaussianMixture.create([[-5.0], [0.0], [5.0]], 0.5, [0.6, 0.37, 0.03])
    shape = mode_shape(mix.sample(2000, torch.Generator().manual_seed(5))[0], mix)
    assert shape.modes == [0, 1] and shape.mean_error.shape == (2,) and shape.std_ratio.shape == (2, 1)
    assert mode_shape(torch.zeros(4, 1, dtype=F64), mix, min_weight=0.5).modes == [0]
    with pytest.raises(ValueError, match="no target mode"):
        mode_shape(torch.zeros(4, 1, dtype=F64), mix, min_weight=0.7)


def test_energy_distance_floor_is_the_two_sample_null_mean():
    """E[V-statistic] between two exact sets is E||Y - Y'|| (1/n + 1/m)."""
    g = torch.Generator().manual_seed(6)
    n, m = 300, 500
    floors = [energy_distance_floor(OVERLAPPING, n, m, g) for _ in range(60)]
    y = OVERLAPPING.sample(4000, g)[0]
    delta = float(torch.cdist(y[:2000], y[2000:]).mean())
    expected = delta * (1 / n + 1 / m)
    mean, se = float(np.mean(floors)), float(np.std(floors, ddof=1) / math.sqrt(len(floors)))
    assert abs(mean - expected) < 4 * se + 0.02 * expected, (mean, expected, se)
    shifted = energy_distance(OVERLAPPING.sample(n, g)[0] + 0.5, OVERLAPPING.sample(m, g)[0])
    assert shifted > 10 * expected


@pytest.mark.parametrize(
    "reward",
    [GaussianBumpReward(torch.tensor([0.5, -1.0], dtype=F64), 1.3), LogLinearReward(torch.tensor([0.7, -0.4],
                                                                                                dtype=F64))],
    ids=["bump", "loglinear"],
)
def test_expected_log_reward_closed_form(reward):
    y = OVERLAPPING.sample(200_000, torch.Generator().manual_seed(7))[0]
    lr = reward.log_reward(y)
    se = float(lr.std()) / math.sqrt(len(lr))
    assert abs(reward.expected_log_reward(OVERLAPPING) - float(lr.mean())) < 5 * se


def _task(case):
    return build_gmm_task(build_config(RunConfig, get_preset(f"gmm-{case}")))


@pytest.mark.parametrize("case", SHAPE_CASES, ids=list(SHAPE_CASES))
def test_reweight_only_has_target_weights_and_fails_the_shape(case):
    task = _task(case)
    rw = reweight_only_mixture(task)
    assert torch.equal(rw.weights, task.target.weights)  # mode-weight TV 0 by construction
    assert torch.equal(rw.means, task.prior.means) and torch.equal(rw.stds, task.prior.stds)
    target_samples = task.target.sample(1000, torch.Generator().manual_seed(8))[0]
    ev = evaluate_mixture(task, rw, 8000, seed=9, target_samples=target_samples)
    exact = evaluate_mixture(task, task.target, 8000, seed=10, target_samples=target_samples)
    # the shape metrics separate it from the target, far beyond the tolerance the method must meet (0.25)
    assert ev.shape["mean_error"] > 0.7 and exact.shape["mean_error"] < 0.15
    assert ev.shape["mean_error"] > exact.shape["mean_error"] + 0.5
    assert ev.energy_distance > exact.energy_distance + 0.02
    if case != "loglinear-shift":  # a log-linear tilt keeps the stds
        assert ev.shape["std_ratio_worst"] > 1.15 and exact.shape["std_ratio_worst"] < 1.1
    assert abs(exact.mean_log_reward - task.reward.expected_log_reward(task.target)) < 0.05


def test_score_samples_of_the_target_itself():
    task = _task("shift-narrow")
    y = task.target.sample(5000, torch.Generator().manual_seed(11))[0]
    ev = score_samples(task, y, task.reward.log_reward(y), target_samples=y[:500])
    assert ev.energy_distance == pytest.approx(0.0, abs=1e-9)
    assert ev.tv_to_target < 0.03 and ev.shape["mean_error"] < 0.15
    assert set(ev.scalars()) == {"tv_to_target", "mean_log_reward", "energy_distance", "mean_error",
                                 "mean_error_max", "std_ratio_mean", "std_ratio_worst"}
    assert len(ev.mean_error_per_mode) == len(ev.std_ratio_per_mode) == int((task.target.weights >= 0.05).sum())


def test_last_fifth_averages_the_evaluations_from_four_fifths_on():
    curve = [{"iteration": it, "tv_to_target": v, "mean_error": 2 * v}
             for it, v in [(0, 9.0), (100, 5.0), (470, 4.0), (480, 0.1), (540, 0.3), (600, 0.2)]]
    tail = last_fifth(curve, 600)
    assert tail["tv_to_target"]["count"] == 3
    assert tail["tv_to_target"]["mean"] == pytest.approx(0.2)
    assert tail["tv_to_target"]["std"] == pytest.approx(0.1)
    assert (tail["tv_to_target"]["min"], tail["tv_to_target"]["max"]) == (0.1, 0.3)
    assert tail["mean_error"]["mean"] == pytest.approx(0.4)
    assert "energy_distance" not in tail
    assert last_fifth(curve[:1], 600) == {}  # the pretrained point never counts
