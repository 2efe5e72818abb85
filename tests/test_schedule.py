"""The denoising MDP coefficients against diffusers' own DDIM / DDPM ``step``."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_rel
from diffusers import DDIMScheduler, DDPMScheduler

from fastnabla.mdp import SD15_SCHEDULER_CONFIG, build_mdp

SHAPE = (3, 4, 5, 7)
BASE = {"clip_sample": False}  # diffusers' constructors default to clip_sample=True

# (sampler, scheduler config, num_steps, eta)
CASES = [
    ("ddim", dict(SD15_SCHEDULER_CONFIG), 50, 1.0),
    ("ddim", dict(SD15_SCHEDULER_CONFIG), 50, 0.0),
    ("ddim", dict(SD15_SCHEDULER_CONFIG), 50, 0.5),
    ("ddim", dict(SD15_SCHEDULER_CONFIG), 7, 1.0),
    ("ddim", {**BASE, "beta_schedule": "linear", "set_alpha_to_one": False}, 33, 1.0),
    ("ddim", {**BASE, "beta_schedule": "linear", "set_alpha_to_one": True}, 33, 0.5),
    ("ddim", {**BASE, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
              "timestep_spacing": "trailing", "set_alpha_to_one": False}, 7, 1.0),
    ("ddim", {**BASE, "beta_schedule": "linear", "timestep_spacing": "trailing"}, 33, 0.5),
    ("ddim", {**BASE, "beta_schedule": "linear", "timestep_spacing": "linspace", "set_alpha_to_one": False}, 7, 1.0),
    ("ddim", {**BASE, "beta_schedule": "squaredcos_cap_v2", "set_alpha_to_one": False, "steps_offset": 1}, 33, 1.0),
    ("ddim", {**SD15_SCHEDULER_CONFIG, "prediction_type": "v_prediction"}, 7, 1.0),
    ("ddim", {**SD15_SCHEDULER_CONFIG, "prediction_type": "sample"}, 7, 0.5),
    ("ddim", {**BASE, "beta_schedule": "linear", "rescale_betas_zero_snr": True, "timestep_spacing": "leading",
              "prediction_type": "v_prediction", "set_alpha_to_one": False}, 7, 1.0),
    ("ddpm", {**BASE, "beta_schedule": "linear", "variance_type": "fixed_small"}, 33, None),
    ("ddpm", {**BASE, "beta_schedule": "linear", "variance_type": "fixed_large", "steps_offset": 1}, 7, None),
    ("ddpm", {**SD15_SCHEDULER_CONFIG, "variance_type": "fixed_small"}, 50, None),
    ("ddpm", {**BASE, "beta_schedule": "squaredcos_cap_v2", "variance_type": "fixed_large",
              "timestep_spacing": "trailing", "prediction_type": "v_prediction"}, 33, None),
    ("ddpm", {**BASE, "beta_schedule": "scaled_linear", "variance_type": "fixed_small",
              "timestep_spacing": "linspace", "prediction_type": "sample"}, 7, None),
]
IDS = [
    "sd15-50-eta1", "sd15-50-eta0", "sd15-50-eta0.5", "sd15-7-eta1",
    "linear-33-eta1", "linear-33-eta0.5-alpha1", "scaled-trailing-7", "linear-trailing-33-eta0.5",
    "linear-linspace-7", "cos-33-offset", "sd15-vpred-7", "sd15-sample-7-eta0.5", "zsnr-leading-vpred-7",
    "ddpm-small-33", "ddpm-large-7-offset", "ddpm-sd15-small-50", "ddpm-cos-large-trailing-vpred",
    "ddpm-scaled-linspace-sample",
]


def _scheduler(sampler, cfg, num_steps, alphas_cumprod=None):
    """diffusers' scheduler; with ``alphas_cumprod`` (float64) its step runs in float64 on those values."""
    if sampler == "ddim":
        sched = DDIMScheduler(**cfg)
    else:
        sched = DDPMScheduler(**{k: v for k, v in cfg.items() if k != "set_alpha_to_one"})
    sched.set_timesteps(num_steps)
    if alphas_cumprod is not None:
        sched.alphas_cumprod = alphas_cumprod.double()
        if sampler == "ddim":
            one = torch.ones((), dtype=torch.float64)
            sched.final_alpha_cumprod = one if sched.config.set_alpha_to_one else sched.alphas_cumprod[0]
        else:
            sched.one = torch.ones((), dtype=torch.float64)
    return sched


