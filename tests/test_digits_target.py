"""Importance weights against closed forms on a known discrete distribution, resampling, and the pretrained
sampler of the quick build (its cache, and agreement with diffusers' own pipeline)."""

from __future__ import annotations

import math

import pytest
import torch
from digits_common import quick_build_dir

from fastnabla.tasks.digits.target import (
    effective_sample_size,
    estimate_target,
    importance_weights,
    pretrained_samples,
    systematic_resample,
)


@pytest.fixture
def quick_dir():
    return quick_build_dir()


P = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)  # the "pretrained" distribution over 3 states
LOG_R = torch.tensor([-2.0, 0.0, -0.5], dtype=torch.float64)  # log R per state


def _closed_form(beta: float) -> torch.Tensor:
    q = P * torch.exp(beta * LOG_R)
    return q / q.sum()


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 3.0])
def test_weights_reproduce_the_tilted_distribution_exactly(beta):
    counts = [50, 30, 20]  # an exactly proportional sample set of P
    states = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    target = estimate_target(states, LOG_R[states], beta, num_classes=3)
    q = _closed_form(beta)
    torch.testing.assert_close(target.histogram, q, rtol=1e-12, atol=1e-12)
    assert math.isclose(target.mean_log_reward, float(q @ LOG_R), rel_tol=1e-12, abs_tol=1e-12)
    ess = 1 / sum(float(q[k]) ** 2 / c for k, c in enumerate(counts))  # per-sample weight q_k / n_k
    assert math.isclose(target.ess, ess, rel_tol=1e-12)
    assert abs(float(target.weights.sum()) - 1) < 1e-12


def test_weights_on_random_samples_converge_to_the_closed_form():
    gen = torch.Generator().manual_seed(0)
    states = torch.multinomial(P, 200_000, replacement=True, generator=gen)
    target = estimate_target(states, LOG_R[states], 2.0, num_classes=3)
    assert float((target.histogram - _closed_form(2.0)).abs().max()) < 5e-3
    assert 0.3 * 200_000 < target.ess < 200_000


def test_ess_limits_and_weights():
    assert effective_sample_size(torch.ones(7)) == pytest.approx(7)
    assert effective_sample_size(torch.tensor([0.0, 1.0, 0.0])) == pytest.approx(1)
    w = importance_weights(torch.tensor([0.0, math.log(3.0)]), 1.0)
    torch.testing.assert_close(w, torch.tensor([0.25, 0.75], dtype=torch.float64))
    torch.testing.assert_close(importance_weights(torch.tensor([5.0, -5.0, 1.0]), 0.0), torch.full((3,), 1 / 3,
                               dtype=torch.float64))
    huge = importance_weights(torch.tensor([1000.0, 999.0]), 1.0)  # no overflow
    torch.testing.assert_close(huge, torch.tensor([1, math.exp(-1)], dtype=torch.float64) / (1 + math.exp(-1)))


def test_systematic_resampling_counts_are_floor_or_ceil():
    w = torch.tensor([0.05, 0.5, 0.2, 0.25], dtype=torch.float64)
    for seed in range(5):
        idx = systematic_resample(w, 37, torch.Generator().manual_seed(seed))
        counts = torch.bincount(idx, minlength=4).double()
        assert int(counts.sum()) == 37
        assert bool(((counts - 37 * w).abs() < 1).all())
    assert torch.equal(systematic_resample(torch.ones(5), 5, torch.Generator().manual_seed(1)), torch.arange(5))


@pytest.mark.parametrize("args, match", [((torch.tensor([0.0, float("inf")]), 1.0), "non-finite"),
                                         ((torch.zeros(3), -1.0), "beta"),
                                         ((torch.zeros(0), 1.0), "non-empty"),
                                         ((torch.zeros(2, 2), 1.0), "1-D")])
def test_bad_importance_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        importance_weights(*args)


def test_pretrained_samples_are_cached(quick_dir):
    kw = dict(prompt="an even digit", n=5, guidance_scale=3.0, num_steps=3, batch_size=3, progress=False)
    first = pretrained_samples(quick_dir, **kw)
    assert first.images.shape == (5, 3, 16, 16) and first.logits.shape == (5, 10) and first.features.shape[0] == 5
    assert float(first.images.min()) >= 0 and float(first.images.max()) <= 1
    again = pretrained_samples(quick_dir, **kw)
    assert torch.equal(first.images, again.images) and torch.equal(first.features, again.features)
    assert list((quick_dir / "targets").glob("samples-*.safetensors"))


def test_sampler_matches_diffusers_pipeline_without_step_noise(quick_dir):
    """With eta = 0 the sampler is deterministic given x_0; diffusers' StableDiffusionPipeline (DDIM, CFG) from the
    same x_0 must give the same images: the digits sampler is the standard SD sampler."""
    from diffusers import StableDiffusionPipeline

    from fastnabla.tasks.digits.sampling import sample_pretrained
    from fastnabla.tasks.sd.loading import load_components

    parts = load_components(str(quick_dir))
    ours = sample_pretrained(parts, "the digit 7", 2, guidance_scale=4.0, num_steps=6, eta=0.0, seed=3)
    x0 = torch.randn((2, 4, 4, 4), generator=torch.Generator().manual_seed(3 * 1_000_003))
    pipe = StableDiffusionPipeline.from_pretrained(str(quick_dir), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(["the digit 7"] * 2, height=16, width=16, num_inference_steps=6, guidance_scale=4.0, eta=0.0,
                  latents=x0, output_type="pt").images
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-4, atol=1e-4)
