"""The rectified-flow SDE as a denoising MDP (fastnabla.mdp.flow_matching) against diffusers'
``FlowMatchEulerDiscreteScheduler`` and Flow-GRPO's SDE step, written out independently here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from fastnabla.mdp import DenoisingMDP, FlowMatchMDP, build_flow_mdp, step_mean, tweedie_x0
from fastnabla.mdp.flow_matching import (
    FLUX_SCHEDULER_CONFIG,
    SD3_SCHEDULER_CONFIG,
    dynamic_shift_mu,
    flow_match_sigmas,
)

SHAPE = (3, 4, 5, 6)

# (scheduler config, num_steps, set_timesteps kwargs)
SCHEDULE_CASES = [
    pytest.param(SD3_SCHEDULER_CONFIG, 28, {}, id="sd3-shift3-28"),
    pytest.param(SD3_SCHEDULER_CONFIG, 1, {}, id="sd3-1-step"),
    pytest.param({"shift": 1.0}, 10, {}, id="shift1-10"),
    pytest.param({"shift": 3.0, "num_train_timesteps": 500}, 7, {}, id="shift3-n500-7"),
    pytest.param({"shift": 3.0, "shift_terminal": 0.02}, 9, {}, id="shift-terminal-9"),
    pytest.param(FLUX_SCHEDULER_CONFIG, 7, {"mu": 0.8}, id="flux-dynamic-mu0.8"),
    pytest.param({**FLUX_SCHEDULER_CONFIG, "time_shift_type": "linear"}, 7, {"mu": 0.9}, id="flux-linear-shift"),
    pytest.param(FLUX_SCHEDULER_CONFIG, 7, {"mu": 1.15, "sigmas": list(np.linspace(1.0, 1 / 7, 7))},
                 id="flux-pipeline-sigmas"),
]


@pytest.mark.parametrize(("cfg", "steps", "kw"), SCHEDULE_CASES)
def test_timesteps_and_sigmas_equal_diffusers(cfg, steps, kw):
    sched = FlowMatchEulerDiscreteScheduler(**cfg)
    sched.set_timesteps(steps, **kw)
    timesteps, sigmas = flow_match_sigmas(cfg, steps, kw.get("mu"), kw.get("sigmas"))
    assert torch.equal(timesteps, sched.timesteps)
    assert torch.equal(sigmas, sched.sigmas)
    mdp = build_flow_mdp(cfg, steps, 0.7, mu=kw.get("mu"), sigmas=kw.get("sigmas"))
    assert torch.equal(mdp.model_timesteps, sched.timesteps)
    assert torch.equal(mdp.flow_sigmas, sched.sigmas.double())


def test_dynamic_shift_mu_equals_flux_pipeline():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for seq_len in (16, 256, 1024, 4096):
        assert dynamic_shift_mu(FLUX_SCHEDULER_CONFIG, seq_len) == pytest.approx(calculate_shift(seq_len), abs=1e-12)
    a = build_flow_mdp(FLUX_SCHEDULER_CONFIG, 5, image_seq_len=1024)
    b = build_flow_mdp(FLUX_SCHEDULER_CONFIG, 5, mu=calculate_shift(1024))
    assert torch.equal(a.flow_sigmas, b.flow_sigmas)


def _step_in_x(mdp: FlowMatchMDP, x: torch.Tensor, v: torch.Tensor, t: int, z: torch.Tensor) -> torch.Tensor:
    """One MDP step run through the generic ops on the rescaled state ``y = x / c``, returned as ``x'``."""
    step = torch.full((x.shape[0],), t, dtype=torch.int64)
    c = mdp.gather(step, x.dim(), torch.float64)
    y = x / c["scale"]
    eps = mdp.velocity_to_epsilon(v, y, step)
    y_next = step_mean(y, eps, c["a"], c["b"]) + c["sigma"] * z
    return y_next * c["scale_next"]


ODE_CASES = [
    pytest.param(SD3_SCHEDULER_CONFIG, 8, {}, id="sd3-8"),
    pytest.param({"shift": 1.0}, 5, {}, id="shift1-5"),
    pytest.param(FLUX_SCHEDULER_CONFIG, 6, {"mu": 1.0}, id="flux-6"),
]


@pytest.mark.parametrize(("cfg", "steps", "kw"), ODE_CASES)
def test_noise_level_zero_is_diffusers_euler_step(cfg, steps, kw):
    """``noise_level = 0``: every step equals ``FlowMatchEulerDiscreteScheduler.step`` (``x + (s' - s) v``)."""
    mdp = build_flow_mdp(cfg, steps, 0.0, mu=kw.get("mu"))
    assert bool((mdp.sigma == 0).all())
    sched = FlowMatchEulerDiscreteScheduler(**cfg)
    sched.set_timesteps(steps, **kw)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    for t in range(steps):
        v = torch.randn(SHAPE, generator=g, dtype=torch.float64)
        ours = _step_in_x(mdp, x, v, t, torch.zeros_like(x))
        theirs = sched.step(v.float(), sched.timesteps[t], x.float()).prev_sample.double()
        torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-6)  # diffusers steps in float32
        x = theirs


