"""The shape cases of the analytic benchmark (``gmm-{shift-narrow,beta3,loglinear-shift,8d}``): each closed-form
target checked against an independent Monte-Carlo estimate, each case's advertised geometry, the presets.

The independent estimate never uses ``tilt`` or ``noised``: per data component ``k`` it draws ``y ~ N(m_k, s_k^2)``,
noises it to the terminal ``x = sqrt(abar_T) y + sqrt(1 - abar_T) eps`` (the pretrained sampler's marginal) and
weights by ``R(x)^beta``. The component's normaliser ``Z_k = E[R^beta]`` (plain Monte Carlo) gives the target weights
``~ w_k Z_k``; self-normalised importance sampling gives its mean and variance. Agreement within 5 standard errors,
with the standard errors small enough for the check to mean something.
"""

from __future__ import annotations

import pytest
import torch

from fastnabla.config.loader import build_config
from fastnabla.run.config import RunConfig
from fastnabla.run.presets import ANALYTIC_CASES, PRESETS, SHAPE_CASES, analytic_preset, get_preset
from fastnabla.tasks.gmm.build import build_gmm_task
from fastnabla.tasks.gmm.metrics import MIN_MODE_WEIGHT, total_variation

F64 = torch.float64
N_PER_COMPONENT = 100_000

# case -> (exact prior->target mode-weight TV, d, beta, smallest / largest mean shift of a kept mode in target stds,
# largest std shrink factor): what docs/analytic-benchmark.md states about each case
GEOMETRY = {
    "shift-narrow": (0.328, 2, 1.0, 1.27, 1.92, 1.35),
    "beta3": (0.443, 2, 3.0, 0.81, 1.75, 1.17),
    "loglinear-shift": (0.143, 2, 1.0, 1.12, 1.60, 1.00),
    "8d": (0.356, 8, 2.0, 0.87, 1.66, 1.31),
}


def _task(case: str, seed: int = 0):
    return build_gmm_task(build_config(RunConfig, get_preset(f"gmm-{case}"), None, [f"seed={seed}"]))


def _weighted_moments(w: torch.Tensor, x: torch.Tensor):
    """SNIS mean and variance per dimension, with delta-method standard errors."""
    wn = w / w.sum()
    mean = (wn[:, None] * x).sum(0)
    var = (wn[:, None] * (x - mean) ** 2).sum(0)
    se_mean = ((wn[:, None] ** 2) * (x - mean) ** 2).sum(0).sqrt()
    se_var = ((wn[:, None] ** 2) * ((x - mean) ** 2 - var) ** 2).sum(0).sqrt()
    return mean, var, se_mean, se_var


@pytest.mark.parametrize("case", SHAPE_CASES, ids=list(SHAPE_CASES))
def test_closed_form_target_matches_importance_sampling(case):
    task = _task(case)
    data, target, ab = task.data_prior, task.target, task.mdp.alpha_bar_terminal
    g = torch.Generator().manual_seed(2024)
    log_z, se_log_z = [], []
    for k in range(data.num_components):
        y = data.means[k] + data.stds[k] * torch.randn(N_PER_COMPONENT, data.dim, generator=g, dtype=F64)
        x = ab**0.5 * y + (1 - ab) ** 0.5 * torch.randn(y.shape, generator=g, dtype=F64)
        w = torch.exp(task.beta * task.reward.log_reward(x))
        z, se_z = w.mean(), w.std() / N_PER_COMPONENT**0.5
        assert se_z / z < 0.02, f"mode {k}: MC too noisy to be a test"
        log_z.append(float(z.log()))
        se_log_z.append(float(se_z / z))
        mean, var, se_mean, se_var = _weighted_moments(w, x)
        t_var = target.stds[k] ** 2
        assert bool((se_mean < 0.03 * target.stds[k]).all()) and bool((se_var < 0.05 * t_var).all()), "MC too noisy"
        assert bool(((mean - target.means[k]).abs() <= 5 * se_mean + 1e-12).all()), (k, mean, target.means[k])
        assert bool(((var - t_var).abs() <= 5 * se_var + 1e-12).all()), (k, var, t_var)
    log_w = data.weights.log() + torch.tensor(log_z, dtype=F64)
    mc_weights = torch.softmax(log_w, 0)
    # the delta method over the independent per-component estimates: d w_i / d log Z_j = w_i (delta_ij - w_j)
    jac = torch.diag(mc_weights) - mc_weights[:, None] * mc_weights[None]
    se_w = ((jac**2) @ torch.tensor(se_log_z, dtype=F64) ** 2).sqrt()
    assert bool((se_w < 0.01).all()), "MC too noisy"
    assert bool(((mc_weights - target.weights).abs() <= 5 * se_w).all()), (mc_weights, target.weights, se_w)