@pytest.mark.parametrize("fp64", [False, True], ids=["diffusers-fp32", "diffusers-fp64-same-abar"])
@pytest.mark.parametrize(("sampler", "cfg", "num_steps", "eta"), CASES, ids=IDS)
def test_step_matches_diffusers(sampler, cfg, num_steps, eta, fp64):
    """fp32: stock diffusers (fp32 schedule) at fp32 tolerance. fp64: diffusers' step formula evaluated in
    float64 on the MDP's own ``alphas_cumprod``, so any disagreement is a formula error (tight tolerance)."""
    mdp = build_mdp(cfg, num_steps, sampler, 1.0 if eta is None else eta)
    stock = _scheduler(sampler, cfg, num_steps)
    sched = _scheduler(sampler, cfg, num_steps, mdp.alphas_cumprod if fp64 else None)
    assert mdp.num_steps == num_steps
    assert torch.equal(mdp.timesteps, sched.timesteps.long())
    assert torch.equal(mdp.alphas_cumprod, stock.alphas_cumprod.double()), "alphas_cumprod not bitwise equal"
    assert torch.equal(mdp.alpha_bar, sched.alphas_cumprod[sched.timesteps].double()), "alpha_bar"
    gen = torch.Generator().manual_seed(7)
    for t in range(num_steps):
        tau = int(sched.timesteps[t])
        x = 2 * torch.randn(SHAPE, generator=gen, dtype=torch.float64)
        out = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
        step = torch.full((SHAPE[0],), t, dtype=torch.int64)
        c = mdp.gather(step, x.ndim, torch.float64)
        eps = mdp.to_epsilon(out, x, c["alpha_bar"])
        if sampler == "ddim":
            z = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
            ref = sched.step(out, tau, x, eta=eta, variance_noise=z).prev_sample
        else:
            seed = 100 + t
            z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            ref = sched.step(out, tau, x, generator=torch.Generator().manual_seed(seed)).prev_sample
        ours = c["a"] * x + c["b"] * eps + c["sigma"] * z
        assert ref.dtype == torch.float64
        # fp64: 1e-10 covers diffusers' clamp of the DDPM variance to 1e-20 (sigma 1e-10) where ours is 0;
        # fp32: diffusers' fp32 scalar arithmetic (e.g. 1 - abar_t/abar_prev) measured up to ~2.5e-6.
        assert_close_rel(ours, ref, 1e-10 if fp64 else 4e-6, f"step {t} (tau={tau})")


@pytest.mark.parametrize(
    ("cfg", "num_steps", "eta"),
    [(dict(SD15_SCHEDULER_CONFIG), 50, 1.0), (dict(SD15_SCHEDULER_CONFIG), 7, 0.5),
     ({**BASE, "beta_schedule": "linear", "timestep_spacing": "trailing"}, 33, 1.0),
     ({**BASE, "beta_schedule": "squaredcos_cap_v2", "set_alpha_to_one": False}, 33, 0.3)],
    ids=["sd15-50-eta1", "sd15-7-eta0.5", "linear-trailing-33", "cos-33-eta0.3"],
)
def test_ddim_variance_matches_diffusers(cfg, num_steps, eta):
    mdp = build_mdp(cfg, num_steps, "ddim", eta)
    sched = _scheduler("ddim", cfg, num_steps, mdp.alphas_cumprod)
    ratio = sched.config.num_train_timesteps // num_steps  # diffusers' DDIM prev_timestep offset
    var = torch.stack([sched._get_variance(int(tau), int(tau) - ratio) for tau in sched.timesteps]).double()
    assert_close_rel(mdp.sigma**2, var * eta**2, 1e-12, "sigma^2")
    assert torch.equal(mdp.stochastic, var > 0)


def test_sd15_schedule_facts():
    mdp = build_mdp(SD15_SCHEDULER_CONFIG, 50, "ddim", 1.0)
    sched = DDIMScheduler(**SD15_SCHEDULER_CONFIG)
    sched.set_timesteps(50)
    assert mdp.timesteps.tolist() == list(range(981, 0, -20))
    assert int(mdp.timesteps[0]) == 981 and int(mdp.timesteps[-1]) == 1
    assert mdp.alpha_bar_terminal == float(sched.alphas_cumprod[0])  # set_alpha_to_one=False
    assert mdp.alpha_bar_terminal == float(mdp.alphas_cumprod[0]) < 1
    # consecutive states chain: abar_{t+1} of step t is abar_t of step t+1
    assert torch.equal(mdp.alpha_bar_next[:-1], mdp.alpha_bar[1:])
    # the object, its config and the plain dict all give the same MDP
    for src in (sched, sched.config):
        other = build_mdp(src, 50, "ddim", 1.0)
        for k in ("timesteps", "alpha_bar", "alpha_bar_next", "a", "b", "sigma"):
            assert torch.equal(getattr(other, k), getattr(mdp, k)), k


