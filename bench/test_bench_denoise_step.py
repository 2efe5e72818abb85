"""Fused denoising step + Tweedie: providers x modes x shapes x CFG.

Providers: ``eager`` (``denoise_step_reference``), ``compiled`` (the same under ``torch.compile``,
static shapes), ``triton`` (``denoise_step_fused`` with ``FASTNABLA_BACKEND=triton``; CUDA only).
Modes: ``fwd`` (sampling: no grad), ``bwd`` (backward alone, graph kept), ``fwd+bwd``. In the
backward modes ``x`` and ``eps`` (and ``eps_cond``) require grad, ``noise`` does not, and both
outputs get an upstream gradient.
"""

from __future__ import annotations

import functools

import pytest
import torch
from bench_utils import cases, measure_op, skip_unless_triton

from fastnabla.ops.denoise_step import denoise_step_fused, denoise_step_reference

# 3 shapes x 2 CFG x 2 grad modes = 12 static-shape graphs of one function (default limit: 8).
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)

OP = "denoise_step"
PROVIDERS = ["eager", "compiled", "triton"]
MODES = ["fwd", "bwd", "fwd+bwd"]
SHAPES = {
    "small-2x4x16x16": (2, 4, 16, 16),
    "sd-8x4x64x64": (8, 4, 64, 64),  # Stable Diffusion 1.5 latents, batch 8
    "sd-32x4x64x64": (32, 4, 64, 64),
}
DTYPES = {"fp32": torch.float32}
if torch.cuda.is_available():
    DTYPES["bf16"] = torch.bfloat16
GUIDANCE = 5.0


@functools.cache
def _compiled():
    return torch.compile(denoise_step_reference, dynamic=False)


def _triton(*args, **kwargs):
    return denoise_step_fused(*args, **kwargs)


def provider_fn(provider: str, device: torch.device):
    if provider == "eager":
        return denoise_step_reference
    if provider == "compiled":
        return _compiled()
    skip_unless_triton(device)
    return _triton


def make_inputs(shape, dtype, device, cfg: bool, grad: bool) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    rand = lambda: torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    b = shape[0]
    inputs = {
        "x": rand().requires_grad_(grad),
        "eps": rand().requires_grad_(grad),
        "noise": rand(),
        "a": torch.linspace(0.9, 1.1, b, device=device),
        "b": torch.linspace(-0.5, -0.05, b, device=device),
        "sigma": torch.linspace(0.02, 0.3, b, device=device),
        "alpha_bar": torch.linspace(0.05, 0.99, b, device=device),
    }
    if cfg:
        inputs.update(eps_cond=rand().requires_grad_(grad), guidance_scale=GUIDANCE)
    return inputs


def bytes_min(shape, dtype, mode: str, cfg: bool) -> int:
    """Least traffic: fwd reads x, eps(, eps_c), z and writes 2 outputs; bwd reads 2 upstream
    grads and writes the grads of x, eps(, eps_c); plus the four fp32 [B] coefficients."""
    numel = torch.Size(shape).numel()
    elem = torch.empty((), dtype=dtype).element_size()
    n_eps = 2 if cfg else 1
    tensors = {"fwd": 2 + n_eps + 2, "bwd": 2 + 1 + n_eps}
    count = tensors["fwd"] * (mode != "bwd") + tensors["bwd"] * (mode != "fwd")
    return count * numel * elem + 4 * 4 * shape[0]


@pytest.mark.parametrize("cfg", [False, True], ids=["nocfg", "cfg"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape_name", cases(SHAPES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_denoise_step(benchmark, device, monkeypatch, provider, mode, shape_name, dtype_name, cfg):
    fn = provider_fn(provider, device)
    if provider == "triton":
        monkeypatch.setenv("FASTNABLA_BACKEND", "triton")
    shape, dtype = SHAPES[shape_name], DTYPES[dtype_name]
    grad = mode != "fwd"
    inputs = make_inputs(shape, dtype, device, cfg, grad)
    wrt = [inputs[k] for k in ("x", "eps", "eps_cond") if k in inputs]
    upstream = [torch.randn(shape, device=device).to(dtype) for _ in range(2)]

    def forward():
        with torch.set_grad_enabled(grad):
            return fn(**inputs)

    measure_op(
        benchmark, forward=forward, wrt=wrt, upstream=upstream, mode=mode, device=device,
        group=f"{OP} {shape_name} {dtype_name} {'cfg' if cfg else 'nocfg'} {mode}",
        nbytes=bytes_min(shape, dtype, mode, cfg),
        info=dict(op=OP, provider=provider, shape=list(shape), shape_name=shape_name, dtype=dtype_name, cfg=cfg),
    )