def flow_grpo_step(x, v, s, s_next, s_first_next, noise_level):
    """Flow-GRPO's ``sde_step_with_logprob`` (flow_grpo/diffusers_patch/sd3_sde_with_logprob.py at ac4c86e),
    written out from its source: the step's mean and standard deviation in ``x``."""
    dt = s_next - s
    std = math.sqrt(s / (1 - (s_first_next if s == 1 else s))) * noise_level
    mean = x * (1 + std**2 / (2 * s) * dt) + v * (1 + std**2 * (1 - s) / (2 * s)) * dt
    return mean, std * math.sqrt(-dt)


SDE_CASES = [
    pytest.param(SD3_SCHEDULER_CONFIG, 10, 0.7, {}, id="sd3-10-a0.7"),
    pytest.param({"shift": 1.0}, 6, 1.0, {}, id="shift1-6-a1"),
    pytest.param(FLUX_SCHEDULER_CONFIG, 5, 0.5, {"mu": 1.15}, id="flux-5-a0.5"),
    pytest.param(SD3_SCHEDULER_CONFIG, 1, 0.7, {}, id="sd3-1-step"),
]


@pytest.mark.parametrize(("cfg", "steps", "level", "kw"), SDE_CASES)
def test_sde_step_mean_and_std_equal_flow_grpo(cfg, steps, level, kw):
    mdp = build_flow_mdp(cfg, steps, level, mu=kw.get("mu"))
    s_all = mdp.flow_sigmas.tolist()
    g = torch.Generator().manual_seed(1)
    for t in range(steps):
        x = torch.randn(SHAPE, generator=g, dtype=torch.float64)
        v = torch.randn(SHAPE, generator=g, dtype=torch.float64)
        mean_ref, std_ref = flow_grpo_step(x, v, s_all[t], s_all[t + 1], s_all[1], level)
        mean = _step_in_x(mdp, x, v, t, torch.zeros_like(x))
        torch.testing.assert_close(mean, mean_ref, rtol=1e-12, atol=1e-12)
        # the noise of the rescaled state, mapped back to x
        assert float(mdp.sigma[t] * mdp.scale[t + 1]) == pytest.approx(std_ref, rel=1e-12)
        assert std_ref > 0


@pytest.mark.parametrize(("cfg", "steps", "level", "kw"), SDE_CASES)
def test_rescaling_identities(cfg, steps, level, kw):
    """``y = x / c`` is VP with ``sqrt(abar) = (1 - s) / c``, ``eps = n``; Tweedie on ``(y, eps_hat)`` gives
    ``x_hat = x - s v_hat`` at every state (the nominal pair at ``s = 1`` included)."""
    mdp = build_flow_mdp(cfg, steps, level, mu=kw.get("mu"))
    s = mdp.flow_sigmas
    c = mdp.scale
    torch.testing.assert_close(c, ((1 - s) ** 2 + s**2).sqrt(), rtol=0, atol=0)
    assert float(c[0]) == 1.0 and float(c[-1]) == 1.0  # no rescaling of the initial noise or the final sample
    torch.testing.assert_close(mdp.vp_alpha_bar, ((1 - s) / c) ** 2)
    torch.testing.assert_close(mdp.alpha_bar[1:], mdp.vp_alpha_bar[1:-1])  # nominal only where s = 1
    torch.testing.assert_close(mdp.alpha_bar_next, mdp.vp_alpha_bar[1:])
    assert mdp.alpha_bar_terminal == 1.0
    assert float(mdp.alpha_bar[0]) > 0 and bool((mdp.alpha_bar < 1).all())

    g = torch.Generator().manual_seed(2)
    x_data = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    noise = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    for t in range(steps):
        st = float(s[t])
        x = (1 - st) * x_data + st * noise
        v = noise - x_data  # the exact conditional velocity
        step = torch.full((SHAPE[0],), t, dtype=torch.int64)
        co = mdp.gather(step, len(SHAPE), torch.float64)
        y = x / co["scale"]
        eps = mdp.velocity_to_epsilon(v, y, step)
        torch.testing.assert_close(tweedie_x0(y, eps, co["alpha_bar"]), x_data)
        if st < 1:
            torch.testing.assert_close(eps, noise)  # the VP epsilon of y is the flow's noise
            torch.testing.assert_close(y, co["alpha_bar"].sqrt() * x_data + (1 - co["alpha_bar"]).sqrt() * noise)
        torch.testing.assert_close(mdp.epsilon_to_velocity(eps, y, step), v)


def test_is_a_denoising_mdp_the_ops_accept():
    mdp = build_flow_mdp(SD3_SCHEDULER_CONFIG, 4)
    assert isinstance(mdp, DenoisingMDP)
    assert mdp.sampler == "flow-sde" and mdp.noise_level == 0.7 and mdp.num_steps == 4
    assert bool(mdp.stochastic.all())
    for name in ("alpha_bar", "alpha_bar_next", "a", "b", "sigma"):
        assert getattr(mdp, name).shape == (4,) and getattr(mdp, name).dtype == torch.float64
    with pytest.raises(NotImplementedError, match="velocity_to_epsilon"):
        mdp.to_epsilon(torch.zeros(1), torch.zeros(1), torch.zeros(1))