def test_ddpm_last_step_is_deterministic_at_tau_zero():
    cfg = {**BASE, "beta_schedule": "linear", "variance_type": "fixed_small"}
    mdp = build_mdp(cfg, 10, "ddpm")
    assert int(mdp.timesteps[-1]) == 0 and float(mdp.sigma[-1]) == 0.0
    assert mdp.stochastic.tolist() == [True] * 9 + [False]
    assert mdp.alpha_bar_terminal == 1.0


@pytest.mark.parametrize(
    ("cfg", "sampler", "num_steps", "eta", "match"),
    [
        ({"clip_sample": True}, "ddim", 10, 1.0, "clip_sample"),
        ({"clip_sample": False, "thresholding": True}, "ddim", 10, 1.0, "thresholding"),
        ({"clip_sample": True}, "ddpm", 10, 1.0, "clip_sample"),
        (dict(SD15_SCHEDULER_CONFIG), "euler", 10, 1.0, "sampler"),
        (dict(SD15_SCHEDULER_CONFIG), "ddim", 0, 1.0, "num_steps"),
        (dict(SD15_SCHEDULER_CONFIG), "ddim", 1001, 1.0, "num_steps"),
        (dict(SD15_SCHEDULER_CONFIG), "ddim", 2.5, 1.0, "num_steps"),
        ({**SD15_SCHEDULER_CONFIG, "beta_schedule": "cosine"}, "ddim", 10, 1.0, "beta_schedule"),
        ({**SD15_SCHEDULER_CONFIG, "timestep_spacing": "karras"}, "ddim", 10, 1.0, "timestep_spacing"),
        ({**SD15_SCHEDULER_CONFIG, "prediction_type": "flow"}, "ddim", 10, 1.0, "prediction_type"),
        ({**SD15_SCHEDULER_CONFIG, "variance_type": "learned"}, "ddpm", 10, 1.0, "variance_type"),
        (dict(SD15_SCHEDULER_CONFIG), "ddim", 10, -0.1, "eta"),
    ],
    ids=["clip", "threshold", "ddpm-clip", "sampler", "steps-0", "steps-1001", "steps-float", "beta-schedule",
         "spacing", "prediction", "ddpm-learned-var", "eta-negative"],
)
def test_build_mdp_errors(cfg, sampler, num_steps, eta, match):
    with pytest.raises(ValueError, match=match):
        build_mdp(cfg, num_steps, sampler, eta)


def test_omitted_clip_sample_follows_diffusers_default():
    assert DDIMScheduler().config.clip_sample is True
    with pytest.raises(ValueError, match="clip_sample"):
        build_mdp({"beta_schedule": "linear"}, 10, "ddim", 1.0)


def test_zero_terminal_snr_trailing_is_rejected():
    cfg = {**BASE, "beta_schedule": "linear", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
           "prediction_type": "v_prediction", "set_alpha_to_one": False}
    with pytest.raises(ValueError, match="zero terminal SNR"):
        build_mdp(cfg, 7, "ddim", 1.0)
    # the same schedule with leading spacing never visits abar = 0 and stays finite
    mdp = build_mdp({**cfg, "timestep_spacing": "leading"}, 7, "ddim", 1.0)
    for k in ("a", "b", "sigma"):
        assert bool(torch.isfinite(getattr(mdp, k)).all()), k


def test_gather_mixed_steps():
    mdp = build_mdp(SD15_SCHEDULER_CONFIG, 50, "ddim", 1.0)
    step = torch.tensor([3, 0, 49, 17, 3], dtype=torch.int64)
    for dtype in (torch.float32, torch.float64):
        c = mdp.gather(step, 4, dtype)
        for k in ("alpha_bar", "alpha_bar_next", "a", "b", "sigma"):
            assert c[k].shape == (5, 1, 1, 1) and c[k].dtype == dtype, k
            expected = torch.stack([getattr(mdp, k)[i] for i in step.tolist()]).to(dtype)
            assert torch.equal(c[k].reshape(-1), expected), k
        assert c["timesteps"].tolist() == [int(mdp.timesteps[i]) for i in step.tolist()]
    assert mdp.gather(step, 2)["a"].shape == (5, 1)


@pytest.mark.parametrize(
    ("step", "exc"),
    [(torch.tensor([0, 50]), IndexError), (torch.tensor([-1, 3]), IndexError),
     (torch.tensor([0, 3], dtype=torch.int32), TypeError), (torch.tensor([0.0, 3.0]), TypeError)],
    ids=["too-large", "negative", "int32", "float"],
)
def test_gather_rejects_bad_indices(step, exc):
    mdp = build_mdp(SD15_SCHEDULER_CONFIG, 50, "ddim", 1.0)
    with pytest.raises(exc):
        mdp.gather(step, 4)
