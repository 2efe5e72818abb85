"""The analytic task under the rectified-flow SDE (fastnabla.tasks.gmm.flow_matching): the exact velocity against
autograd of the flow's own marginal, the task's epsilon map, the prior reproduced by the pretrained sampler, and a
short training run that moves towards the closed-form target."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fastnabla.config.fields import ConfigError
from fastnabla.config.loader import build_config
from fastnabla.run.config import RunConfig
from fastnabla.run.driver import run_training
from fastnabla.run.presets import get_preset
from fastnabla.tasks.gmm.build import build_gmm_task
from fastnabla.tasks.gmm.flow_matching import GMMFlowTask, mixture_velocity
from fastnabla.tasks.gmm.fm_prior import prior_fit
from fastnabla.tasks.gmm.mixture import GaussianMixture

F64 = torch.float64
PRIORS = {
    2: GaussianMixture.create([[-2.0, 0.5], [1.5, 1.0], [0.3, -1.8]], [[0.5, 0.7], [0.8, 0.4], [0.6, 0.6]],
                              [0.5, 0.2, 0.3]),
    3: GaussianMixture.create([[1.0, 0.0, -1.0], [-1.0, 1.0, 0.5]], [0.7, 0.5], [0.4, 0.6]),
}


def flow_log_marginal(prior: GaussianMixture, x: torch.Tensor, s: float) -> torch.Tensor:
    """``log p_s(x)`` of ``x_s = (1 - s) x_data + s n``, written out here:
    ``sum_k w_k N(x; (1 - s) m_k, diag((1 - s)^2 s_k^2 + s^2))``."""
    var = (1 - s) ** 2 * prior.stds**2 + s**2  # [K, d]
    diff = x[:, None, :] - (1 - s) * prior.means
    comp = -0.5 * (diff**2 / var + var.log() + math.log(2 * math.pi)).sum(-1)
    return torch.logsumexp(prior.weights.log() + comp, dim=-1)


@pytest.mark.parametrize("d", [2, 3], ids=["2d", "3d"])
@pytest.mark.parametrize("s", [0.02, 0.3, 0.7, 0.97, 1.0], ids=lambda s: f"s{s}")
def test_mixture_velocity_from_the_flow_marginal_score(d, s):
    """``v* = E[n - x_data | x_s]`` with ``E[n | x_s] = -s grad log p_s`` and ``E[x_data | x_s] = (x - s E[n]) /
    (1 - s)`` (``s < 1``); at pure noise ``v* = x - E[x_data]``."""
    prior = PRIORS[d]
    x = 2 * torch.randn(11, d, generator=torch.Generator().manual_seed(5), dtype=F64)
    v = mixture_velocity(prior, x, torch.tensor(s, dtype=F64))
    if s == 1.0:
        ref = x - (prior.weights[:, None] * prior.means).sum(0)
    else:
        xi = x.clone().requires_grad_(True)
        (score,) = torch.autograd.grad(flow_log_marginal(prior, xi, s).sum(), xi)
        e_noise = -s * score
        ref = e_noise - (x - s * e_noise) / (1 - s)
    torch.testing.assert_close(v, ref, rtol=1e-10, atol=1e-10)


def _task(**over) -> GMMFlowTask:
    settings = ["sampler.num_steps=6", "gmm.network.hidden=16", *[f"{k}={v}" for k, v in over.items()]]
    task = build_gmm_task(build_config(RunConfig, get_preset("gmm-fm-default"), None, settings))
    assert isinstance(task, GMMFlowTask)
    return task.double()


def test_pretrained_eps_is_the_vp_noise_predictor_of_the_rescaled_state():
    task = _task()
    mdp = task.mdp
    y = torch.randn(9, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    for t in range(mdp.num_steps):
        step = torch.full((9,), t)
        eps = task.pretrained_eps(y, step)
        s = float(mdp.flow_sigmas[t])
        v = mixture_velocity(task.data_prior, y * float(mdp.scale[t]), torch.tensor(s, dtype=F64))
        tol = {"rtol": 1e-5, "atol": 1e-6}  # the task holds the epsilon map in float32 buffers
        torch.testing.assert_close(mdp.epsilon_to_velocity(eps, y, step), v, **tol)
        if s < 1:  # the table's epsilon is the VP eps* of y at its true abar
            torch.testing.assert_close(eps, task.data_prior.eps_star(y, float(mdp.vp_alpha_bar[t])), **tol)


@pytest.mark.parametrize("residual", ["velocity", "eps"])
def test_residual_is_added_to_the_velocity_or_the_epsilon(residual):
    task = _task(**{"gmm.network.residual": residual})
    torch.nn.init.normal_(task.residual.head.weight, std=0.3)
    y = torch.randn(7, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    step = torch.tensor([0, 1, 2, 3, 4, 5, 5])
    r = task.residual(y, step)
    delta = task.policy_eps(y, step) - task.pretrained_eps(y, step)
    expected = task.mdp.eps_v[step][:, None] * r if residual == "velocity" else r
    torch.testing.assert_close(delta, expected)
    assert float(delta.detach().abs().max()) > 0


def test_oracle_flow_is_constant_at_pure_noise_and_the_reward_at_the_end():
    task = _task()
    y = torch.randn(5, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    first, last = torch.zeros(5, dtype=torch.int64), torch.full((5,), task.mdp.num_steps)
    f0 = task.oracle_log_flow(y, first)
    torch.testing.assert_close(f0, f0[:1].expand(5))  # s = 1: x_s carries no information about the data
    assert float(task.oracle_log_flow_grad(y, first).abs().max()) < 1e-12
    torch.testing.assert_close(task.oracle_log_flow(y, last), task.beta * task.reward.log_reward(y))


@pytest.mark.parametrize(("settings", "match"), [
    pytest.param(["sampler.flow.noise_level=0"], "noise_level=0", id="deterministic-ode"),
    pytest.param(["sampler.sampler=ddim"], "gmm.network.residual", id="velocity-residual-on-ddim"),
    pytest.param(["sampler.flow.scheduler={beta_schedule: linear}"], "sampler.flow", id="ddpm-key"),
])
def test_config_errors(settings, match):
    with pytest.raises(ConfigError, match=match):
        build_gmm_task(build_config(RunConfig, get_preset("gmm-fm-default"), None, settings))


def test_sde_with_the_exact_velocity_reproduces_the_prior():
    """50 steps, 40,000 samples: mode weights and spread of the prior within a few times the sampling floor."""
    task = build_gmm_task(build_config(RunConfig, get_preset("gmm-fm-default"), None, ["sampler.num_steps=50"]))
    fit = prior_fit(task, 40_000, 1000, [0], "flow SDE")
    assert fit.tv[0] < 0.015  # sampling std of the TV at this size ~0.003
    assert fit.std_ratio[0] < 0.03
    assert fit.energy[0] < 0.02  # floor at 1,000 vs 1,000 samples ~0.005


SMALL_CASE = [
    "sampler.num_steps=20", "train.batch_size=128", "train.iterations=100", "train.transition_fraction=0.25",
    "gmm.network.hidden=64", "gmm.mixture.means=[[-2,0],[2,0],[0,2.5]]", "gmm.mixture.weights=[0.5,0.3,0.2]",
    "gmm.reward.center=[1.5,1.5]", "gmm.reward.width=1.5", "eval.every=50", "eval.num_samples=2000",
    "eval.final_num_samples=4000", "eval.energy_samples=500", "output.figure=false", "output.progress=false",
]


@pytest.mark.parametrize("preset", ["gmm-fm-default", "gmm-fm-oracle"])
def test_training_on_the_flow_sde_moves_towards_the_target(tmp_path, preset):
    cfg = build_config(RunConfig, get_preset(preset), None,
                       [*SMALL_CASE, f"name={preset}", f"output.dir={tmp_path / 'run'}"])
    m = run_training(cfg, verbose=False).metrics
    assert m["tv_prior_to_target"] > 0.35
    assert m["tv_to_target"] < 0.5 * m["tv_prior_to_target"]
    assert m["mean_log_reward"] > m["mean_log_reward_prior"] + 0.5


def test_flow_prior_cli(capsys):
    from fastnabla.compare.flow_prior import main

    assert main(["--steps", "4", "8", "--samples", "2000", "--energy-samples", "200", "--seeds", "0"]) == 0
    out = capsys.readouterr().out
    assert "flow-sde (noise level 1.41), 4 steps" in out and "8 steps" in out and "exact prior draws (floor)" in out
    assert main(["sampler.flow.noise_level=-1", "--steps", "4", "--seeds", "0"]) == 2
    assert "sampler.flow.noise_level" in capsys.readouterr().err


BASELINES = ["ddpo", "residual-db", "dag-db", "refl", "draft-k", "draft-lv"]


@pytest.mark.parametrize("method", BASELINES)
def test_every_baseline_runs_on_the_flow_sde(tmp_path, method):
    """The baselines consume the same per-step table: each trains a few iterations on the flow SDE with finite
    losses and a non-zero policy gradient."""
    flow = get_preset("gmm-fm-default")
    cfg = build_config(RunConfig, {**get_preset(f"gmm-{method}"), "sampler": flow["sampler"], "gmm": flow["gmm"]},
                       None, ["train.iterations=3", "train.batch_size=16", "eval.every=3", "eval.num_samples=200",
                              "eval.final_num_samples=200", "eval.energy_samples=50", "output.figure=false",
                              "output.progress=false", f"name={method}", f"output.dir={tmp_path / 'run'}"])
    assert cfg.sampler.sampler == "flow-sde" and cfg.method.name == method
    outcome = run_training(cfg, verbose=False)
    m = outcome.metrics
    assert outcome.exit_code == 0 and not m["diverged"]
    assert math.isfinite(m["tv_to_target"]) and math.isfinite(m["mean_log_reward"])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if "loss" in r]
    assert trained and all(math.isfinite(r["loss"]) for r in trained)
    assert any(r["grad_norm_policy"] > 0 for r in trained)
