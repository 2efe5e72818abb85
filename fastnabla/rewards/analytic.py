"""Cheap analytic image rewards, **for tests and demos only** (closed form, no learned model).

They let the Stable Diffusion path run end to end on a CPU with tiny random models; they say
nothing about image quality. Both ignore the prompt.

* ``brightness``: ``R = mean pixel value`` (in ``(0, 1]``; positive, so ``log R`` applies).
* ``color-target``: ``R = exp(-||mean colour - target||^2 / (2 width^2))`` (positive).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastnabla.rewards.base import RewardModel, Tensor


class BrightnessReward(RewardModel):
    """Analytic (demo) reward: mean pixel value of the image, ``[B]``."""

    name = "brightness"
    positive = True
    analytic = True

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return images.float().mean(dim=(1, 2, 3)).clamp(min=1e-4)


class ColorTargetReward(RewardModel):
    """Analytic (demo) reward: Gaussian bump on the mean RGB colour of the image, ``[B]``."""

    name = "color-target"
    positive = True
    analytic = True

    def __init__(self, target: Sequence[float] = (0.8, 0.3, 0.2), width: float = 0.25):
        super().__init__()
        if len(target) != 3:
            raise ValueError(f"color-target needs 3 target values (RGB in [0, 1]), got {len(target)}")
        if not width > 0:
            raise ValueError(f"color-target width must be > 0, got {width}")
        self.register_buffer("target", torch.tensor([float(v) for v in target]))
        self.width = float(width)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        mean_rgb = images.float().mean(dim=(2, 3))  # [B, 3]
        return torch.exp(-((mean_rgb - self.target) ** 2).sum(dim=1) / (2 * self.width**2))
