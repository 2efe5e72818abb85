"""Triton kernels of the fused denoising step + Tweedie prediction (``fastnabla.kernels.denoise_step``).

Per element, with per-*sample* fp32 coefficients (so one batch may mix timesteps)::

    eps    = eps_u + w (eps_c - eps_u)               (only when CFG is on)
    x_next = a x + b eps + sigma z
    x_hat  = (x - sqrt(1 - abar) eps) / sqrt(abar)

Backward (the op is linear in ``(x, eps, z)``; ``g_n``, ``g_h`` are the upstream grads of
``x_next``, ``x_hat``)::

    dx   = a g_n + g_h / sqrt(abar)
    deps = b g_n - sqrt(1 - abar) / sqrt(abar) g_h      (CFG: d eps_u = (1-w) deps, d eps_c = w deps)
    dz   = sigma g_n

The backward needs no saved activations, only the four ``[B]`` coefficient vectors. Gradients of
the coefficients and of ``w`` are not computed (they are schedule constants).

Layout: tensors are viewed as ``[B, N]`` in memory order (contiguous, or channels_last for 4-D:
either way the batch dimension is outermost). The grid is 2-D, ``(cdiv(N, BLOCK), B)``: axis 0
walks the blocks of one sample (contiguous memory for neighbouring programs), axis 1 is the
sample, so each program loads its four coefficients once. Offsets are int64; loads are masked;
arithmetic is fp32 whatever the storage dtype; square roots and divisions use the IEEE-rounded forms
(``sqrt_rn``, ``fdiv(ieee_rounding=True)``) and FMA contraction is off, so results round like the
eager reference: the op is memory-bound, so exactness costs nothing.

The kernels are jitted lazily, once per ``TRITON_INTERPRET`` mode (:mod:`.triton_utils`), so this
module imports without triton and tests may switch the interpreter on at any time before a launch.
"""

from __future__ import annotations

import torch

from .triton_utils import (
    elementwise_config,
    import_triton,
    kernel_memory_format,
    launch_per_sample,
    lazy_jit,
    triton_interpret,
)

triton, tl = import_triton()
HAS_TRITON = triton is not None


