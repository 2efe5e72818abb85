"""Build the Stable Diffusion task from an :class:`~fastnabla.tasks.sd.config.SDConfig` (errors name the field)."""

from __future__ import annotations

import torch

from fastnabla.rewards.base import Reward, RewardTransform
from fastnabla.rewards.registry import available_rewards, build_reward
from fastnabla.tasks.sd.config import TINY_MODEL, SDConfig
from fastnabla.tasks.sd.loading import SDComponents, load_components, resolve_model_source
from fastnabla.tasks.sd.prompts import load_task_prompts
from fastnabla.tasks.sd.task import SDTask
from fastnabla.tasks.sd.tiny import build_tiny_components, tiny_pipeline_dir
from fastnabla.utils.dtypes import torch_dtype


def frozen_dtype_for(name: str, device: torch.device) -> torch.dtype:
    """Dtype of the frozen weights: ``auto`` is bf16 on CUDA and fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch_dtype(name, "sd.frozen_dtype")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_sd_components(cfg: SDConfig, device: torch.device) -> SDComponents:
    """The frozen pipeline parts named by ``cfg.model`` in the frozen dtype, on ``device``."""
    dtype = frozen_dtype_for(cfg.frozen_dtype, device)
    if cfg.model == TINY_MODEL:
        if not cfg.tiny_cache_dir:
            return build_tiny_components(cfg.tiny_seed, dtype, device)
        directory = tiny_pipeline_dir(cfg.tiny_cache_dir, cfg.tiny_seed)
        return load_components(str(directory), dtype, device, field_name="sd.tiny_cache_dir")
    return load_components(cfg.model, dtype, device, cfg.revision, cfg.variant)


def build_sd_reward(cfg: SDConfig) -> Reward:
    """The reward of ``cfg.reward`` (``fastnabla.rewards.build_reward``)."""
    r = cfg.reward
    if r.name not in available_rewards():
        raise ValueError(f"sd.reward.name={r.name!r} is not registered; available: {sorted(available_rewards())}")
    transform = None if r.transform == "auto" else RewardTransform(kind=r.transform, scale=r.scale, shift=r.shift)
    try:
        return build_reward(r.name, transform=transform, chunk_size=r.chunk_size or None, **r.options)
    except ValueError as err:
        raise ValueError(f"sd.reward: {err}") from err


def build_sd_task(
    cfg: SDConfig, device: torch.device | str | None = None, reward: Reward | None = None, seed: int = 0
) -> SDTask:
    """Load the pipeline, add LoRA, build the flow network (weights from ``seed``) and the reward.

    Args:
        device: default CUDA when available, else CPU.
        reward: use this reward instead of building ``cfg.reward`` (tests, custom rewards).
    """
    cfg.validate()
    device = torch.device(device) if device is not None else default_device()
    if cfg.model != TINY_MODEL:  # the model first: a missing one is named before the reward's files
        resolve_model_source(cfg.model, cfg.variant, revision=cfg.revision)
    load_task_prompts(cfg.prompts)  # cheap checks before loading weights: prompts, then the reward
    reward = reward if reward is not None else build_sd_reward(cfg)
    return SDTask(load_sd_components(cfg, device), cfg, reward, device, seed=seed)
