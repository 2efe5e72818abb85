"""Pure-torch reference of the fused denoising step + Tweedie prediction (the reference and the CPU path).

Per element, with per-*sample* coefficients (a batch may mix timesteps; docs/maths.md)::

    eps    = eps_u + w (eps_c - eps_u)                    (classifier-free guidance, only with ``eps_cond``)
    x_next = a x + b eps + sigma z                        (one sampler step: mu = a x + b eps, then the noise)
    x_hat  = (x - sqrt(1 - abar) eps) / sqrt(abar)        (Tweedie / one-step prediction, paper eq. 2)

The op is linear in ``(x, eps, z)``, so its backward is closed-form (``g_n``, ``g_h`` the upstream
gradients of ``x_next``, ``x_hat``)::

    dx   = a g_n + g_h / sqrt(abar)
    deps = b g_n - sqrt(1 - abar) / sqrt(abar) g_h        (CFG: d eps_u = (1 - w) deps, d eps_c = w deps)
    dz   = sigma g_n

and needs only the four ``[B]`` coefficients.
"""

from __future__ import annotations

import torch

from fastnabla.mdp.gaussian_policy import cfg_combine, denoise_step, tweedie_x0

Tensor = torch.Tensor

__all__ = ["denoise_step_backward_reference", "denoise_step_reference"]


def _per_sample(c: Tensor, ndim: int, dtype: torch.dtype) -> Tensor:
    return c.to(dtype).reshape((-1,) + (1,) * (ndim - 1))


def denoise_step_reference(
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
    """Pure-torch ``(x_next, x_hat)`` (maths in the module docstring); no input checks.

    Computes in ``promote(x.dtype, float32)`` (fp32 for fp32/bf16/fp16, fp64 for fp64 inputs, so
    it is also the float64 reference) and returns outputs in ``x.dtype``. Coefficients may be ``[B]``
    or ``[B, 1, ..., 1]``; gradients flow to every input, coefficients included.
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    a_, b_, sigma_, abar_ = (_per_sample(c, x.dim(), compute) for c in (a, b, sigma, alpha_bar))
    x_c, e = x.to(compute), eps.to(compute)
    if eps_cond is not None:
        e = cfg_combine(e, eps_cond.to(compute), 1.0 if guidance_scale is None else guidance_scale)
    x_next = denoise_step(x_c, e, a_, b_, sigma_, noise.to(compute))
    x_hat = tweedie_x0(x_c, e, abar_)
    return x_next.to(x.dtype), x_hat.to(x.dtype)


def denoise_step_backward_reference(
    grad_next: Tensor,
    grad_hat: Tensor,
    a: Tensor,
    b: Tensor,
    sigma: Tensor,
    alpha_bar: Tensor,
    guidance_scale: float = 1.0,
    cfg: bool = False,
    needs: tuple[bool, bool, bool, bool] = (True, True, False, True),
) -> list[Tensor]:
    """Closed-form VJP of the step (module docstring), fp32 maths: the grads of ``(x, eps or eps_u, eps_c,
    noise)`` selected by ``needs``, in that order, in ``grad_next.dtype``."""
    compute = torch.promote_types(grad_next.dtype, torch.float32)
    nd = grad_next.dim()
    a_, b_, sigma_, abar_ = (_per_sample(c, nd, compute) for c in (a, b, sigma, alpha_bar))
    g_n, g_h = grad_next.to(compute), grad_hat.to(compute)
    need_x, need_eps, need_eps_c, need_z = needs
    out: list[Tensor] = []
    if need_x:
        out.append(a_ * g_n + g_h / abar_.sqrt())
    if need_eps or need_eps_c:
        deps = b_ * g_n - ((1 - abar_).sqrt() / abar_.sqrt()) * g_h
        if not cfg:
            out.append(deps)
        else:
            if need_eps:
                out.append((1 - guidance_scale) * deps)
            if need_eps_c:
                out.append(guidance_scale * deps)
    if need_z:
        out.append(sigma_ * g_n)
    return [t.to(grad_next.dtype) for t in out]
