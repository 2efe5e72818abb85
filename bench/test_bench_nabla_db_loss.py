"""Residual nabla-DB loss (eqs. 16-19 + output regulariser): providers x modes x shapes.

Providers:

* ``eager``    -- the reference :func:`fastnabla.ops.nabla_db_loss.residual_nabla_db_loss` (plain autograd);
* ``compiled`` -- the reference under ``torch.compile`` (static shapes; inductor derives its own backward);
* ``fused``    -- :func:`fastnabla.ops.residual_nabla_db_loss_fused` on the reference backend with
  ``FASTNABLA_COMPILE=on``: the custom autograd Function whose closed-form forward and backward are
  compiled by inductor (``dynamic=True``) and which saves only its inputs (the CPU path);
* ``triton``   -- the same entry with ``FASTNABLA_BACKEND=triton`` (hand-written kernels; CUDA only).

Case: the authors' release configuration -- output regulariser on (``eps_old`` given, lambda = 100),
per-sample weights ``w_F``, ``w_B``, terminal and non-terminal transitions mixed, detached reverse score,
forward loss trains the flow. Gradients flow to ``eps_theta``, ``flow_t`` and ``flow_next`` (the tensors
that carry graphs to the networks in training); every one of the five ``[B]`` terms gets an upstream
gradient. Modes: ``fwd`` (no grad), ``bwd`` (backward alone, graph kept), ``fwd+bwd``.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch._functorch.config
from bench_utils import cases, measure_op, skip_unless_triton

from fastnabla.ops.nabla_db_loss import residual_nabla_db_loss, residual_nabla_db_loss_fused

# 6 shapes x 2 grad modes = 12 static-shape graphs of the reference (default limit: 8).
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
# The `bwd` mode calls backward with retain_graph=True, which graphs compiled with donated buffers refuse.
torch._functorch.config.donated_buffer = False

OP = "nabla_db_loss"
PROVIDERS = ["eager", "compiled", "fused", "triton"]
MODES = ["fwd", "bwd", "fwd+bwd"]
SHAPES = {
    "analytic-300x2": (300, 2),  # the analytic GMM task: 2-D states, ~300 transitions per batch
    "small-2x4x16x16": (2, 4, 16, 16),
    "mid-8x4x16x16": (8, 4, 16, 16),  # with the next: where compiling starts to pay (COMPILE_MIN_NUMEL)
    "mid-8x4x32x32": (8, 4, 32, 32),
    "sd-8x4x64x64": (8, 4, 64, 64),  # Stable Diffusion 1.5 latents, batch 8
    "sd-32x4x64x64": (32, 4, 64, 64),
}
DTYPES = {"fp32": torch.float32}
if torch.cuda.is_available():
    DTYPES["bf16"] = torch.bfloat16
STATES = ("x_t", "x_next", "eps_theta", "eps_pretrained", "vjp_theta", "vjp_pretrained", "fl_t", "fl_next", "flow_t",
          "flow_next",
          "eps_old")
LEAVES = ("eps_theta", "flow_t", "flow_next")
OUTPUT_REG = 100.0


@functools.cache
def _compiled_reference():
    return torch.compile(residual_nabla_db_loss, dynamic=False)


def provider_fn(provider: str, device: torch.device, monkeypatch):
    if provider == "eager":
        return residual_nabla_db_loss
    if provider == "compiled":
        return _compiled_reference()
    if provider == "fused":
        monkeypatch.setenv("FASTNABLA_BACKEND", "reference")
        monkeypatch.setenv("FASTNABLA_COMPILE", "on")
        return residual_nabla_db_loss_fused
    skip_unless_triton(device)
    monkeypatch.setenv("FASTNABLA_BACKEND", "triton")
    return residual_nabla_db_loss_fused


def make_inputs(shape, dtype, device, provider: str, grad: bool) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    rand = lambda: torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    b = shape[0]
    lin = lambda lo, hi: torch.linspace(lo, hi, b, device=device)
    inputs = {k: rand().requires_grad_(grad and k in LEAVES) for k in STATES}
    coeffs = {"a": lin(0.9, 1.1), "b": lin(-0.5, -0.05), "sigma": lin(0.02, 0.45)}
    if provider in ("eager", "compiled"):  # the reference broadcasts [B, 1, ..., 1] coefficients
        coeffs = {k: v.reshape((b,) + (1,) * (len(shape) - 1)) for k, v in coeffs.items()}
    inputs.update(coeffs, terminal=torch.arange(b, device=device) % 3 == 0, w_forward=lin(0.5, 1.0),
                  w_reverse=lin(1.0, 2.0), output_reg=OUTPUT_REG)
    return inputs


def bytes_min(shape, dtype, mode: str) -> int:
    """Least traffic of an implementation that saves nothing for backward but its inputs: ``fwd`` reads the
    11 state tensors once (x_t, x_next, eps_theta, eps_pretrained, vjp_theta, vjp_pretrained, fl_t, fl_next, flow_t,
    flow_next, eps_old) plus six fp32 [B] vectors (a, b, sigma, terminal, w_F, w_B) and writes the five
    fp32 [B] terms; ``bwd`` reads the 11 states again, the six [B] vectors and the five [B] upstream
    gradients, and writes the gradients of eps_theta, flow_t and flow_next. ``fwd+bwd`` is the sum."""
    numel = torch.Size(shape).numel()
    elem = torch.empty((), dtype=dtype).element_size()
    batch = shape[0]
    fwd = 11 * numel * elem + 6 * 4 * batch + 5 * 4 * batch
    bwd = (11 + 3) * numel * elem + 6 * 4 * batch + 5 * 4 * batch
    return fwd * (mode != "bwd") + bwd * (mode != "fwd")


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape_name", cases(SHAPES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_nabla_db_loss(benchmark, device, monkeypatch, provider, mode, shape_name, dtype_name):
    fn = provider_fn(provider, device, monkeypatch)
    shape, dtype = SHAPES[shape_name], DTYPES[dtype_name]
    grad = mode != "fwd"
    inputs = make_inputs(shape, dtype, device, provider, grad)
    wrt = [inputs[k] for k in LEAVES]
    upstream = list(torch.randn(5, shape[0], device=device).unbind(0))

    def forward():
        with torch.set_grad_enabled(grad):
            terms = fn(**inputs)
            return [terms.forward, terms.reverse, terms.terminal, terms.output_reg, terms.total]

    measure_op(
        benchmark, forward=forward, wrt=wrt, upstream=upstream, mode=mode, device=device,
        group=f"{OP} {shape_name} {dtype_name} {mode}", nbytes=bytes_min(shape, dtype, mode),
        info=dict(op=OP, provider=provider, shape=list(shape), shape_name=shape_name, dtype=dtype_name),
        op_inputs=[v for v in inputs.values() if isinstance(v, torch.Tensor)],
    )
