"""The reward interface (``fastnabla.rewards.base``): the ``log R`` transforms, default transforms, input checks,
chunking of the analytic rewards and the dtype option."""

from __future__ import annotations

import math

import pytest
import torch

from fastnabla.rewards import Reward, RewardTransform, build_reward
from fastnabla.rewards.base import parse_dtype


def test_log_and_exp_transforms_are_the_documented_formulas():
    score = torch.tensor([0.5, 2.0, -1.0, 1e-9])
    log = RewardTransform(kind="log", floor=1e-6)
    assert torch.allclose(log(score), torch.tensor([math.log(0.5), math.log(2.0), math.log(1e-6), math.log(1e-6)]))
    tilt = RewardTransform(kind="exp", scale=2.5, shift=0.3)
    assert torch.allclose(tilt(score), 2.5 * (score - 0.3))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param(dict(kind="sqrt"), "kind", id="kind"),
        pytest.param(dict(kind="log", floor=0.0), "floor", id="floor"),
        pytest.param(dict(kind="exp", scale=0.0), "scale", id="scale"),
    ],
)
def test_bad_transforms_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RewardTransform(**kwargs).validate()


def test_default_transforms_log_for_positive_exp_for_signed():
    assert build_reward("brightness").transform.kind == "log"
    signed = build_reward("hpsv2", random_weights=True, architecture=_tiny_arch())
    assert signed.transform == RewardTransform(kind="exp", scale=1.0, shift=0.0)
    with pytest.raises(ValueError, match="can be negative"):
        Reward(signed.model, RewardTransform(kind="log"))


def _tiny_arch() -> str:
    from fastnabla.rewards.tiny import register_tiny_open_clip

    return register_tiny_open_clip()


def test_analytic_rewards_chunk_and_differentiate():
    reward = build_reward("color-target", chunk_size=2, target=(0.2, 0.5, 0.9), width=0.3)
    x = torch.rand(5, 3, 7, 9, generator=torch.Generator().manual_seed(0))
    values, grads = reward.log_reward_and_grad(x, [""] * 5)
    mean = x.mean(dim=(2, 3))
    expected = -((mean - torch.tensor([0.2, 0.5, 0.9])) ** 2).sum(1) / (2 * 0.3**2)
    assert torch.allclose(values, expected, atol=1e-6)
    expected_grad = (-(mean - torch.tensor([0.2, 0.5, 0.9])) / 0.3**2 / (7 * 9))[:, :, None, None].expand_as(x)
    assert torch.allclose(grads, expected_grad, atol=1e-6)


@pytest.mark.parametrize(
    "images, prompts, error, match",
    [
        pytest.param(torch.rand(2, 4, 8, 8), ["a", "b"], ValueError, r"\[B, 3, H, W\]", id="channels"),
        pytest.param(torch.rand(2, 3, 8), ["a", "b"], ValueError, "shape", id="rank"),
        pytest.param(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), ["a", "b"], TypeError, "floating", id="uint8"),
        pytest.param(torch.rand(2, 3, 8, 8), ["a"], ValueError, "one prompt per image", id="prompts"),
    ],
)
def test_bad_images_are_named(images, prompts, error, match):
    with pytest.raises(error, match=match):
        build_reward("brightness").score(images, prompts)


def test_dtype_option():
    assert parse_dtype("bf16", "r") is torch.bfloat16 and parse_dtype("torch.float32", "r") is torch.float32
    assert parse_dtype(torch.float16, "r") is torch.float16
    with pytest.raises(ValueError, match="dtype='int8'"):
        parse_dtype("int8", "aesthetic")