@pytest.mark.parametrize("case", SHAPE_CASES, ids=list(SHAPE_CASES))
def test_case_geometry_is_as_documented(case):
    tv, d, beta, shift_min, shift_max, shrink = GEOMETRY[case]
    task = _task(case)
    prior, target = task.prior, task.target
    assert target.dim == d and task.beta == beta
    assert total_variation(prior.weights, target.weights) == pytest.approx(tv, abs=5e-4)
    keep = target.weights >= MIN_MODE_WEIGHT
    shift = ((target.means - prior.means) / target.stds).norm(dim=-1)[keep]
    assert float(shift.min()) == pytest.approx(shift_min, abs=0.01)
    assert float(shift.max()) == pytest.approx(shift_max, abs=0.01)
    assert float((prior.stds / target.stds).max()) == pytest.approx(shrink, abs=0.01)
    if case == "shift-narrow":  # the bump lies between the modes and is narrower than their spacing
        c = task.reward.center
        assert float((prior.means - c).norm(dim=-1).min()) > 2 * task.reward.width
    if case == "beta3":
        assert task.beta >= 3
    if case == "loglinear-shift":  # unequal stds across components and axes, the same std before and after
        assert len({round(float(s), 3) for s in prior.stds.reshape(-1)}) >= 4
        assert torch.allclose(prior.stds, target.stds)


@pytest.mark.parametrize("case", SHAPE_CASES, ids=list(SHAPE_CASES))
def test_shape_case_presets(case):
    learned, oracle = get_preset(f"gmm-{case}"), get_preset(f"gmm-{case}-oracle")
    cfg_l, cfg_o = build_config(RunConfig, learned), build_config(RunConfig, oracle)
    assert cfg_l.method.flow == "learned" and cfg_o.method.flow == "oracle"
    assert cfg_l.gmm == cfg_o.gmm and cfg_l.method.beta == cfg_o.method.beta
    default = RunConfig()
    # the tuned method and the training budget of the default run; only the task (and the evaluation cadence) differ
    assert (cfg_l.method, cfg_l.optim, cfg_l.train, cfg_l.sampler) == (
        type(default.method)(**{**default.method.__dict__, "beta": cfg_l.method.beta}), default.optim, default.train,
        default.sampler)
    assert cfg_l.eval.every == 20 and f"gmm-{case}" in PRESETS


@pytest.mark.parametrize(
    ("case", "method", "name"),
    [("default", "nabla-gfn", "gmm-default"), ("default", "oracle", "gmm-oracle"), ("default", "ddpo", "gmm-ddpo"),
     ("narrow-bump", "oracle", "gmm-narrow-bump-oracle"), ("8d", "nabla-gfn", "gmm-8d"),
     ("beta3", "dag-db", "gmm-beta3-dag-db")],
    ids=["default", "default-oracle", "default-baseline", "narrow-oracle", "8d", "beta3-baseline"],
)
def test_analytic_preset_names_and_composition(case, method, name):
    got, config = analytic_preset(case, method)
    assert got == name
    cfg = build_config(RunConfig, config)
    case_cfg = build_config(RunConfig, ANALYTIC_CASES[case][1])
    assert cfg.gmm == case_cfg.gmm and cfg.method.beta == case_cfg.method.beta
    assert cfg.method.name == ("nabla-gfn" if method in ("nabla-gfn", "oracle") else method)
    if method not in ("nabla-gfn", "oracle"):  # the baseline's own settings
        base = build_config(RunConfig, get_preset(f"gmm-{method}"))
        assert (cfg.optim, cfg.train) == (base.optim, base.train)


def test_analytic_preset_errors():
    with pytest.raises(ValueError, match="unknown analytic case"):
        analytic_preset("nope", "nabla-gfn")
    with pytest.raises(ValueError, match="unknown method"):
        analytic_preset("8d", "nope")
