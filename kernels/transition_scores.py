"""Triton kernels of the fused transition scores (``fastnabla.kernels.transition_scores``).

Per element, with per-*sample* fp32 coefficients (one batch may mix timesteps), ``k = 1/sigma^2``,
``r = x_{t+1} - (a x_t + b eps_theta)`` and ``r# = x_{t+1} - (a x_t + b eps_pretrained)`` (paper eqs. 2, 11, 13)::

    score_fwd = (eta_p r# - r) k                 rev_local = a (r - eta_p r#) k
    cot_theta = b r k  [+ fl_cot]                cot_pretrained   = eta_p b r# k  [- fl_cot]
    x_hat     = (x_t - sqrt(1 - abar) eps_theta) / sqrt(abar)

Backward (every output is affine in the inputs; ``g_*`` are the upstream gradients, absent ones are zero)::

    G_r  = k (-g_fwd + a g_rev + b g_cot_theta),     G_r# = eta_p k (g_fwd - a g_rev + b g_cot_pretrained)
    d x_{t+1} = G_r + G_r#                           d x_t = -a (G_r + G_r#) + g_hat / sqrt(abar)
    d eps_theta = -b G_r - sqrt(1-abar)/sqrt(abar) g_hat                  d eps_pretrained = -b G_r#
    d fl_cot = g_cot_theta (FL into theta) or -g_cot_pretrained (FL into ref)

Which outputs are written, which upstream gradients exist and which input gradients are wanted are
``constexpr`` flags: a launch reads and writes only those tensors. The backward needs only the four
``[B]`` coefficients.

Layout and launch as :mod:`fastnabla.kernels.denoise_step`: tensors viewed as ``[B, N]`` in memory
order (contiguous, or channels_last for 4-D), 2-D grid ``(cdiv(N, BLOCK), B)`` so each program loads
its coefficients once, int64 offsets, masked loads, fp32 arithmetic, IEEE-rounded division and square
root, no FMA contraction. Kernels are jitted lazily, once per ``TRITON_INTERPRET`` mode (:mod:`.triton_utils`).
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
OUTPUTS = ("score_fwd", "rev_local", "cot_theta", "cot_pretrained", "x_hat")  # the op's outputs, in kernel order


@lazy_jit
def _fwd_kernel(
    x_ptr, xn_ptr, eps_ptr, eps_pretrained_ptr, fl_ptr,  # inputs, [B, N] in memory order
    a_ptr, b_ptr, sigma_ptr, abar_ptr,  # fp32 [B]
    fwd_ptr, rev_ptr, cot_ptr, cot_pretrained_ptr, x_hat_ptr,  # outputs, [B, N]
    n_per_sample, prior_strength,
    HAS_FL: tl.constexpr, FL_INTO_PRETRAINED: tl.constexpr,
    W_FWD: tl.constexpr, W_REV: tl.constexpr, W_COT: tl.constexpr, W_COT_PRETRAINED: tl.constexpr, W_HAT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    a = tl.load(a_ptr + pid_b)
    b = tl.load(b_ptr + pid_b)
    sigma = tl.load(sigma_ptr + pid_b)
    inv_var = tl.fdiv(1.0, sigma * sigma, ieee_rounding=True)

    cols = pid_n.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_per_sample
    offs = pid_b.to(tl.int64) * n_per_sample + cols
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    eps = tl.load(eps_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if W_FWD or W_REV or W_COT or W_COT_PRETRAINED:
        xn = tl.load(xn_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        r = xn - (a * x + b * eps)
        if W_FWD or W_REV or W_COT_PRETRAINED:
            eps_pretrained = tl.load(eps_pretrained_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            r_pretrained = xn - (a * x + b * eps_pretrained)
        if W_FWD:
            out = (prior_strength * r_pretrained - r) * inv_var
            tl.store(fwd_ptr + offs, out.to(fwd_ptr.dtype.element_ty), mask=mask)
        if W_REV:
            out = a * (r - prior_strength * r_pretrained) * inv_var
            tl.store(rev_ptr + offs, out.to(rev_ptr.dtype.element_ty), mask=mask)
        if W_COT:
            out = b * r * inv_var
            if HAS_FL and not FL_INTO_PRETRAINED:
                out = out + tl.load(fl_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(cot_ptr + offs, out.to(cot_ptr.dtype.element_ty), mask=mask)
        if W_COT_PRETRAINED:
            out = prior_strength * b * r_pretrained * inv_var
            if HAS_FL and FL_INTO_PRETRAINED:
                out = out - tl.load(fl_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(cot_pretrained_ptr + offs, out.to(cot_pretrained_ptr.dtype.element_ty), mask=mask)
    if W_HAT:
        abar = tl.load(abar_ptr + pid_b)
        out = tl.fdiv(x - tl.sqrt_rn(1.0 - abar) * eps, tl.sqrt_rn(abar), ieee_rounding=True)
        tl.store(x_hat_ptr + offs, out.to(x_hat_ptr.dtype.element_ty), mask=mask)


@lazy_jit
def _bwd_kernel(
    g_fwd_ptr, g_rev_ptr, g_cot_ptr, g_cot_pretrained_ptr, g_hat_ptr,  # upstream grads, [B, N]
    a_ptr, b_ptr, sigma_ptr, abar_ptr,  # fp32 [B]
    dx_ptr, dxn_ptr, deps_ptr, deps_pretrained_ptr, dfl_ptr,  # grads of x_t, x_next, eps_theta, eps_pretrained, fl_cot
    n_per_sample, prior_strength,
    G_FWD: tl.constexpr, G_REV: tl.constexpr, G_COT: tl.constexpr, G_COT_PRETRAINED: tl.constexpr, G_HAT: tl.constexpr,
    NEED_X: tl.constexpr, NEED_XN: tl.constexpr, NEED_EPS: tl.constexpr, NEED_EPS_PRETRAINED: tl.constexpr,
    NEED_FL: tl.constexpr, FL_INTO_PRETRAINED: tl.constexpr, BLOCK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    a = tl.load(a_ptr + pid_b)
    b = tl.load(b_ptr + pid_b)
    sigma = tl.load(sigma_ptr + pid_b)
    inv_var = tl.fdiv(1.0, sigma * sigma, ieee_rounding=True)

    cols = pid_n.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_per_sample
    offs = pid_b.to(tl.int64) * n_per_sample + cols
    zero = tl.zeros([BLOCK], dtype=tl.float32)
    g_r = zero
    g_r_pretrained = zero
    if G_FWD:
        g = tl.load(g_fwd_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g_r = g_r - g
        g_r_pretrained = g_r_pretrained + g
    if G_REV:
        g = tl.load(g_rev_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g_r = g_r + a * g
        g_r_pretrained = g_r_pretrained - a * g
    if G_COT:
        g_cot = tl.load(g_cot_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g_r = g_r + b * g_cot
    else:
        g_cot = zero
    if G_COT_PRETRAINED:
        g_cot_pretrained = tl.load(g_cot_pretrained_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g_r_pretrained = g_r_pretrained + b * g_cot_pretrained
    else:
        g_cot_pretrained = zero
    g_r = g_r * inv_var
    g_r_pretrained = g_r_pretrained * (prior_strength * inv_var)
    if G_HAT:
        g_hat = tl.load(g_hat_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        abar = tl.load(abar_ptr + pid_b)
        sqrt_abar = tl.sqrt_rn(abar)
    if NEED_X:
        dx = -a * (g_r + g_r_pretrained)
        if G_HAT:
            dx = dx + tl.fdiv(g_hat, sqrt_abar, ieee_rounding=True)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if NEED_XN:
        tl.store(dxn_ptr + offs, (g_r + g_r_pretrained).to(dxn_ptr.dtype.element_ty), mask=mask)
    if NEED_EPS:
        deps = -b * g_r
        if G_HAT:
            deps = deps - tl.fdiv(tl.sqrt_rn(1.0 - abar), sqrt_abar, ieee_rounding=True) * g_hat
        tl.store(deps_ptr + offs, deps.to(deps_ptr.dtype.element_ty), mask=mask)
    if NEED_EPS_PRETRAINED:
        tl.store(deps_pretrained_ptr + offs, (-b * g_r_pretrained).to(deps_pretrained_ptr.dtype.element_ty), mask=mask)
    if NEED_FL:
        dfl = -g_cot_pretrained if FL_INTO_PRETRAINED else g_cot
        tl.store(dfl_ptr + offs, dfl.to(dfl_ptr.dtype.element_ty), mask=mask)


def transition_scores_forward(
    x_t: torch.Tensor,
    x_next: torch.Tensor,
    eps_theta: torch.Tensor,
    eps_pretrained: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    sigma: torch.Tensor,
    alpha_bar: torch.Tensor,
    prior_strength: float = 1.0,
    fl_cot: torch.Tensor | None = None,
    fl_into: str = "theta",
    outputs: tuple[str, ...] = OUTPUTS,
    block_size: int | None = None,
) -> list[torch.Tensor]:
    """Launch the forward kernel; returns the outputs named in ``outputs``, in :data:`OUTPUTS` order (the
    arguments of the pure-torch reference), in ``x_t``'s dtype and layout. Coefficients: fp32 ``[B]`` on
    ``x_t``'s device (the op layer checks them)."""
    wanted = [name in outputs for name in OUTPUTS]
    fmt = kernel_memory_format(x_t)
    x_t, x_next, eps_theta, eps_pretrained = (t.contiguous(memory_format=fmt) for t in (x_t, x_next, eps_theta,
                                                                                        eps_pretrained))
    fl = fl_cot.contiguous(memory_format=fmt) if fl_cot is not None else x_t  # unused pointer without FL
    outs = [torch.empty_like(x_t, memory_format=fmt) if want else None for want in wanted]
    n = x_t[0].numel() if x_t.shape[0] else 0
    if n and any(wanted):
        block, num_warps = elementwise_config(n, triton_interpret(), block_size)
        tensors = [x_t, x_next, eps_theta, eps_pretrained, fl, a, b, sigma, alpha_bar,
                   *(o if o is not None else x_t for o in outs)]
        w_fwd, w_rev, w_cot, w_cot_pretrained, w_hat = (bool(w) for w in wanted)
        launch_per_sample(
            _fwd_kernel, tensors, (float(prior_strength),), n, block, num_warps,
            HAS_FL=fl_cot is not None, FL_INTO_PRETRAINED=fl_into == "pretrained",
            W_FWD=w_fwd, W_REV=w_rev, W_COT=w_cot, W_COT_PRETRAINED=w_cot_pretrained, W_HAT=w_hat,
        )
    return [o for o in outs if o is not None]


