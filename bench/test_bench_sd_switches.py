"""Speed switches of the Stable Diffusion task: providers (switch settings) x modes x UNet sizes.

Each provider is one switch turned on over the defaults (``eager``: SDPA attention, contiguous,
no compile, frozen weights fp32 on CPU / bf16 on CUDA), measured side by side in one run:

* ``classic-attn`` -- diffusers' matmul + softmax attention instead of SDPA;
* ``channels_last`` -- NHWC UNet weights and inputs;
* ``autocast-bf16`` -- UNet forwards under bf16 autocast;
* ``bf16-weights`` -- frozen weights stored in bf16 (CPU only: the CUDA default already is bf16);
* ``compiled`` -- ``torch.compile`` of the UNet (on CPU only with ``FASTNABLA_BENCH_SD_COMPILE=1``:
  inductor needs 1-2 minutes per size and mode there);
* ``tf32``, ``cuda-graphs`` (sample-step only), ``xformers`` -- CUDA only (``xformers`` also needs the
  package), skipped elsewhere.

Modes: ``sample-step`` = one no-grad sampler step (the CFG pair through the UNet + the fused
denoising step); ``train-vjp`` = one training-style ``policy_eps`` forward + backward with a random
upstream gradient into ``x`` and the LoRA weights (the VJP the reverse score needs). Sizes: the
tiny test UNet and a larger 3-level UNet (64/128/256 channels, 16x16 latents), both with the tiny
pipeline's text encoder. ``extra_info`` holds the keys of bench/README.md; a UNet step is compute
bound, so ``bytes_min`` / ``ratio_to_copy`` are ``None`` and ``flops`` (``torch.utils.flop_counter``,
per call) is recorded instead.

``test_sd_switch`` times each provider on its own (one pytest-benchmark row each, summarised by
bench/summarize.py). On a shared machine the load drifts between those rows, so
``test_sd_switch_interleaved`` also times all providers of a size and mode round-robin -- one call
of each per round -- and records per provider the median over rounds of its time / eager's time in
the same round (``extra_info["ratio_to_eager"]``; printed with ``-s``). Quote those ratios.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import statistics
import time

import pytest
import torch
from bench_utils import MIN_ROUNDS, WARMUP_ROUNDS, peak_bytes, rounds_for, saved_bytes, timed_call

from fastnabla.ops import denoise_step_fused

OP = "sd_unet"
MODES = ["sample-step", "train-vjp"]
PROVIDERS = ["eager", "classic-attn", "channels_last", "autocast-bf16", "bf16-weights", "compiled", "tf32",
             "cuda-graphs", "xformers"]
SIZES = {"tiny-2x4x8x8": "tiny", "small-2x4x16x16": "small"}
BATCH = 2
SPEED = {
    "eager": {},
    "classic-attn": {"attention": "classic"},
    "channels_last": {"channels_last": True},
    "autocast-bf16": {"autocast_bf16": True},
    "bf16-weights": {},
    "compiled": {"compile_unet": True},
    "tf32": {"tf32": True},
    "cuda-graphs": {"cuda_graphs": True},
    "xformers": {"attention": "xformers"},
}
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)


def skip_reason(provider: str, mode: str, device: torch.device) -> str | None:
    cuda = device.type == "cuda"
    if provider in ("tf32", "cuda-graphs", "xformers") and not cuda:
        return f"{provider} needs CUDA"
    if provider == "xformers" and importlib.util.find_spec("xformers") is None:
        return "xformers is not installed"
    if provider == "cuda-graphs" and mode != "sample-step":
        return "CUDA graphs capture the no-grad sampling call only"
    if provider == "bf16-weights" and cuda:
        return "frozen weights already are bf16 on CUDA (the eager provider)"
    if provider == "compiled" and not cuda and os.environ.get("FASTNABLA_BENCH_SD_COMPILE", "0") != "1":
        return "compiling a UNet on CPU takes minutes: set FASTNABLA_BENCH_SD_COMPILE=1"
    return None


def _small_unet(text_width: int):
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return UNet2DConditionModel(
            sample_size=16,
            block_out_channels=(64, 128, 256),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=text_width,
            attention_head_dim=8,
        )


@functools.cache
def make_task(size: str, provider: str, device_str: str):
    from fastnabla.rewards.registry import build_reward
    from fastnabla.tasks.sd.config import SDConfig
    from fastnabla.tasks.sd.task import SDTask
    from fastnabla.tasks.sd.tiny import build_tiny_components

    device = torch.device(device_str)
    cfg = SDConfig(model="tiny", num_steps=50, frozen_dtype="bf16" if provider == "bf16-weights" else "auto")
    cfg.flow.block_out_channels = [32, 64]
    cfg.reward.name = "brightness"
    cfg.speed.tf32 = provider == "tf32"
    for key, value in SPEED[provider].items():
        setattr(cfg.speed, key, value)
    dtype = torch.bfloat16 if (device.type == "cuda" or provider == "bf16-weights") else torch.float32
    parts = build_tiny_components(seed=0, dtype=dtype, device=device)
    if size == "small":
        parts.unet = _small_unet(parts.text_width).to(device=device, dtype=dtype).eval().requires_grad_(False)
    task = SDTask(parts, cfg, build_reward("brightness"), device)
    with torch.no_grad():  # non-zero LoRA B, as during training
        for p in task.policy_parameters():
            p.normal_(0, 0.02)
    return task


def make_inputs(task, grad: bool) -> dict:
    gen = torch.Generator().manual_seed(0)
    device = task.device
    x = torch.randn(BATCH, *task.latent_shape, generator=gen).to(device)
    step = torch.tensor([10, 40], device=device)
    return {
        "x": x.requires_grad_(grad),
        "step": step,
        "cond": task.conditions_for(["cat", "a red fox"]),
        "noise": torch.randn(BATCH, *task.latent_shape, generator=gen).to(device),
        "upstream": torch.randn(BATCH, *task.latent_shape, generator=gen).to(device),
        "coeffs": task.mdp.gather(step, x.dim(), torch.float32),
    }


def sample_step(task, inp: dict):
    c = inp["coeffs"]
    with torch.no_grad():
        eps_u, eps_c = task.eps_pair(inp["x"], inp["step"], inp["cond"])
        return denoise_step_fused(inp["x"], eps_u, inp["noise"], c["a"], c["b"], c["sigma"], c["alpha_bar"],
                                  eps_cond=eps_c, guidance_scale=task.guidance_scale)


def train_vjp(task, inp: dict):
    eps = task.policy_eps(inp["x"], inp["step"], inp["cond"])
    return torch.autograd.grad(eps, [inp["x"], *task.policy_parameters()], inp["upstream"])


def flops_of(fn) -> int | None:
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    except Exception:  # noqa: BLE001 - some providers (compiled graphs) cannot be traced by the counter
        return None
    return int(counter.get_total_flops())


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_sd_switch(benchmark, device, provider, mode, size):
    reason = skip_reason(provider, mode, device)
    if reason:
        pytest.skip(reason)
    task = make_task(SIZES[size], provider, str(device))
    grad = mode == "train-vjp"
    inp = make_inputs(task, grad)
    target = functools.partial(train_vjp if grad else sample_step, task, inp)
    call = timed_call(target, device)
    for _ in range(WARMUP_ROUNDS + 1):  # the first call compiles the `compiled` / `cuda-graphs` providers
        call()
    benchmark.group = f"{OP} {size} {mode}"
    benchmark.pedantic(call, rounds=max(MIN_ROUNDS, rounds_for(call)), warmup_rounds=WARMUP_ROUNDS)
    benchmark.extra_info.update(
        op=OP, provider=provider, mode=mode, shape=[BATCH, *task.latent_shape], shape_name=size, dtype="fp32",
        cfg=True, device=str(device), bytes_min=None, copy_median_s=None, ratio_to_copy=None,
        flops=flops_of(target) if provider == "eager" else None,
        saved_bytes=saved_bytes(target) if grad else 0, peak_bytes=peak_bytes(target, device),
    )


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("mode", MODES)
def test_sd_switch_interleaved(benchmark, device, mode, size):
    providers = [p for p in PROVIDERS if skip_reason(p, mode, device) is None]
    grad = mode == "train-vjp"
    calls = {}
    for provider in providers:
        task = make_task(SIZES[size], provider, str(device))
        target = functools.partial(train_vjp if grad else sample_step, task, make_inputs(task, grad))
        calls[provider] = timed_call(target, device)
        for _ in range(WARMUP_ROUNDS + 1):
            calls[provider]()
    times: dict[str, list[float]] = {p: [] for p in providers}

    def one_round() -> None:
        for provider in providers:
            start = time.perf_counter()
            calls[provider]()
            times[provider].append(time.perf_counter() - start)

    start = time.perf_counter()
    one_round()
    rounds = int(min(50, max(7, 3.0 / (time.perf_counter() - start))))
    for p in providers:
        times[p].clear()
    benchmark.group = f"{OP} interleaved {size} {mode}"
    benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=0)
    ratios = {p: statistics.median(t / e for t, e in zip(times[p], times["eager"], strict=True)) for p in providers}
    medians = {p: statistics.median(times[p]) for p in providers}
    benchmark.extra_info.update(kind="interleaved", mode=mode, shape_name=size, device=str(device), rounds=rounds,
                                median_s=medians, ratio_to_eager=ratios)
    print(f"\n{size} {mode} ({rounds} rounds): " + ", ".join(f"{p} {ratios[p]:.2f}x" for p in providers))
