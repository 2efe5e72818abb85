"""Triton kernels of the fused residual nabla-DB loss (``fastnabla.kernels.nabla_db_loss``).

Maths (paper eqs. 16-19; the closed forms are stated in :mod:`fastnabla.ops.nabla_db_loss.reference`), per element with
per-*sample* fp32 coefficients, ``k = 1/sigma^2``, ``r = x_{t+1} - (a x_t + b eps)``, ``r# = x_{t+1} -
(a x_t + b eps#)``, ``tau`` the terminal flag::

    d_f = (eta_p r# - r) k - (fl_next + (1 - tau) g_next)
    d_r = k (a r + b vjp - eta_p (a r# + b vjp#)) + fl_t + g_t        (or -G + fl_t + g_t with a reverse target)
    L-> = mean d_f^2, L<- = mean d_r^2, L_T = tau mean g_next^2, L_reg = mean (eps - eps_old)^2
    total = w_F L-> + w_B L<- + L_T + lambda L_reg

Forward: two launches, deterministic (no atomics). ``_partial_kernel`` runs on the 2-D grid
``(cdiv(N, BLOCK), B)`` -- many programs per sample, so small batches still fill the GPU -- and writes the
four fp32 block sums of each program to ``partial[B, n_blocks, 4]``; ``_finalize_kernel`` (one program per
sample) adds them in a fixed order, divides by ``N`` and combines the weighted total into ``terms[5, B]``.
Accumulation is fp32 throughout (tree sums within a block, then a sequential sum over blocks), whatever the
storage dtype. The same inputs always give bit-identical results, which atomics would not.

Backward: one launch on the same 2-D grid. Each program loads its per-sample scalars (coefficients,
weights, terminal flag and the five upstream gradients), recomputes ``d_f`` and ``d_r`` from the inputs
(nothing was saved) and writes every requested gradient (the closed forms of
:mod:`fastnabla.ops.nabla_db_loss.reference`). ``constexpr`` flags select the options (reverse target, output
regulariser, second-order routing, forward-trains-flow) and the gradients to write, so a launch reads and
writes only the tensors it needs; which residuals a launch needs (``NEED_F``, ``NEED_R``) follows from those
flags and is declared at the kernel (``@triton.heuristics``, through :func:`.triton_utils.lazy_jit`).

Layout: every state tensor is viewed as ``[B, N]`` in memory order (contiguous, or channels_last for 4-D).
Offsets are int64, loads masked, arithmetic fp32 with IEEE division and no FMA contraction. Kernels are
jitted lazily, once per ``TRITON_INTERPRET`` mode.
"""

from __future__ import annotations

import torch

from .triton_utils import (
    cdiv,
    checked_block,
    import_triton,
    interpreter_block,
    kernel_memory_format,
    launch_per_sample,
    lazy_jit,
    next_power_of_2,
    triton_interpret,
    warps_for,
)

triton, tl = import_triton()
HAS_TRITON = triton is not None
GRAD_ORDER = ("x_t", "x_next", "eps_theta", "eps_pretrained", "vjp_theta", "vjp_pretrained", "fl_t", "fl_next",
              "flow_t",
              "flow_next", "eps_old")


