"""Fused transition scores (residual forward score, rev_local, two cotangents, Tweedie): providers x modes x
shapes.

Providers:

* ``eager``    -- :func:`fastnabla.ops.transition_scores_reference` (pure torch, plain autograd);
* ``compiled`` -- the reference under ``torch.compile`` with static shapes;
* ``fused``    -- :func:`fastnabla.ops.transition_scores_fused` on the reference backend with
  ``FASTNABLA_COMPILE=on`` (the CPU path: the reference compiled with ``dynamic=True``, one graph for all
  batch sizes, behind the op's input checks);
* ``triton``   -- the same entry with ``FASTNABLA_BACKEND=triton`` (hand-written kernels; CUDA only).

Case: all five outputs, ``fl_cot`` folded into ``cot_theta``, mixed per-sample coefficients. In the backward
modes all five inputs require grad and all five outputs get an upstream gradient. Modes: ``fwd`` (no grad),
``bwd`` (backward alone, graph kept), ``fwd+bwd``.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch._functorch.config
from bench_utils import cases, measure_op, skip_unless_triton

from fastnabla.ops.transition_scores import transition_scores_fused, transition_scores_reference

torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
# The `bwd` mode calls backward with retain_graph=True, which graphs compiled with donated buffers refuse.
torch._functorch.config.donated_buffer = False

OP = "transition_scores"
PROVIDERS = ["eager", "compiled", "fused", "triton"]
MODES = ["fwd", "bwd", "fwd+bwd"]
SHAPES = {
    "small-2x4x16x16": (2, 4, 16, 16),
    "mid-8x4x16x16": (8, 4, 16, 16),  # with the next: where compiling starts to pay (COMPILE_MIN_NUMEL)
    "mid-8x4x32x32": (8, 4, 32, 32),
    "sd-8x4x64x64": (8, 4, 64, 64),  # Stable Diffusion 1.5 latents, batch 8
    "sd-32x4x64x64": (32, 4, 64, 64),
}
DTYPES = {"fp32": torch.float32}
if torch.cuda.is_available():
    DTYPES["bf16"] = torch.bfloat16
STATES = ("x_t", "x_next", "eps_theta", "eps_pretrained", "fl_cot")


@functools.cache
def _compiled():
    return torch.compile(transition_scores_reference, dynamic=False)


def provider_fn(provider: str, device: torch.device, monkeypatch):
    if provider == "eager":
        return transition_scores_reference
    if provider == "compiled":
        return _compiled()
    if provider == "fused":
        monkeypatch.setenv("FASTNABLA_BACKEND", "reference")
        monkeypatch.setenv("FASTNABLA_COMPILE", "on")
        return transition_scores_fused
    skip_unless_triton(device)
    monkeypatch.setenv("FASTNABLA_BACKEND", "triton")
    return transition_scores_fused


def make_inputs(shape, dtype, device, grad: bool) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    rand = lambda: torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    b = shape[0]
    lin = lambda lo, hi: torch.linspace(lo, hi, b, device=device)
    inputs = {k: rand().requires_grad_(grad) for k in STATES}
    inputs.update(a=lin(0.9, 1.1), b=lin(-0.5, -0.05), sigma=lin(0.02, 0.45), alpha_bar=lin(0.05, 0.99),
                  prior_strength=1.0, fl_into="theta")
    return inputs


def bytes_min(shape, dtype, mode: str) -> int:
    """Least traffic: ``fwd`` reads x_t, x_{t+1}, eps_theta, eps_pretrained, fl_cot and writes the five outputs;
    ``bwd`` reads the five upstream gradients and writes the five input gradients (the op is affine: no
    activation is needed); plus the four fp32 [B] coefficients per pass. ``fwd+bwd`` is the sum."""
    numel = torch.Size(shape).numel()
    elem = torch.empty((), dtype=dtype).element_size()
    per_pass = 10 * numel * elem + 4 * 4 * shape[0]
    return per_pass * ((mode != "bwd") + (mode != "fwd"))


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape_name", cases(SHAPES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_transition_scores(benchmark, device, monkeypatch, provider, mode, shape_name, dtype_name):
    fn = provider_fn(provider, device, monkeypatch)
    shape, dtype = SHAPES[shape_name], DTYPES[dtype_name]
    grad = mode != "fwd"
    inputs = make_inputs(shape, dtype, device, grad)
    wrt = [inputs[k] for k in STATES]
    upstream = [torch.randn(shape, device=device).to(dtype) for _ in range(5)]

    def forward():
        with torch.set_grad_enabled(grad):
            return list(fn(**inputs))

    measure_op(
        benchmark, forward=forward, wrt=wrt, upstream=upstream, mode=mode, device=device,
        group=f"{OP} {shape_name} {dtype_name} {mode}", nbytes=bytes_min(shape, dtype, mode),
        info=dict(op=OP, provider=provider, shape=list(shape), shape_name=shape_name, dtype=dtype_name),
        op_inputs=[v for v in inputs.values() if isinstance(v, torch.Tensor)],
    )
