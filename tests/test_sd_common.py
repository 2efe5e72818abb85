"""Shared helpers of the Stable Diffusion tests (imported as ``test_sd_common``), and their own checks."""

from __future__ import annotations

import dataclasses

import torch

from fastnabla.rewards.base import Reward, RewardModel
from fastnabla.tasks.sd.config import SDConfig

SMALL_FLOW = [32, 64]  # the release's (64, 128, 256, 256) flow takes ~4 s to build on a CPU


class PromptLengthReward(RewardModel):
    """Prompt-dependent test reward: ``R = mean pixel * (1 + len(prompt))`` (positive)."""

    name = "prompt-length"
    positive = True

    def score(self, images, prompts):
        weight = torch.tensor([1.0 + len(p) for p in prompts], device=images.device)
        return images.float().mean(dim=(1, 2, 3)).clamp(min=1e-4) * weight


def tiny_config(**changes) -> SDConfig:
    """The tiny pipeline with a small flow net, an analytic reward and few steps."""
    cfg = SDConfig(model="tiny", num_steps=changes.pop("num_steps", 6))
    cfg.reward.name = "color-target"
    cfg.flow.block_out_channels = list(SMALL_FLOW)
    return dataclasses.replace(cfg, **changes)


def build_tiny_task(cfg: SDConfig | None = None, reward: Reward | None = None, seed: int = 0):
    from fastnabla.tasks.sd.build import build_sd_task

    return build_sd_task(cfg or tiny_config(), device="cpu", reward=reward, seed=seed)


def perturb_lora(task, std: float = 0.3, seed: int = 7) -> None:
    """Random LoRA weights (both A and B), so the policy differs from the reference."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in task.policy_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def test_tiny_config_is_valid():
    cfg = tiny_config()
    cfg.validate()
    assert cfg.model == "tiny" and cfg.flow.block_out_channels == SMALL_FLOW
