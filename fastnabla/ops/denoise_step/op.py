"""The fused denoising step's entry point and ``torch.library`` registration.

Both outputs of one sampler step (maths in :mod:`fastnabla.ops.denoise_step.reference`) come from one
pass over ``x``, ``eps`` (or ``eps_u``, ``eps_c``) and ``z``: the Triton kernel reads 3 (CFG: 4) tensors
and writes 2, where the eager composition reads and writes every intermediate. Arithmetic is fp32;
outputs are in the input dtype.

Gradients flow to ``x``, ``eps`` (or ``eps_u``, ``eps_c``) and ``noise``; the coefficients and ``w`` are
schedule constants (:func:`denoise_step_fused` raises if one requires grad; differentiate the schedule
through :func:`~fastnabla.ops.denoise_step.reference.denoise_step_reference`). No double backward; the
backward saves only the four ``[B]`` coefficient vectors.

Paths (:mod:`fastnabla.ops.dispatch`): Triton kernels (``kernels/denoise_step.py``) on the Triton backend,
else the reference inline (a handful of elementwise ops: not worth compiling on its own).
"""

from __future__ import annotations

import numbers

import torch

from fastnabla.ops.checks import check_states, per_sample_vector
from fastnabla.ops.denoise_step.reference import denoise_step_backward_reference, denoise_step_reference
from fastnabla.ops.dispatch import Autograd, FusedOp, Pass, kernel_memory_format

Tensor = torch.Tensor

__all__ = ["DENOISE_STEP", "denoise_step_fused"]

DENOISE_STEP = FusedOp(
    "denoise_step",
    kernels="denoise_step",
    forward=Pass(denoise_step_reference, "denoise_step_forward"),
    backward=Pass(denoise_step_backward_reference, "denoise_step_backward"),
    autograd=Autograd(
        grad_inputs=(0, 1, 7, 2),  # x, eps (or eps_u), eps_cond, noise: the backward's order
        save=lambda i: (i[3:7], (i[8], i[7] is not None)),  # four [B] coefficients; w, cfg
        routed=lambda i: (True, True, i[7] is not None, True),
    ),
)


@torch.library.custom_op("fastnabla::denoise_step", mutates_args=())
def _denoise_step_op(
    x: Tensor,
    eps: Tensor,
    noise: Tensor,
    a: Tensor,
    b: Tensor,
    sigma: Tensor,
    alpha_bar: Tensor,
    eps_cond: Tensor | None,
    guidance_scale: float,
    path: str = "auto",
) -> tuple[Tensor, Tensor]:
    return DENOISE_STEP.forward(path, x, eps, noise, a, b, sigma, alpha_bar, eps_cond, guidance_scale)


@_denoise_step_op.register_fake
def _(x, eps, noise, a, b, sigma, alpha_bar, eps_cond, guidance_scale, path="auto"):
    fmt = kernel_memory_format(x)
    return torch.empty_like(x, memory_format=fmt), torch.empty_like(x, memory_format=fmt)


@torch.library.custom_op("fastnabla::denoise_step_backward", mutates_args=())
def _denoise_step_backward_op(
    grad_next: Tensor,
    grad_hat: Tensor,
    a: Tensor,
    b: Tensor,
    sigma: Tensor,
    alpha_bar: Tensor,
    guidance_scale: float,
    cfg: bool,
    need_x: bool,
    need_eps: bool,
    need_eps_cond: bool,
    need_noise: bool,
    path: str = "auto",
) -> list[Tensor]:
    needs = (need_x, need_eps, need_eps_cond, need_noise)
    return DENOISE_STEP.backward(path, grad_next, grad_hat, a, b, sigma, alpha_bar, guidance_scale, cfg, needs)


@_denoise_step_backward_op.register_fake
def _(grad_next, grad_hat, a, b, sigma, alpha_bar, guidance_scale, cfg, need_x, need_eps, need_eps_cond, need_noise,
      path="auto"):
    fmt = kernel_memory_format(grad_next)
    count = sum(map(bool, (need_x, need_eps, need_eps_cond, need_noise)))
    return [torch.empty_like(grad_next, memory_format=fmt) for _ in range(count)]


DENOISE_STEP.register(_denoise_step_op)


def denoise_step_fused(
    x: Tensor,
    eps: Tensor,
    noise: Tensor,
    a: Tensor,
    b: Tensor,
    sigma: Tensor,
    alpha_bar: Tensor,
    eps_cond: Tensor | None = None,
    guidance_scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """One denoising step and the Tweedie prediction of the *current* state, fused::

        eps    = eps + w (eps_cond - eps)          if eps_cond is given (CFG, w = guidance_scale)
        x_next = a x + b eps + sigma noise
        x_hat  = (x - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)        (paper eq. 2)

    Args:
        x, eps, noise: ``[B, ...]`` state, predicted noise (unconditional when ``eps_cond`` is
            given) and step noise ``z``; one dtype among fp32/bf16/fp16, one device.
        a, b, sigma, alpha_bar: per-sample coefficients, ``[B]`` or ``[B, 1, ..., 1]``, any float
            dtype (used in fp32), on ``x``'s device; constants (no gradient).
            ``alpha_bar`` must lie in ``(0, 1]`` (not checked: that would sync the device).
        eps_cond: conditional prediction for classifier-free guidance (needs ``guidance_scale``).
        guidance_scale: the CFG scale ``w`` (a Python number).

    Returns:
        ``(x_next, x_hat)`` in ``x.dtype``; differentiable w.r.t. ``x``, ``eps``, ``eps_cond``, ``noise``.

    Raises:
        TypeError: a non-tensor input or an unsupported / mismatched dtype.
        ValueError: mismatched shapes or devices, wrong coefficient shape, a coefficient that
            requires grad, or ``eps_cond`` / ``guidance_scale`` given without the other.
    """
    ref = check_states({"x": x, "eps": eps, "noise": noise, "eps_cond": eps_cond})
    coeffs = [
        per_sample_vector(name, c, ref, reference="fastnabla.ops.denoise_step_reference")
        for name, c in (("a", a), ("b", b), ("sigma", sigma), ("alpha_bar", alpha_bar))
    ]
    if (eps_cond is None) != (guidance_scale is None):
        raise ValueError("classifier-free guidance needs both eps_cond and guidance_scale (or neither)")
    if guidance_scale is not None and (
        isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real)
    ):
        raise TypeError(f"guidance_scale must be a Python number, got {type(guidance_scale).__name__}")
    w = 1.0 if guidance_scale is None else float(guidance_scale)
    return DENOISE_STEP(
        x, eps, noise, *coeffs, eps_cond, w,
        reference=lambda: denoise_step_reference(x, eps, noise, *coeffs, eps_cond=eps_cond, guidance_scale=w),
    )
