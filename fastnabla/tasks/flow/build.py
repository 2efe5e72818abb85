"""Build the flow-matching task from a :class:`~fastnabla.tasks.flow.config.FlowConfig` (errors name the field)."""

from __future__ import annotations

import torch

from fastnabla.rewards.base import Reward
from fastnabla.tasks.flow.config import TINY_MODELS, FlowConfig
from fastnabla.tasks.flow.loading import FlowComponents, load_components, resolve_model_source
from fastnabla.tasks.flow.task import FlowTask
from fastnabla.tasks.flow.tiny import build_tiny_components, tiny_pipeline_dir
from fastnabla.tasks.sd.build import build_sd_reward, default_device, frozen_dtype_for
from fastnabla.tasks.sd.prompts import load_task_prompts


def load_flow_components(cfg: FlowConfig, device: torch.device) -> FlowComponents:
    """The frozen pipeline parts named by ``cfg.model`` in the frozen dtype, on ``device``."""
    dtype = frozen_dtype_for(cfg.frozen_dtype, device)
    if cfg.model in TINY_MODELS:
        if not cfg.tiny_cache_dir:
            parts = build_tiny_components(cfg.family, cfg.tiny_seed, dtype, device)
        else:
            directory = tiny_pipeline_dir(cfg.tiny_cache_dir, cfg.family, cfg.tiny_seed)
            parts = load_components(str(directory), cfg.family, dtype, device, field_name="flow.tiny_cache_dir")
            parts.default_sample_size = int(parts.vae.config.sample_size) // parts.vae_scale_factor
        if not cfg.use_t5 and cfg.family == "sd3":
            parts.text_encoders[2] = parts.tokenizers[2] = None
        return parts
    return load_components(cfg.model, cfg.family, dtype, device, cfg.revision, cfg.variant, cfg.use_t5)


def build_flow_reward(cfg: FlowConfig) -> Reward:
    """The reward of ``cfg.reward`` (the Stable Diffusion task's builder; errors name ``flow.reward``)."""
    try:
        return build_sd_reward(cfg)
    except (ValueError, FileNotFoundError) as err:
        raise type(err)(str(err).replace("sd.reward", "flow.reward")) from err


def build_flow_task(cfg: FlowConfig, device: torch.device | str | None = None, reward: Reward | None = None,
                    seed: int = 0) -> FlowTask:
    """Load the pipeline (model first: a missing one is named before anything else), add LoRA, build the flow
    network (weights from ``seed``) and the reward (``reward`` replaces ``cfg.reward``: tests, custom rewards)."""
    cfg.validate()
    device = torch.device(device) if device is not None else default_device()
    if cfg.model not in TINY_MODELS:
        resolve_model_source(cfg.model, cfg.family, cfg.variant, cfg.revision, cfg.use_t5)
    load_task_prompts(cfg.prompts)
    reward = reward if reward is not None else build_flow_reward(cfg)
    return FlowTask(load_flow_components(cfg, device), cfg, reward, device, seed=seed)
