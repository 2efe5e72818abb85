"""Build the Stable Diffusion task from an :class:`~fastnabla.tasks.sd.config.SDConfig` (errors name the field)."""

from __future__ import annotations

import torch

from fastnabla.rewards.base import Reward, RewardTransform
from fastnabla.rewards.combined import build_reward_sum
from fastnabla.rewards.registry import available_rewards, build_reward, is_reward_name
from fastnabla.tasks.sd.config import TINY_MODELS, TINY_SDXL_MODEL, SDConfig
from fastnabla.tasks.sd.loading import (
    SDComponents,
    load_components,
    load_fl_surrogate_decoder,
    resolve_model_source,
    resolve_vae_source,
)
from fastnabla.tasks.sd.prompts import load_task_prompts
from fastnabla.tasks.sd.task import SDTask
from fastnabla.tasks.sd.tiny import build_tiny, tiny_pipeline_dir
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
    if cfg.model in TINY_MODELS:
        family = "sdxl" if cfg.model == TINY_SDXL_MODEL else "sd"
        if not cfg.tiny_cache_dir and not cfg.vae:
            return build_tiny(family, cfg.tiny_seed, dtype, device)
        if not cfg.tiny_cache_dir:
            raise ValueError(f"sd.vae={cfg.vae!r} with sd.model={cfg.model!r} needs sd.tiny_cache_dir (the tiny "
                             "pipeline then loads like a directory)")
        directory = tiny_pipeline_dir(cfg.tiny_cache_dir, cfg.tiny_seed, family)
        return load_components(str(directory), dtype, device, field_name="sd.tiny_cache_dir", vae=cfg.vae)
    return load_components(cfg.model, dtype, device, cfg.revision, cfg.variant, family=cfg.family, vae=cfg.vae)


def _one_reward(name: str, options: dict, transform: str, scale: float, shift: float, chunk: int | None,
                field: str) -> Reward:
    if not is_reward_name(name):
        raise ValueError(f"{field}.name={name!r} is not registered (available: {sorted(available_rewards())}) and "
                         "is not an import path 'package.module:factory'")
    kind = None if transform == "auto" else RewardTransform(kind=transform, scale=scale, shift=shift)
    try:
        return build_reward(name, transform=kind, chunk_size=chunk, **options)
    except ValueError as err:
        raise ValueError(f"{field}: {err}") from err


def build_sd_reward(cfg: SDConfig) -> Reward:
    """The reward of ``cfg.reward`` (``fastnabla.rewards.build_reward``): one reward, or with ``name: sum`` the
    weighted sum ``log R = sum_i w_i log R_i`` of ``terms`` (``fastnabla.rewards.build_reward_sum``)."""
    r = cfg.reward
    chunk = r.chunk_size or None
    if r.name != "sum":
        return _one_reward(r.name, r.options, r.transform, r.scale, r.shift, chunk, "sd.reward")
    terms = [(t.name, t.weight, _one_reward(t.name, t.options, t.transform, t.scale, t.shift, None,
                                            f"sd.reward.terms[{i}]")) for i, t in enumerate(r.terms)]
    return build_reward_sum(terms, chunk)


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
    if cfg.model not in TINY_MODELS:  # the model first: a missing one is named before the reward's files
        resolve_model_source(cfg.model, cfg.variant, revision=cfg.revision, family=cfg.family)
    if cfg.vae:
        resolve_vae_source(cfg.vae)
    load_task_prompts(cfg.prompts)  # cheap checks before loading weights: prompts, then the reward
    reward = reward if reward is not None else build_sd_reward(cfg)
    task = SDTask(load_sd_components(cfg, device), cfg, reward, device, seed=seed)
    if cfg.fl_surrogate_decoder:  # method.fl_decoder=surrogate: the FL term's decoder at non-terminal states
        task.set_fl_surrogate(load_fl_surrogate_decoder(cfg.fl_surrogate_decoder, task.vae.dtype, device))
    return task