ERROR_CASES = [
    pytest.param({"beta_schedule": "linear"}, {}, "DDPM/DDIM settings", id="ddpm-key"),
    pytest.param({"use_karras_sigmas": True}, {}, "use_karras_sigmas=True", id="karras"),
    pytest.param({"stochastic_sampling": True}, {}, "stochastic_sampling=True", id="diffusers-stochastic"),
    pytest.param({"time_shift_type": "cubic"}, {}, "time_shift_type", id="time-shift-type"),
    pytest.param(FLUX_SCHEDULER_CONFIG, {}, "needs mu", id="dynamic-without-mu"),
    pytest.param(SD3_SCHEDULER_CONFIG, {"noise_level": -0.1}, "noise_level", id="negative-noise"),
    pytest.param(SD3_SCHEDULER_CONFIG, {"noise_level": float("nan")}, "noise_level", id="nan-noise"),
    pytest.param(SD3_SCHEDULER_CONFIG, {"num_steps": 0}, "num_steps", id="zero-steps"),
    pytest.param(SD3_SCHEDULER_CONFIG, {"sigmas": [1.0, 0.5]}, "custom sigmas", id="sigmas-length"),
]


@pytest.mark.parametrize(("cfg", "kw", "match"), ERROR_CASES)
def test_errors_name_the_setting(cfg, kw, match):
    kw = {"num_steps": 3, **kw}
    with pytest.raises(ValueError, match=match):
        build_flow_mdp(cfg, **kw)


def _gaussian_chain(mdp: FlowMatchMDP, data_std: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact second moments of the sampler on 1-D data ``N(0, S^2)`` with the exact (linear) velocity
    ``v*(x, s) = (1 - r_s) x / s``, ``r_s = (1 - s) S^2 / ((1 - s)^2 S^2 + s^2)`` (``E[x_data | x_s] = r_s x_s``):
    ``Var(x_t)`` per state and the regression coefficient of ``x_T`` on ``x_t``."""
    s, c = mdp.flow_sigmas.numpy(), mdp.scale.numpy()
    gain, var = [], [1.0]  # y_{t+1} = g_t y_t + sigma_t z, Var(y_0) = 1
    for t in range(mdp.num_steps):
        r = (1 - s[t]) * data_std**2 / ((1 - s[t]) ** 2 * data_std**2 + s[t] ** 2)
        k = (1 - r) / s[t] * c[t]  # v = k y
        g = float(mdp.a[t] + mdp.b[t] * (mdp.eps_x[t] + mdp.eps_v[t] * k))
        gain.append(g)
        var.append(g**2 * var[-1] + float(mdp.sigma[t]) ** 2)
    var_y = np.array(var)
    tail = np.cumprod(np.array(gain)[::-1])[::-1]  # prod_{j >= t} g_j
    # x_T = y_T, x_t = c_t y_t: Cov(x_T, x_t) / Var(x_t) = c_t tail_t Var(y_t) / (c_t^2 Var(y_t)) = tail_t / c_t
    return var_y * c**2, tail / c[:-1]


@pytest.mark.parametrize("level", [0.0, 0.7, math.sqrt(2)], ids=["ode", "flow-grpo-0.7", "sqrt2"])
def test_every_noise_level_keeps_the_marginals_only_sqrt2_is_the_time_reversal(level):
    """All noise levels share the flow's marginals ``Var(x_s) = (1 - s)^2 S^2 + s^2``; only ``a = sqrt(2)``
    (``sigma_s^2 = 2 s / (1 - s)``, the forward process's own diffusion) gives the joint of ``(x_s, x_T)`` of the
    noising process, ``E[x_T | x_s] = r_s x_s`` -- which the analytic task's closed-form oracle flow assumes."""
    data_std = 0.5
    mdp = build_flow_mdp({"shift": 1.0}, 1000, level)
    var_x, coef = _gaussian_chain(mdp, data_std)
    s = mdp.flow_sigmas.numpy()
    # Flow-GRPO's first step (s = 1, s_1 in the denominator of sigma_s) adds variance a^2 whatever the step count: the
    # marginals are the flow's only once that has been forgotten
    late = s <= 0.7
    np.testing.assert_allclose(var_x[late], ((1 - s) ** 2 * data_std**2 + s**2)[late], rtol=0.03)
    mid = np.flatnonzero((s[:-1] > 0.2) & (s[:-1] < 0.8))
    posterior = (1 - s[mid]) * data_std**2 / ((1 - s[mid]) ** 2 * data_std**2 + s[mid] ** 2)
    rel = np.abs(coef[mid] / posterior - 1).max()
    if level == math.sqrt(2):
        assert rel < 0.02
    else:
        assert rel > 0.3
