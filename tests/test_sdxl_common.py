"""Shared helpers of the SDXL tests (imported as ``test_sdxl_common``), and their own checks: the tiny SDXL task, the
diffusers ``StableDiffusionXLPipeline`` over the same saved weights, and a recorder of the UNet's inputs."""

from __future__ import annotations

import dataclasses

import torch
from test_sd_common import SMALL_FLOW

from fastnabla.tasks.sd.config import SDConfig


def tiny_sdxl_config(**changes) -> SDConfig:
    """The tiny SDXL pipeline with a small flow network, an analytic reward and few steps."""
    cfg = SDConfig(model="tiny-sdxl", num_steps=changes.pop("num_steps", 4))
    cfg.reward.name = "color-target"
    cfg.flow.block_out_channels = list(SMALL_FLOW)
    return dataclasses.replace(cfg, **changes)


def build_tiny_sdxl_task(cfg: SDConfig | None = None, reward=None, seed: int = 0):
    from fastnabla.tasks.sd.build import build_sd_task

    return build_sd_task(cfg or tiny_sdxl_config(), device="cpu", reward=reward, seed=seed)


def sdxl_pipeline(directory, sampler: str = "ddim", lora_dir=None):
    """diffusers' own SDXL pipeline over a saved tiny SDXL directory, with the DDIM (or DDPM) scheduler our MDP is
    built as (SDXL ships an Euler config; the betas and timestep spacing are the same)."""
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(directory), add_watermarker=False)
    scheduler_cls = DDIMScheduler if sampler == "ddim" else DDPMScheduler
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipe.load_lora_weights(str(lora_dir))
    return pipe


def pipeline_images(pipe, prompts, seeds, steps: int, output_type: str = "pt", **kwargs) -> torch.Tensor:
    """The pipeline's output for ``prompts[i]`` with ``torch.Generator().manual_seed(seeds[i])`` (CFG 5, eta 1)."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    out = pipe(list(prompts), num_inference_steps=steps, guidance_scale=kwargs.pop("guidance_scale", 5.0), eta=1.0,
               generator=generators, output_type=output_type, **kwargs)
    return out.images.float()


class UNetRecorder:
    """Records the keyword inputs and output of every forward of a UNet (a forward hook with kwargs)."""

    def __init__(self, unet):
        self.calls: list[dict] = []
        self._handle = unet.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        hidden = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
        added = kwargs.get("added_cond_kwargs") or {}
        out = output[0] if isinstance(output, tuple) else output.sample
        self.calls.append({
            "sample": sample.detach().clone(), "timestep": torch.as_tensor(timestep).detach().clone(),
            "encoder_hidden_states": hidden.detach().clone(),
            "added_cond_kwargs": {k: v.detach().clone() for k, v in added.items()},
            "output": out.detach().clone(),
        })

    def close(self) -> None:
        self._handle.remove()


def test_tiny_sdxl_config_is_valid():
    cfg = tiny_sdxl_config()
    cfg.validate()
    assert cfg.model == "tiny-sdxl" and cfg.flow.block_out_channels == SMALL_FLOW
