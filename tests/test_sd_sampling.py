"""Evaluation sampling: the sampler's maths, seeds per image, batch independence."""

from __future__ import annotations

import pytest
import torch
from test_sd_common import build_tiny_task, perturb_lora

from fastnabla.tasks.sd.sampling import (
    evaluation_grid_inputs,
    evaluation_prompts,
    sample_images,
    sample_latents,
    save_evaluation_grid,
)

PROMPTS, SEEDS = ["cat", "dog", "a blue whale"], [0, 1, 2]


@pytest.fixture(scope="module")
def task():
    t = build_tiny_task()
    perturb_lora(t)
    return t


def manual_sampler(task, prompts, seeds, pretrained: bool) -> torch.Tensor:
    """The sampler spelled out: per-image generators, policy eps, x <- a x + b eps + sigma z."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    draw = lambda: torch.cat([torch.randn(1, *task.latent_shape, generator=g) for g in gens])  # noqa: E731
    cond = task.conditions_for(prompts)
    x = draw()
    eps_fn = task.pretrained_eps if pretrained else task.policy_eps
    mdp = task.mdp
    for t in range(mdp.num_steps):
        z = draw()
        step = torch.full((len(prompts),), t)
        eps = eps_fn(x, step, cond).double()
        x = (mdp.a[t] * x.double() + mdp.b[t] * eps + mdp.sigma[t] * z.double()).float()
    return x


@pytest.mark.parametrize("reference", [False, True], ids=["policy", "reference"])
def test_sampler_matches_the_spelled_out_loop(task, reference):
    with torch.no_grad():
        got = sample_latents(task, PROMPTS, SEEDS, use_pretrained=reference)
        expected = manual_sampler(task, PROMPTS, SEEDS, reference)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))


def test_images_depend_on_prompt_and_seed_not_on_batching(task):
    all_at_once = sample_images(task, PROMPTS, SEEDS)
    one_by_one = sample_images(task, PROMPTS, SEEDS, batch_size=1)
    torch.testing.assert_close(all_at_once, one_by_one, rtol=0, atol=1e-4)
    again = sample_images(task, PROMPTS[:1], SEEDS[:1])
    torch.testing.assert_close(again, all_at_once[:1], rtol=0, atol=1e-4)
    other_seed = sample_images(task, PROMPTS[:1], [99])
    assert (other_seed - again).abs().max() > 1e-2
    assert all_at_once.dtype == torch.float32 and 0 <= float(all_at_once.min()) <= float(all_at_once.max()) <= 1


def test_policy_and_reference_images_differ(task):
    policy = sample_images(task, PROMPTS, SEEDS)
    assert (policy - sample_images(task, PROMPTS, SEEDS, use_pretrained=True)).abs().max() > 1e-2


def test_grid_inputs_are_seed_major():
    prompts, seeds = evaluation_grid_inputs(["a", "b"], [7, 8, 9])
    assert prompts == ["a", "b"] * 3 and seeds == [7, 7, 8, 8, 9, 9]


def test_lengths_must_match(task):
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        sample_images(task, ["a", "b"], [0])


def test_evaluation_grid(task, tmp_path):
    from PIL import Image

    assert evaluation_prompts(task) == ["cat", "dog", "horse", "monkey"]  # the first 4 animals by default
    path = save_evaluation_grid(task, tmp_path / "eval" / "grid.png")
    width, height = Image.open(path).size
    rows, cols = len(task.cfg.prompts.eval_seeds), 4
    assert (width, height) == (cols * (32 + 2) + 2, rows * (32 + 2) + 2)