@lazy_jit
def _partial_kernel(
    x_ptr, xn_ptr, eps_ptr, eps_pretrained_ptr, vjp_ptr, vjp_pretrained_ptr, fl_t_ptr, fl_n_ptr, g_t_ptr, g_n_ptr,
    eps_old_ptr, target_ptr,  # states, [B, N] in memory order
    a_ptr, b_ptr, sigma_ptr, term_ptr,  # fp32 [B]
    partial_ptr,  # fp32 [B, n_blocks, 4]
    n_per_sample, prior_strength,
    TARGET: tl.constexpr, REG: tl.constexpr, BLOCK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    a = tl.load(a_ptr + pid_b)
    b = tl.load(b_ptr + pid_b)
    sigma = tl.load(sigma_ptr + pid_b)
    keep = tl.load(term_ptr + pid_b) == 0.0
    inv_var = tl.fdiv(1.0, sigma * sigma, ieee_rounding=True)

    cols = pid_n.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_per_sample
    offs = pid_b.to(tl.int64) * n_per_sample + cols
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    xn = tl.load(xn_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    eps = tl.load(eps_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    eps_pretrained = tl.load(eps_pretrained_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g_n = tl.load(g_n_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    fl_n = tl.load(fl_n_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r = xn - (a * x + b * eps)
    r_pretrained = xn - (a * x + b * eps_pretrained)
    d_f = (prior_strength * r_pretrained - r) * inv_var - (fl_n + tl.where(keep, g_n, 0.0))
    if TARGET:
        score_rev = -tl.load(target_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        vjp = tl.load(vjp_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        vjp_pretrained = tl.load(vjp_pretrained_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        score_rev = (a * r + b * vjp - prior_strength * (a * r_pretrained + b * vjp_pretrained)) * inv_var
    d_r = score_rev + tl.load(fl_t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    d_r = d_r + tl.load(g_t_ptr + offs, mask=mask, other=0.0).to(tl.float32)

    out = partial_ptr + (pid_b.to(tl.int64) * tl.num_programs(0) + pid_n) * 4
    tl.store(out, tl.sum(tl.where(mask, d_f * d_f, 0.0), axis=0))
    tl.store(out + 1, tl.sum(tl.where(mask, d_r * d_r, 0.0), axis=0))
    tl.store(out + 2, tl.sum(g_n * g_n, axis=0))  # masked lanes loaded 0
    if REG:
        diff = eps - tl.load(eps_old_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out + 3, tl.sum(diff * diff, axis=0))
    else:
        tl.store(out + 3, 0.0)


@lazy_jit
def _finalize_kernel(
    partial_ptr,  # fp32 [B, n_blocks, 4]
    term_ptr, w_f_ptr, w_b_ptr,  # fp32 [B]
    terms_ptr,  # fp32 [5, B]: forward, reverse, terminal, output_reg, total
    n_blocks, batch, inv_n, output_reg,
    BLOCK_P: tl.constexpr,
):
    pid_b = tl.program_id(0)
    base = partial_ptr + pid_b.to(tl.int64) * n_blocks * 4
    acc_f = tl.zeros([BLOCK_P], dtype=tl.float32)
    acc_r = tl.zeros([BLOCK_P], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_P], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_P], dtype=tl.float32)
    for start in range(0, n_blocks, BLOCK_P):
        idx = start + tl.arange(0, BLOCK_P)
        m = idx < n_blocks
        acc_f += tl.load(base + idx * 4, mask=m, other=0.0)
        acc_r += tl.load(base + idx * 4 + 1, mask=m, other=0.0)
        acc_t += tl.load(base + idx * 4 + 2, mask=m, other=0.0)
        acc_g += tl.load(base + idx * 4 + 3, mask=m, other=0.0)
    loss_f = tl.sum(acc_f, axis=0) * inv_n
    loss_r = tl.sum(acc_r, axis=0) * inv_n
    loss_t = tl.where(tl.load(term_ptr + pid_b) != 0.0, tl.sum(acc_t, axis=0) * inv_n, 0.0)
    loss_g = tl.sum(acc_g, axis=0) * inv_n
    total = tl.load(w_f_ptr + pid_b) * loss_f + tl.load(w_b_ptr + pid_b) * loss_r + loss_t + output_reg * loss_g
    tl.store(terms_ptr + pid_b, loss_f)
    tl.store(terms_ptr + batch + pid_b, loss_r)
    tl.store(terms_ptr + 2 * batch + pid_b, loss_t)
    tl.store(terms_ptr + 3 * batch + pid_b, loss_g)
    tl.store(terms_ptr + 4 * batch + pid_b, total)


def _needs_forward_residual(args: dict) -> bool:
    """``d_f`` enters the gradients of x_t, x_next, eps_theta, eps_pretrained, fl_next, and of g(x_{t+1}) when the
    forward loss trains the flow."""
    into_f = ("N_X", "N_XN", "N_EPS", "N_EPS_PRETRAINED", "N_FL_N")
    return bool(any(args[k] for k in into_f) or (args["N_G_N"] and args["FWD_TRAINS_FLOW"]))


def _needs_reverse_residual(args: dict) -> bool:
    """``d_r`` enters the gradients of fl_t and g(x_t), and with second-order routing those of the first six."""
    first_six = ("N_X", "N_XN", "N_EPS", "N_EPS_PRETRAINED", "N_VJP", "N_VJP_PRETRAINED")
    return bool(args["N_FL_T"] or args["N_G_T"] or (args["SECOND"] and any(args[k] for k in first_six)))


@lazy_jit(heuristics={"NEED_F": _needs_forward_residual, "NEED_R": _needs_reverse_residual})
def _bwd_kernel(
    x_ptr, xn_ptr, eps_ptr, eps_pretrained_ptr, vjp_ptr, vjp_pretrained_ptr, fl_t_ptr, fl_n_ptr, g_t_ptr, g_n_ptr,
    eps_old_ptr, target_ptr,  # states, [B, N]
    a_ptr, b_ptr, sigma_ptr, term_ptr, w_f_ptr, w_b_ptr,  # fp32 [B]
    up_ptr,  # fp32 [B, 5]: upstream grads of forward, reverse, terminal, output_reg, total
    dx_ptr, dxn_ptr, deps_ptr, deps_pretrained_ptr, dvjp_ptr, dvjp_pretrained_ptr, dfl_t_ptr, dfl_n_ptr, dg_t_ptr,
    dg_n_ptr,
    deps_old_ptr,  # gradients, [B, N]
    n_per_sample, prior_strength, output_reg, scale,  # scale = 2 / N
    TARGET: tl.constexpr, REG: tl.constexpr, SECOND: tl.constexpr, FWD_TRAINS_FLOW: tl.constexpr,
    NEED_F: tl.constexpr, NEED_R: tl.constexpr,
    N_X: tl.constexpr, N_XN: tl.constexpr, N_EPS: tl.constexpr, N_EPS_PRETRAINED: tl.constexpr, N_VJP: tl.constexpr,
    N_VJP_PRETRAINED: tl.constexpr, N_FL_T: tl.constexpr, N_FL_N: tl.constexpr, N_G_T: tl.constexpr,
    N_G_N: tl.constexpr,
    N_EPS_OLD: tl.constexpr, BLOCK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    a = tl.load(a_ptr + pid_b)
    b = tl.load(b_ptr + pid_b)
    sigma = tl.load(sigma_ptr + pid_b)
    is_term = tl.load(term_ptr + pid_b) != 0.0
    inv_var = tl.fdiv(1.0, sigma * sigma, ieee_rounding=True)
    up = up_ptr + pid_b.to(tl.int64) * 5
    g_tot = tl.load(up + 4)
    c_f = (tl.load(up) + tl.load(w_f_ptr + pid_b) * g_tot) * scale
    c_r = (tl.load(up + 1) + tl.load(w_b_ptr + pid_b) * g_tot) * scale
    eta = prior_strength
    one_m_eta = 1.0 - eta

    cols = pid_n.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_per_sample
    offs = pid_b.to(tl.int64) * n_per_sample + cols
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    xn = tl.load(xn_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    eps = tl.load(eps_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    eps_pretrained = tl.load(eps_pretrained_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g_n = tl.load(g_n_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r = xn - (a * x + b * eps)
    r_pretrained = xn - (a * x + b * eps_pretrained)
    if NEED_F:
        fl_n = tl.load(fl_n_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d_f = (eta * r_pretrained - r) * inv_var - (fl_n + tl.where(is_term, 0.0, g_n))
        u_f = c_f * d_f
    if NEED_R:
        if TARGET:
            score_rev = -tl.load(target_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            vjp = tl.load(vjp_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            vjp_pretrained = tl.load(vjp_pretrained_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            score_rev = (a * r + b * vjp - eta * (a * r_pretrained + b * vjp_pretrained)) * inv_var
        d_r = score_rev + tl.load(fl_t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d_r = d_r + tl.load(g_t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u_r = c_r * d_r
    if REG:
        c_g = (tl.load(up + 3) + output_reg * g_tot) * scale
        diff = c_g * (eps - tl.load(eps_old_ptr + offs, mask=mask, other=0.0).to(tl.float32))

    if N_X:
        grad = inv_var * a * one_m_eta * u_f
        if SECOND:
            grad = grad - inv_var * a * a * one_m_eta * u_r
        tl.store(dx_ptr + offs, grad.to(dx_ptr.dtype.element_ty), mask=mask)
    if N_XN:
        grad = inv_var * (eta - 1.0) * u_f
        if SECOND:
            grad = grad + inv_var * a * one_m_eta * u_r
        tl.store(dxn_ptr + offs, grad.to(dxn_ptr.dtype.element_ty), mask=mask)
    if N_EPS:
        grad = inv_var * b * u_f
        if SECOND:
            grad = grad - inv_var * a * b * u_r
        if REG:
            grad = grad + diff
        tl.store(deps_ptr + offs, grad.to(deps_ptr.dtype.element_ty), mask=mask)
    if N_EPS_PRETRAINED:
        grad = -eta * inv_var * b * u_f
        if SECOND:
            grad = grad + eta * inv_var * a * b * u_r
        tl.store(deps_pretrained_ptr + offs, grad.to(deps_pretrained_ptr.dtype.element_ty), mask=mask)
    if N_VJP:
        tl.store(dvjp_ptr + offs, (inv_var * b * u_r).to(dvjp_ptr.dtype.element_ty), mask=mask)
    if N_VJP_PRETRAINED:
        tl.store(dvjp_pretrained_ptr + offs, (-eta * inv_var * b * u_r).to(dvjp_pretrained_ptr.dtype.element_ty),
                 mask=mask)
    if N_FL_T:
        tl.store(dfl_t_ptr + offs, u_r.to(dfl_t_ptr.dtype.element_ty), mask=mask)
    if N_FL_N:
        tl.store(dfl_n_ptr + offs, (-u_f).to(dfl_n_ptr.dtype.element_ty), mask=mask)
    if N_G_T:
        tl.store(dg_t_ptr + offs, u_r.to(dg_t_ptr.dtype.element_ty), mask=mask)
    if N_G_N:
        c_t = (tl.load(up + 2) + g_tot) * scale
        grad = tl.where(is_term, c_t * g_n, 0.0)
        if FWD_TRAINS_FLOW:
            grad = grad - tl.where(is_term, 0.0, u_f)
        tl.store(dg_n_ptr + offs, grad.to(dg_n_ptr.dtype.element_ty), mask=mask)
    if N_EPS_OLD:
        tl.store(deps_old_ptr + offs, (-diff).to(deps_old_ptr.dtype.element_ty), mask=mask)


def launch_config(n: int, batch: int, interpret: bool, block_size: int | None = None) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` for ``n`` elements per sample: at least ~512 programs in all when the data
    allows (a reduction with one program per sample would leave most of a GPU idle at B = 8)."""
    if block_size is not None:
        block = checked_block(block_size)
    elif interpret:
        block = interpreter_block(n)
    else:
        block = max(256, min(2048, next_power_of_2(cdiv(n * batch, 512))))
        block = min(block, max(256, next_power_of_2(n)))
    return block, warps_for(block)


def _states(x_t: torch.Tensor, others: tuple) -> list[torch.Tensor]:
    """The 12 state tensors in ``x_t``'s kernel layout; absent optional ones point at ``x_t`` (unread)."""
    fmt = kernel_memory_format(x_t)
    return [t.contiguous(memory_format=fmt) if t is not None else x_t for t in (x_t, *others)]


def nabla_db_loss_forward(
    x_t, x_next, eps_theta, eps_pretrained, vjp_theta, vjp_pretrained, fl_t, fl_next, flow_t, flow_next, eps_old,
    reverse_target,
    a, b, sigma, terminal, w_forward, w_reverse, prior_strength: float = 1.0, output_reg: float = 0.0,
    block_size: int | None = None,
) -> torch.Tensor:
    """Launch the forward: the ``[5, B]`` fp32 terms ``(forward, reverse, terminal, output_reg, total)``.
    Per-sample inputs (``a, b, sigma, terminal`` as 0/1, ``w_forward, w_reverse``) are fp32 ``[B]`` on the
    states' device; ``vjp_theta``/``vjp_pretrained`` may be None with ``reverse_target``; ``eps_old`` None = no
    regulariser. ``N`` (elements per sample) must be > 0."""
    states = _states(x_t, (x_next, eps_theta, eps_pretrained, vjp_theta, vjp_pretrained, fl_t, fl_next, flow_t,
                           flow_next, eps_old, reverse_target))
    batch, n = x_t.shape[0], x_t[0].numel()
    terms = torch.empty((5, batch), dtype=torch.float32, device=x_t.device)
    if batch == 0:
        return terms
    block, num_warps = launch_config(n, batch, triton_interpret(), block_size)
    n_blocks = cdiv(n, block)
    partial = torch.empty((batch, n_blocks, 4), dtype=torch.float32, device=x_t.device)
    launch_per_sample(_partial_kernel, [*states, a, b, sigma, terminal, partial], (float(prior_strength),), n, block,
            num_warps, TARGET=reverse_target is not None, REG=eps_old is not None)
    block_p = min(next_power_of_2(n_blocks), 1024)
    _finalize_kernel[(batch,)](partial, terminal, w_forward, w_reverse, terms, n_blocks, batch, 1.0 / n,
                              float(output_reg), BLOCK_P=block_p, num_warps=4)
    return terms


def nabla_db_loss_backward(
    grad_terms, x_t, x_next, eps_theta, eps_pretrained, vjp_theta, vjp_pretrained, fl_t, fl_next, flow_t, flow_next,
    eps_old,
    reverse_target, a, b, sigma, terminal, w_forward, w_reverse, prior_strength: float = 1.0,
    output_reg: float = 0.0, detach_reverse: bool = True, forward_trains_flow: bool = True,
    needs: tuple[bool, ...] = (False, False, True, False, False, False, False, False, True, True, False),
    block_size: int | None = None,
) -> list[torch.Tensor]:
    """Launch the backward: from the ``[5, B]`` upstream gradient of the terms, the gradients of the
    inputs in :data:`GRAD_ORDER` flagged by ``needs`` (in that order, in ``x_t``'s dtype and layout).
    ``needs`` must not flag gradients the options do not route (the op layer ensures it)."""
    need = dict(zip(GRAD_ORDER, (bool(v) for v in needs), strict=True))
    target, reg = reverse_target is not None, eps_old is not None
    second = not target and not detach_reverse
    if (need["vjp_theta"] or need["vjp_pretrained"]) and not second:
        raise ValueError("vjp_theta/vjp_pretrained receive gradients only with detach_reverse=False and no "
                         "reverse_target")
    if need["eps_old"] and not reg:
        raise ValueError("eps_old receives a gradient only when the output regulariser is on")
    states = _states(x_t, (x_next, eps_theta, eps_pretrained, vjp_theta, vjp_pretrained, fl_t, fl_next, flow_t,
                           flow_next, eps_old, reverse_target))
    fmt = kernel_memory_format(x_t)
    outs = [torch.empty_like(states[0], memory_format=fmt) if need[k] else None for k in GRAD_ORDER]
    batch, n = x_t.shape[0], x_t[0].numel()
    if batch and n and any(needs):
        block, num_warps = launch_config(n, batch, triton_interpret(), block_size)
        upstream = grad_terms.to(torch.float32).t().contiguous()  # [B, 5]: one row per sample
        tensors = [*states, a, b, sigma, terminal, w_forward, w_reverse, upstream,
                   *(o if o is not None else states[0] for o in outs)]
        flag_names = ("X", "XN", "EPS", "EPS_PRETRAINED", "VJP", "VJP_PRETRAINED", "FL_T", "FL_N", "G_T", "G_N",
                      "EPS_OLD")
        flags = {f"N_{k}": need[name] for k, name in zip(flag_names, GRAD_ORDER, strict=True)}
        launch_per_sample(_bwd_kernel, tensors, (float(prior_strength), float(output_reg), 2.0 / n), n, block,
                          num_warps, TARGET=target, REG=reg, SECOND=second, FWD_TRAINS_FLOW=bool(forward_trains_flow),
                          **flags)  # NEED_F, NEED_R: the kernel's heuristics
    return [o for o in outs if o is not None]
