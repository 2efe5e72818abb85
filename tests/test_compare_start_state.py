"""The start-state bias estimator (Proposition 4: x_0 is not reweighted) against closed forms."""

from __future__ import annotations

import math

import pytest

from fastnabla.compare.start_state import start_state_bias
from fastnabla.config.loader import build_config
from fastnabla.run.config import RunConfig
from fastnabla.tasks.gmm.build import build_gmm_task

M, S, A, BETA = 0.7, 0.8, 0.9, 1.5
# one Gaussian component and a log-linear reward: every distribution involved is Gaussian; small betas keep abar_0
# (the first state's signal) large enough for the bias to show
GAUSSIAN = [f"gmm.mixture.means=[[{M}]]", f"gmm.mixture.stds={S}", "gmm.mixture.weights=[1.0]",
            "gmm.reward.kind=loglinear", f"gmm.reward.weights=[{A}]", f"method.beta={BETA}", "sampler.num_steps=5",
            "sampler.scheduler.beta_end=0.001"]


def test_reached_and_target_reward_match_the_gaussian_closed_form():
    task = build_gmm_task(build_config(RunConfig, None, None, GAUSSIAN))
    abar = float(task.state_alpha_bar[0])
    assert 0.3 < abar < 0.9
    bias = start_state_bias(task, num=400_000, seed=1)
    var0 = abar * S**2 + 1 - abar
    c = math.sqrt(abar) * S**2 / var0  # posterior mean of x_T given x_0: m + c (x_0 - sqrt(abar) m)
    posterior_var = S**2 * (1 - abar) / var0
    # from x_0 ~ N(0, 1) the pretrained marginal is N(m (1 - c sqrt(abar)), v + c^2); the target tilts it by R^beta,
    # the reached optimum tilts each conditional N(., v) instead: the shifts are beta a (v + c^2) and beta a v
    start_mean = M * (1 - c * math.sqrt(abar))
    want_target = A * (start_mean + BETA * A * (posterior_var + c**2))
    want_reached = A * (start_mean + BETA * A * posterior_var)
    assert bias.mean_log_reward_target == pytest.approx(want_target, abs=0.01)
    assert bias.mean_log_reward_reached == pytest.approx(want_reached, abs=0.01)
    assert abs(want_reached - want_target) > 0.1  # the bias is real here
    # log F(x_0) is linear in x_0 with slope beta a sqrt(abar) s^2 / var0, so its variance under N(0, 1) is known
    slope = BETA * A * math.sqrt(abar) * S**2 / var0
    assert bias.var_log_flow_x0 == pytest.approx(slope**2, rel=0.02)


def test_a_flat_reward_has_no_start_state_bias():
    task = build_gmm_task(build_config(RunConfig, None, None, ["gmm.reward.width=1e6"]))
    bias = start_state_bias(task, num=20_000)
    assert bias.var_log_flow_x0 < 1e-12 and bias.tv_target_to_reached < 1e-9