def transition_scores_backward(
    grads: list[torch.Tensor | None],
    a: torch.Tensor,
    b: torch.Tensor,
    sigma: torch.Tensor,
    alpha_bar: torch.Tensor,
    prior_strength: float = 1.0,
    fl_into: str = "theta",
    needs: tuple[bool, bool, bool, bool, bool] = (True, True, True, True, False),
    block_size: int | None = None,
) -> list[torch.Tensor]:
    """Launch the backward kernel: ``grads`` are the upstream gradients of the five outputs (``None`` =
    zero, at least one given); returns the gradients of ``(x_t, x_next, eps_theta, eps_pretrained, fl_cot)``
    flagged in ``needs``, in that order, in the upstream dtype and layout."""
    first = next(g for g in grads if g is not None)
    fmt = kernel_memory_format(first)
    grads = [g.contiguous(memory_format=fmt) if g is not None else None for g in grads]
    outs = [torch.empty_like(first, memory_format=fmt) if need else None for need in needs]
    n = first[0].numel() if first.shape[0] else 0
    if n and any(needs):
        block, num_warps = elementwise_config(n, triton_interpret(), block_size)
        tensors = [*(g if g is not None else first for g in grads), a, b, sigma, alpha_bar,
                   *(o if o is not None else first for o in outs)]
        present = [g is not None for g in grads]
        need_x, need_xn, need_eps, need_pretrained, need_fl = (bool(v) for v in needs)
        launch_per_sample(
            _bwd_kernel, tensors, (float(prior_strength),), n, block, num_warps,
            G_FWD=present[0], G_REV=present[1], G_COT=present[2], G_COT_PRETRAINED=present[3], G_HAT=present[4],
            NEED_X=need_x, NEED_XN=need_xn, NEED_EPS=need_eps, NEED_EPS_PRETRAINED=need_pretrained, NEED_FL=need_fl,
            FL_INTO_PRETRAINED=fl_into == "pretrained",
        )
    return [o for o in outs if o is not None]
