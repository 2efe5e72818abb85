"""Shared helpers of the SD3 / FLUX tests (imported as ``test_flow_task_common``), and their own checks: the tiny
flow-matching task, diffusers' ``StableDiffusion3Pipeline`` / ``FluxPipeline`` over the same saved weights, and the
pipelines' own Euler ODE step by step."""

from __future__ import annotations

import dataclasses

import torch

from fastnabla.tasks.flow.config import FlowConfig

SMALL_FLOW = [32, 64]
GUIDANCE = {"sd3": 4.5, "flux": 3.5}  # the presets' (Flow-GRPO's): CFG for SD3, the guidance embedding for FLUX
TOKENS = 32  # T5 tokens per prompt in the tests (the tiny presets' flow.max_sequence_length)


def tiny_flow_config(family: str = "sd3", **changes) -> FlowConfig:
    """The tiny ``family`` pipeline with a small flow network, an analytic reward, few steps and 32 T5 tokens."""
    cfg = FlowConfig(family=family, model=f"tiny-{family}", num_steps=changes.pop("num_steps", 4),
                     max_sequence_length=TOKENS, guidance_scale=GUIDANCE[family])
    cfg.reward.name = "color-target"
    cfg.flow.block_out_channels = list(SMALL_FLOW)
    return dataclasses.replace(cfg, **changes)


def build_tiny_flow_task(cfg: FlowConfig, reward=None, seed: int = 0):
    from fastnabla.tasks.flow.build import build_flow_task

    return build_flow_task(cfg, device="cpu", reward=reward, seed=seed)


def flow_pipeline(directory, family: str, lora_dir=None):
    """diffusers' own pipeline of ``family`` over a saved tiny directory (optionally with a LoRA loaded)."""
    from fastnabla.compat import prepare_third_party_imports

    prepare_third_party_imports()
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    cls = StableDiffusion3Pipeline if family == "sd3" else FluxPipeline
    pipe = cls.from_pretrained(str(directory))
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipe.load_lora_weights(str(lora_dir))
    return pipe


def pipeline_run(pipe, family: str, prompts, seeds, steps: int, size: int = 32):
    """The pipeline's images ``[n, 3, size, size]`` and its latents before every step and after the last
    (``[steps + 1]`` tensors ``[n, 16, h, w]``, FLUX's unpacked) for ``prompts[i]`` with ``seeds[i]``."""
    from fastnabla.tasks.flow.task import unpack_latents

    states: list[torch.Tensor] = []
    h = size // pipe.vae_scale_factor

    def unpacked(latents):
        return latents.clone() if family == "sd3" else unpack_latents(latents, h, h)

    def record(_pipe, i, _t, kwargs):
        states.append(unpacked(kwargs["latents"]))
        return kwargs

    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    first = {}
    orig = pipe.prepare_latents

    def prepare(*args, **kwargs):  # the initial noise, as the pipeline drew it
        out = orig(*args, **kwargs)
        first["x"] = unpacked(out[0] if isinstance(out, tuple) else out)
        return out

    pipe.prepare_latents = prepare
    try:
        out = pipe(list(prompts), num_inference_steps=steps, guidance_scale=GUIDANCE[family], height=size,
                   width=size, generator=generators, output_type="pt", max_sequence_length=TOKENS,
                   callback_on_step_end=record)
    finally:
        pipe.prepare_latents = orig
    return out.images.float(), [first["x"], *states]


def perturb_lora(task, std: float = 0.1, seed: int = 7) -> None:
    """Random LoRA weights (A and B), so the policy differs from the pretrained model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in task.policy_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def test_tiny_flow_configs_are_valid():
    for family in ("sd3", "flux"):
        cfg = tiny_flow_config(family)
        cfg.validate()
        assert cfg.model == f"tiny-{family}" and cfg.flow.block_out_channels == SMALL_FLOW