@lazy_jit
def _fwd_kernel(
    x_ptr, eps_ptr, eps_c_ptr, z_ptr,  # inputs, [B, N] in memory order
    a_ptr, b_ptr, sigma_ptr, abar_ptr,  # fp32 [B]
    x_next_ptr, x_hat_ptr,  # outputs, [B, N]
    n_per_sample, guidance_scale,
    CFG: tl.constexpr, BLOCK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    a = tl.load(a_ptr + pid_b)
    b = tl.load(b_ptr + pid_b)
    sigma = tl.load(sigma_ptr + pid_b)
    abar = tl.load(abar_ptr + pid_b)
    sqrt_abar = tl.sqrt_rn(abar)
    c_eps = tl.sqrt_rn(1.0 - abar)

    cols = pid_n.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_per_sample
    offs = pid_b.to(tl.int64) * n_per_sample + cols

    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    eps = tl.load(eps_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if CFG:
        eps_c = tl.load(eps_c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        eps = eps + guidance_scale * (eps_c - eps)
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)

    x_next = a * x + b * eps + sigma * z
    x_hat = tl.fdiv(x - c_eps * eps, sqrt_abar, ieee_rounding=True)
    tl.store(x_next_ptr + offs, x_next.to(x_next_ptr.dtype.element_ty), mask=mask)
    tl.store(x_hat_ptr + offs, x_hat.to(x_hat_ptr.dtype.element_ty), mask=mask)


@lazy_jit
def _bwd_kernel(
    g_next_ptr, g_hat_ptr,  # upstream grads, [B, N]
    a_ptr, b_ptr, sigma_ptr, abar_ptr,  # fp32 [B]
    dx_ptr, deps_ptr, deps_c_ptr, dz_ptr,  # grads of x, eps (or eps_u), eps_c, z
    n_per_sample, guidance_scale,
    CFG: tl.constexpr, NEED_X: tl.constexpr, NEED_EPS: tl.constexpr,
    NEED_EPS_C: tl.constexpr, NEED_Z: tl.constexpr, BLOCK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    abar = tl.load(abar_ptr + pid_b)
    sqrt_abar = tl.sqrt_rn(abar)
    inv_sqrt_abar = tl.fdiv(1.0, sqrt_abar, ieee_rounding=True)
    c_hat = -tl.fdiv(tl.sqrt_rn(1.0 - abar), sqrt_abar, ieee_rounding=True)  # d x_hat / d eps

    cols = pid_n.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_per_sample
    offs = pid_b.to(tl.int64) * n_per_sample + cols
    g_next = tl.load(g_next_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g_hat = tl.load(g_hat_ptr + offs, mask=mask, other=0.0).to(tl.float32)

    if NEED_X:
        a = tl.load(a_ptr + pid_b)
        dx = a * g_next + inv_sqrt_abar * g_hat
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if NEED_EPS or NEED_EPS_C:
        b = tl.load(b_ptr + pid_b)
        deps = b * g_next + c_hat * g_hat
        if CFG:
            if NEED_EPS:
                tl.store(deps_ptr + offs, ((1.0 - guidance_scale) * deps).to(deps_ptr.dtype.element_ty), mask=mask)
            if NEED_EPS_C:
                tl.store(deps_c_ptr + offs, (guidance_scale * deps).to(deps_c_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(deps_ptr + offs, deps.to(deps_ptr.dtype.element_ty), mask=mask)
    if NEED_Z:
        sigma = tl.load(sigma_ptr + pid_b)
        tl.store(dz_ptr + offs, (sigma * g_next).to(dz_ptr.dtype.element_ty), mask=mask)


def denoise_step_forward(
    x: torch.Tensor,
    eps: torch.Tensor,
    noise: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    sigma: torch.Tensor,
    alpha_bar: torch.Tensor,
    eps_cond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    block_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel; returns ``(x_next, x_hat)`` in ``x.dtype`` and ``x``'s layout.

    Inputs are brought to ``x``'s layout (a copy only for those that differ). Coefficients must be
    fp32 ``[B]`` on ``x``'s device (the op layer checks this). With ``eps_cond`` given, ``eps`` is
    the unconditional prediction and CFG with scale ``guidance_scale`` is applied first.
    """
    fmt = kernel_memory_format(x)
    x, eps, noise = (t.contiguous(memory_format=fmt) for t in (x, eps, noise))
    cfg = eps_cond is not None
    eps_c = eps_cond.contiguous(memory_format=fmt) if cfg else eps  # unused pointer when CFG is off
    x_next = torch.empty_like(x, memory_format=fmt)
    x_hat = torch.empty_like(x, memory_format=fmt)
    n = x[0].numel() if x.shape[0] else 0
    if n:
        block, num_warps = elementwise_config(n, triton_interpret(), block_size)
        tensors = [x, eps, eps_c, noise, a, b, sigma, alpha_bar, x_next, x_hat]
        launch_per_sample(_fwd_kernel, tensors, (float(guidance_scale),), n, block, num_warps, CFG=cfg)
    return x_next, x_hat


def denoise_step_backward(
    grad_next: torch.Tensor,
    grad_hat: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    sigma: torch.Tensor,
    alpha_bar: torch.Tensor,
    guidance_scale: float = 1.0,
    cfg: bool = False,
    needs: tuple[bool, bool, bool, bool] = (True, True, False, True),
    block_size: int | None = None,
) -> list[torch.Tensor]:
    """Launch the backward kernel: grads of ``(x, eps or eps_u, eps_c, noise)`` for those in ``needs``.

    Returns only the requested gradients, in that order, in ``grad_next``'s dtype and layout.
    ``needs[2]`` (``eps_c``) must be False when ``cfg`` is off.
    """
    need_x, need_eps, need_eps_c, need_z = (bool(v) for v in needs)
    if need_eps_c and not cfg:
        raise ValueError("the gradient of eps_cond exists only with classifier-free guidance (cfg=True)")
    fmt = kernel_memory_format(grad_next)
    grad_next, grad_hat = (t.contiguous(memory_format=fmt) for t in (grad_next, grad_hat))
    outs = [torch.empty_like(grad_next, memory_format=fmt) if need else None for need in needs]
    n = grad_next[0].numel() if grad_next.shape[0] else 0
    if n and any(needs):
        block, num_warps = elementwise_config(n, triton_interpret(), block_size)
        tensors = [grad_next, grad_hat, a, b, sigma, alpha_bar, *(o if o is not None else grad_next for o in outs)]
        launch_per_sample(
            _bwd_kernel, tensors, (float(guidance_scale),), n, block, num_warps,
            CFG=bool(cfg), NEED_X=need_x, NEED_EPS=need_eps, NEED_EPS_C=need_eps_c, NEED_Z=need_z,
        )
    return [o for o in outs if o is not None]
