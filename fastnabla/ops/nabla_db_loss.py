"""Fused residual nabla-DB loss with forward-looking flow (paper eqs. 16-19 + the output regulariser).

Same inputs, options and outputs as the oracle :func:`fastnabla.losses.nabla_db.residual_nabla_db_loss`.
Per transition, with ``k = 1/sigma^2``, ``r = x_{t+1} - (a x_t + b eps_theta)``, ``r# = x_{t+1} - (a x_t +
b eps_ref)``, ``tau`` the terminal mask and means over the ``N`` non-batch elements::

    d_f  = (eta_p r# - r) k - [fl_next + (1 - tau) g(x_{t+1})]                   (eq. 16 residual)
    d_r  = k (a r + b vjp_theta - eta_p (a r# + b vjp_ref)) + fl_t + g(x_t)      (eq. 17; -G if reverse_target)
    L->  = mean d_f^2,  L<- = mean d_r^2,  L_T = tau mean g(x_{t+1})^2,  L_reg = mean (eps_theta - eps_old)^2
    total = w_F L-> + w_B L<- + L_T + lambda L_reg                               (eq. 19)

returned as :class:`fastnabla.losses.nabla_db.NablaDBTerms` of ``[B]`` fp32 vectors. The loss is quadratic in
affine functions of the inputs, so the backward is closed-form and elementwise. With upstream ``[B]``
gradients ``g_F, g_B, g_T, g_reg, g_tot`` of the five terms::

    u_f = 2/N (g_F + w_F g_tot) d_f,   u_r = 2/N (g_B + w_B g_tot) d_r
    c_T = 2/N tau (g_T + g_tot),       c_reg = 2/N (g_reg + lambda g_tot)
    d eps_theta = k b u_f [- k a b u_r]* + c_reg (eps_theta - eps_old)
    d g(x_{t+1}) = -(1 - tau) u_f [if forward_trains_flow] + c_T g(x_{t+1}),     d g(x_t) = u_r
    d x_t = k a (1 - eta_p) u_f [- k a^2 (1 - eta_p) u_r]*,   d x_{t+1} = k (eta_p - 1) u_f [+ k a (1 - eta_p) u_r]*
    d eps_ref = -eta_p k b u_f [+ eta_p k a b u_r]*,   d vjp_theta = [k b u_r]*,   d vjp_ref = [-eta_p k b u_r]*
    d fl_next = -u_f,   d fl_t = u_r,   d eps_old = -c_reg (eps_theta - eps_old)

where ``[...]*`` exists only with ``detach_reverse=False`` and no ``reverse_target`` (the second-order
routing; by default ``s~<-`` is a constant, as in the oracle). The backward recomputes ``d_f`` and
``d_r`` from the inputs: **nothing is saved for backward beyond the inputs** and ``[B]`` vectors.
Coefficients, weights and the terminal mask are constants; ``reverse_target`` is detached (as in the
oracle). Every option combination runs the fused path: there is no fallback.

Layers (the :mod:`fastnabla.ops.denoise_step` pattern):

* :func:`nabla_db_loss_reference` / :func:`nabla_db_loss_backward_reference` -- pure-torch closed forms of
  the two passes, written so inductor fuses each into one loop;
* ``torch.ops.fastnabla.residual_nabla_db_loss`` (+ ``..._backward``) -- ``torch.library`` custom ops with
  fake and autograd registrations (``torch.compile(fullgraph=True)`` traces through them); their
  implementation is the Triton kernels (:mod:`fastnabla.kernels.nabla_db_loss`) or the closed forms;
* :func:`residual_nabla_db_loss_fused` -- the public entry: input checks, then by
  :func:`fastnabla.ops.dispatch.select_backend`:

  - Triton -> the custom op (in eager mode through an equivalent ``autograd.Function`` that skips the
    custom-op dispatch overhead);
  - reference, CPU tensors of at least :data:`COMPILE_MIN_NUMEL` elements (or ``FASTNABLA_COMPILE=on``) ->
    the same ``autograd.Function`` over the closed forms compiled by inductor (``dynamic=True``: one graph
    per pass for every batch size > 1, a second for B = 1), saving only its inputs;
  - reference, smaller tensors (or ``FASTNABLA_COMPILE=off``) -> the oracle itself, inline (plain
    autograd; measured faster below the threshold, and it never compiles: the analytic task's ``[300, 2]``
    batches stay on it);
  - under an outer ``torch.compile`` -> the custom op.
"""

from __future__ import annotations

import numbers

import torch

from fastnabla.losses.nabla_db import NablaDBTerms, residual_nabla_db_loss
from fastnabla.mdp.gaussian_policy import step_mean
from fastnabla.ops.dispatch import compiled, kernel_memory_format, select_backend, use_compiled
from fastnabla.ops.transition_scores import check_states, per_sample_vector, python_float

Tensor = torch.Tensor
# Gradients the backward can produce, in the op's input order.
GRAD_INPUTS = (
    "x_t", "x_next", "eps_theta", "eps_ref", "vjp_theta", "vjp_ref", "fl_t", "fl_next", "flow_t", "flow_next",
    "eps_old",
)
# FASTNABLA_COMPILE=auto compiles CPU calls from this many elements per state tensor. Measured (docs/ops.md,
# one thread, fwd+bwd, compiled closed forms / eager oracle): 1.11 at 600 elements, 1.08 at 8192, 0.75 at
# 32768, 0.39 at 131072, 0.15 at 524288.
COMPILE_MIN_NUMEL = 1 << 15

__all__ = ["GRAD_INPUTS", "nabla_db_loss_backward_reference", "nabla_db_loss_reference", "residual_nabla_db_loss_fused"]


def _per_sample(c: Tensor, ndim: int, dtype: torch.dtype) -> Tensor:
    return c.to(dtype).reshape((-1,) + (1,) * (ndim - 1))


def _as_2d(t: Tensor | None) -> Tensor | None:
    return t.unsqueeze(1) if t is not None and t.dim() == 1 else t


def _residuals(
    x, xn, e, e_ref, vjp, vjp_ref, fl_t, fl_next, flow_t, flow_next, target, a_, b_, inv_var, term_, eta,
    need_f: bool = True, need_r: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """``(d_f, d_r)`` of the module docstring, in the compute dtype (None where not needed)."""
    r = xn - step_mean(x, e, a_, b_)
    r_ref = xn - step_mean(x, e_ref, a_, b_)
    d_f = d_r = None
    if need_f:
        score_fwd = (-r + eta * r_ref) * inv_var
        d_f = score_fwd - (fl_next + torch.where(term_, torch.zeros_like(flow_next), flow_next))
    if need_r:
        score_rev = -target if target is not None else (a_ * r + b_ * vjp - eta * (a_ * r_ref + b_ * vjp_ref)) * inv_var
        d_r = score_rev + fl_t + flow_t
    return d_f, d_r


def nabla_db_loss_reference(
    x_t: Tensor,
    x_next: Tensor,
    eps_theta: Tensor,
    eps_ref: Tensor,
    vjp_theta: Tensor | None,
    vjp_ref: Tensor | None,
    fl_t: Tensor,
    fl_next: Tensor,
    flow_t: Tensor,
    flow_next: Tensor,
    eps_old: Tensor | None,
    reverse_target: Tensor | None,
    a: Tensor,
    b: Tensor,
    sigma: Tensor,
    terminal: Tensor,
    w_forward: Tensor,
    w_reverse: Tensor,
    prior_strength: float = 1.0,
    output_reg: float = 0.0,
) -> Tensor:
    """Closed-form forward: ``[5, B]`` terms ``(forward, reverse, terminal, output_reg, total)`` (module
    docstring). Coefficients, weights and ``terminal`` (0/1) are ``[B]``; the output regulariser is on iff
    ``eps_old`` is given (its weight may still be 0). Computes in ``promote(x_t.dtype, float32)``; no checks
    and no data-dependent control flow (``torch.compile`` fuses it into one reduction loop)."""
    compute = torch.promote_types(x_t.dtype, torch.float32)
    states = [_as_2d(t) for t in (x_t, x_next, eps_theta, eps_ref, vjp_theta, vjp_ref, fl_t, fl_next, flow_t,
                                  flow_next, eps_old, reverse_target)]
    x, xn, e, e_ref, vjp, vjp_ref, flt, fln, flow, flow_n, e_old, target = (
        t.to(compute) if t is not None else None for t in states
    )
    nd = x.dim()
    dims = tuple(range(1, nd))
    a_, b_, sigma_ = (_per_sample(c, nd, compute) for c in (a, b, sigma))
    term_ = _per_sample(terminal, nd, compute) != 0
    d_f, d_r = _residuals(x, xn, e, e_ref, vjp, vjp_ref, flt, fln, flow, flow_n, target, a_, b_, 1.0 / sigma_**2,
                          term_, prior_strength)
    loss_f = d_f.square().mean(dim=dims)
    loss_r = d_r.square().mean(dim=dims)
    loss_t = torch.where(terminal.to(compute) != 0, flow_n.square().mean(dim=dims), 0.0)
    loss_reg = (e - e_old).square().mean(dim=dims) if e_old is not None else torch.zeros_like(loss_f)
    w_f, w_b = w_forward.to(compute), w_reverse.to(compute)
    total = w_f * loss_f + w_b * loss_r + loss_t + output_reg * loss_reg
    return torch.stack([loss_f, loss_r, loss_t, loss_reg, total])


def nabla_db_loss_backward_reference(
    grad_terms: Tensor,
    x_t: Tensor,
    x_next: Tensor,
    eps_theta: Tensor,
    eps_ref: Tensor,
    vjp_theta: Tensor | None,
    vjp_ref: Tensor | None,
    fl_t: Tensor,
    fl_next: Tensor,
    flow_t: Tensor,
    flow_next: Tensor,
    eps_old: Tensor | None,
    reverse_target: Tensor | None,
    a: Tensor,
    b: Tensor,
    sigma: Tensor,
    terminal: Tensor,
    w_forward: Tensor,
    w_reverse: Tensor,
    prior_strength: float = 1.0,
    output_reg: float = 0.0,
    detach_reverse: bool = True,
    forward_trains_flow: bool = True,
    needs: tuple[bool, ...] = (False, False, True, False, False, False, False, False, True, True, False),
) -> list[Tensor]:
    """Closed-form backward (module docstring): from the ``[5, B]`` upstream gradient of the terms, the
    gradients of the :data:`GRAD_INPUTS` flagged in ``needs`` (in that order, in ``x_t.dtype``), recomputed
    from the inputs. Flags of gradients that do not exist under the options (e.g. ``vjp_theta`` with
    ``detach_reverse=True``) must be False."""
    compute = torch.promote_types(x_t.dtype, torch.float32)
    states = [_as_2d(t) for t in (x_t, x_next, eps_theta, eps_ref, vjp_theta, vjp_ref, fl_t, fl_next, flow_t,
                                  flow_next, eps_old, reverse_target)]
    x, xn, e, e_ref, vjp, vjp_ref, flt, fln, flow, flow_n, e_old, target = (
        t.to(compute) if t is not None else None for t in states
    )
    nd = x.dim()
    n = x[0].numel()
    a_, b_, sigma_, term_f, w_f, w_b = (_per_sample(c, nd, compute) for c in (a, b, sigma, terminal, w_forward,
                                                                               w_reverse))
    term_ = term_f != 0
    inv_var = 1.0 / sigma_**2
    g_f, g_r, g_t, g_reg, g_tot = (_per_sample(g, nd, compute) for g in grad_terms.to(compute).unbind(0))
    eta = prior_strength
    second = target is None and not detach_reverse
    need = dict(zip(GRAD_INPUTS, needs, strict=True))
    need_f = any(need[k] for k in ("x_t", "x_next", "eps_theta", "eps_ref", "fl_next")) or (
        need["flow_next"] and forward_trains_flow
    )
    need_r = need["fl_t"] or need["flow_t"] or (second and any(need[k] for k in GRAD_INPUTS[:6]))
    d_f, d_r = _residuals(x, xn, e, e_ref, vjp, vjp_ref, flt, fln, flow, flow_n, target, a_, b_, inv_var, term_, eta,
                          need_f, need_r)
    scale = 2.0 / n
    u_f = (g_f + w_f * g_tot) * scale * d_f if need_f else None
    u_r = (g_r + w_b * g_tot) * scale * d_r if need_r else None
    out: list[Tensor] = []
    if need["x_t"]:
        grad = inv_var * a_ * (1 - eta) * u_f
        out.append(grad - inv_var * a_ * a_ * (1 - eta) * u_r if second else grad)
    if need["x_next"]:
        grad = inv_var * (eta - 1) * u_f
        out.append(grad + inv_var * a_ * (1 - eta) * u_r if second else grad)
    if need["eps_theta"]:
        grad = inv_var * b_ * u_f
        if second:
            grad = grad - inv_var * a_ * b_ * u_r
        if e_old is not None:
            grad = grad + (g_reg + output_reg * g_tot) * scale * (e - e_old)
        out.append(grad)
    if need["eps_ref"]:
        grad = -eta * inv_var * b_ * u_f
        out.append(grad + eta * inv_var * a_ * b_ * u_r if second else grad)
    if need["vjp_theta"]:
        out.append(inv_var * b_ * u_r)
    if need["vjp_ref"]:
        out.append(-eta * inv_var * b_ * u_r)
    if need["fl_t"]:
        out.append(u_r)
    if need["fl_next"]:
        out.append(-u_f)
    if need["flow_t"]:
        out.append(u_r)
    if need["flow_next"]:
        grad = torch.where(term_, (g_t + g_tot) * scale * flow_n, 0.0)
        out.append(grad - torch.where(term_, 0.0, u_f) if forward_trains_flow else grad)
    if need["eps_old"]:
        out.append(-(g_reg + output_reg * g_tot) * scale * (e - e_old))
    return [g.reshape(x_t.shape).to(x_t.dtype) for g in out]


# ---------------------------------------------------------------- implementations and registration


def _forward_impl(*args) -> Tensor:
    """The ``[5, B]`` terms on the selected backend (args: the custom op's, without the two routing flags)."""
    x_t = args[0]
    if select_backend(x_t.device) == "triton" and x_t.numel():
        from fastnabla.kernels.nabla_db_loss import nabla_db_loss_forward

        return nabla_db_loss_forward(*args)
    fn = nabla_db_loss_reference
    if use_compiled(x_t.device, x_t.numel(), COMPILE_MIN_NUMEL):
        fn = compiled(nabla_db_loss_reference)
    with torch.no_grad():
        return fn(*args)


def _backward_impl(*args) -> list[Tensor]:
    """The requested input gradients on the selected backend (args: the backward custom op's)."""
    x_t = args[1]
    if select_backend(x_t.device) == "triton" and x_t.numel():
        from fastnabla.kernels.nabla_db_loss import nabla_db_loss_backward

        return nabla_db_loss_backward(*args)
    fmt = kernel_memory_format(x_t)
    fn = nabla_db_loss_backward_reference
    if use_compiled(x_t.device, x_t.numel(), COMPILE_MIN_NUMEL):
        fn = compiled(nabla_db_loss_backward_reference)
    with torch.no_grad():
        grads = [g.contiguous(memory_format=fmt) for g in fn(*args)]
    ptrs = [g.data_ptr() for g in grads]  # d fl_t and d g(x_t) are equal; returned tensors must not alias
    return [g.clone() if ptrs[i] in ptrs[:i] else g for i, g in enumerate(grads)]


@torch.library.custom_op("fastnabla::residual_nabla_db_loss", mutates_args=())
def _loss_op(
    x_t: Tensor, x_next: Tensor, eps_theta: Tensor, eps_ref: Tensor, vjp_theta: Tensor | None,
    vjp_ref: Tensor | None, fl_t: Tensor, fl_next: Tensor, flow_t: Tensor, flow_next: Tensor,
    eps_old: Tensor | None, reverse_target: Tensor | None,
    a: Tensor, b: Tensor, sigma: Tensor, terminal: Tensor, w_forward: Tensor, w_reverse: Tensor,
    prior_strength: float, output_reg: float, detach_reverse: bool, forward_trains_flow: bool,
) -> Tensor:
    return _forward_impl(x_t, x_next, eps_theta, eps_ref, vjp_theta, vjp_ref, fl_t, fl_next, flow_t, flow_next,
                         eps_old, reverse_target, a, b, sigma, terminal, w_forward, w_reverse, prior_strength,
                         output_reg)


@_loss_op.register_fake
def _(x_t, *rest):
    return x_t.new_empty((5, x_t.shape[0]), dtype=torch.promote_types(x_t.dtype, torch.float32))


@torch.library.custom_op("fastnabla::residual_nabla_db_loss_backward", mutates_args=())
def _loss_backward_op(
    grad_terms: Tensor,
    x_t: Tensor, x_next: Tensor, eps_theta: Tensor, eps_ref: Tensor, vjp_theta: Tensor | None,
    vjp_ref: Tensor | None, fl_t: Tensor, fl_next: Tensor, flow_t: Tensor, flow_next: Tensor,
    eps_old: Tensor | None, reverse_target: Tensor | None,
    a: Tensor, b: Tensor, sigma: Tensor, terminal: Tensor, w_forward: Tensor, w_reverse: Tensor,
    prior_strength: float, output_reg: float, detach_reverse: bool, forward_trains_flow: bool,
    needs: list[bool],
) -> list[Tensor]:
    return _backward_impl(grad_terms, x_t, x_next, eps_theta, eps_ref, vjp_theta, vjp_ref, fl_t, fl_next, flow_t,
                          flow_next, eps_old, reverse_target, a, b, sigma, terminal, w_forward, w_reverse,
                          prior_strength, output_reg, detach_reverse, forward_trains_flow, tuple(needs))


@_loss_backward_op.register_fake
def _(grad_terms, x_t, *rest):
    fmt = kernel_memory_format(x_t)
    return [torch.empty_like(x_t, memory_format=fmt) for need in rest[-1] if need]


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:18])  # the inputs themselves: no intermediate is saved
    ctx.options = tuple(inputs[18:])  # prior_strength, output_reg, detach_reverse, forward_trains_flow


def _input_grads(ctx, grad_terms: Tensor, backward) -> tuple:
    """Gradients of the op's 22 inputs: ``backward`` (the custom op, or its implementation) computes the
    ones autograd asks for and the oracle routes (vjp_* only in the second-order routing, eps_old only with
    the regulariser); ``reverse_target`` is detached; coefficients and options are constants."""
    inputs = ctx.saved_tensors
    second = inputs[11] is None and not ctx.options[2]
    exists = (True,) * 4 + (second, second) + (True,) * 4 + (inputs[10] is not None,)
    needs = [bool(ctx.needs_input_grad[i]) and exists[i] for i in range(len(GRAD_INPUTS))]
    grads = [None] * len(GRAD_INPUTS)
    if any(needs):
        out = iter(backward(grad_terms, *inputs, *ctx.options, needs))
        grads = [next(out) if need else None for need in needs]
    return (*grads,) + (None,) * 11


_loss_op.register_autograd(
    lambda ctx, grad: _input_grads(ctx, grad, torch.ops.fastnabla.residual_nabla_db_loss_backward),
    setup_context=_setup_context,
)


class _EagerLoss(torch.autograd.Function):
    """The eager-mode twin of the registered autograd formula, over the same implementations (the Triton
    kernels, or the closed forms compiled by inductor on CPU): same saved inputs, same backward, minus the
    custom-op dispatch (~0.2 ms of Python per fwd+bwd measured at 22 arguments). The forward and the backward
    are separate (inference) graphs, so nothing but the inputs is saved and ``retain_graph=True`` works;
    under ``torch.compile`` the public entry calls the custom op instead."""

    @staticmethod
    def forward(ctx, *args):  # the ctx-first form: apply() then skips a per-call inspect.signature bind
        terms = _forward_impl(*args[:20])
        _setup_context(ctx, args, terms)
        return terms

    @staticmethod
    def backward(ctx, grad_terms):
        return _input_grads(ctx, grad_terms, lambda *a: _backward_impl(*a[:-1], tuple(a[-1])))


# ---------------------------------------------------------------- public entry point


def _oracle(states, coeffs, terminal, weights, eps_old, lam, eta, detach_reverse, forward_trains_flow) -> NablaDBTerms:
    """The reference path: the oracle itself (plain autograd, inlined under ``torch.compile``) on fp32 copies
    of low-precision states, so the terms are fp32 on every path."""
    up = {k: (t.float() if t is not None and t.dtype != torch.float32 else t) for k, t in states.items()}
    up["eps_old"] = up["eps_old"] if eps_old is not None else None
    nd = states["x_t"].dim()
    a, b, sigma = (c.reshape((-1,) + (1,) * (nd - 1)) for c in coeffs)
    return residual_nabla_db_loss(
        **up, a=a, b=b, sigma=sigma, terminal=terminal, w_forward=weights[0], w_reverse=weights[1],
        output_reg=lam, prior_strength=eta, detach_reverse=detach_reverse, forward_trains_flow=forward_trains_flow,
    )


def _weight(name: str, w: Tensor | float, ref: Tensor) -> Tensor:
    batch = ref.shape[0]
    if isinstance(w, Tensor) and w.dim() == 0:
        w = w.reshape(1).expand(batch)
    elif not isinstance(w, Tensor):
        if isinstance(w, bool) or not isinstance(w, numbers.Real):
            raise TypeError(f"{name} must be a Python number or a tensor of shape [{batch}], got {type(w).__name__}")
        return torch.full((batch,), float(w), dtype=torch.float32, device=ref.device)
    return per_sample_vector(name, w, ref, "a constant weight")


def residual_nabla_db_loss_fused(
    *,
    x_t: Tensor,
    x_next: Tensor,
    eps_theta: Tensor,
    eps_ref: Tensor,
    vjp_theta: Tensor | None,
    vjp_ref: Tensor | None,
    fl_t: Tensor,
    fl_next: Tensor,
    flow_t: Tensor,
    flow_next: Tensor,
    a: Tensor,
    b: Tensor,
    sigma: Tensor,
    terminal: Tensor,
    w_forward: Tensor | float = 1.0,
    w_reverse: Tensor | float = 1.0,
    eps_old: Tensor | None = None,
    output_reg: float = 0.0,
    prior_strength: float = 1.0,
    detach_reverse: bool = True,
    forward_trains_flow: bool = True,
    reverse_target: Tensor | None = None,
) -> NablaDBTerms:
    """Fused :func:`fastnabla.losses.nabla_db.residual_nabla_db_loss`: same arguments and meaning, per-sample
    terms in fp32 (maths and gradient routing in the module docstring).

    Differences from the oracle: the state tensors share one dtype among fp32/bf16/fp16 (arithmetic is
    fp32 either way); ``a``, ``b``, ``sigma`` are ``[B]`` or ``[B, 1, ..., 1]``; ``w_forward``/``w_reverse`` are
    Python numbers, 0-d or ``[B]`` tensors; coefficients and weights must not require grad;
    ``vjp_theta``/``vjp_ref`` may be ``None`` when ``reverse_target`` is given (they are unused then).
    ``sigma > 0`` is not checked (that would synchronise the device).

    Raises:
        TypeError / ValueError: naming the argument: a non-tensor, a mismatched dtype, shape or device, a
            non-bool or mis-shaped ``terminal``, a coefficient or weight of the wrong shape or that requires
            grad, a missing ``vjp_theta``/``vjp_ref`` without ``reverse_target``.
    """
    states = {
        "x_t": x_t, "x_next": x_next, "eps_theta": eps_theta, "eps_ref": eps_ref, "vjp_theta": vjp_theta,
        "vjp_ref": vjp_ref, "fl_t": fl_t, "fl_next": fl_next, "flow_t": flow_t, "flow_next": flow_next,
        "eps_old": eps_old, "reverse_target": reverse_target,
    }
    for name in ("x_next", "eps_theta", "eps_ref", "fl_t", "fl_next", "flow_t", "flow_next"):
        if states[name] is None:
            raise TypeError(f"{name} must be a torch.Tensor, got None")
    if reverse_target is None and (vjp_theta is None or vjp_ref is None):
        raise ValueError("vjp_theta and vjp_ref are needed unless reverse_target is given")
    ref = check_states(states)
    batch = ref.shape[0]
    if not isinstance(terminal, Tensor) or terminal.dtype != torch.bool or terminal.shape != (batch,):
        raise ValueError(f"terminal must be a bool tensor of shape [{batch}]")
    if terminal.device != ref.device:
        raise ValueError(f"terminal is on {terminal.device} but the states are on {ref.device}")
    coeffs = [per_sample_vector(n, c, ref) for n, c in (("a", a), ("b", b), ("sigma", sigma))]
    weights = [_weight("w_forward", w_forward, ref), _weight("w_reverse", w_reverse, ref)]
    lam = python_float("output_reg", output_reg)
    eta = python_float("prior_strength", prior_strength)
    if not (lam and eps_old is not None):  # the oracle's rule: the regulariser is off
        lam, eps_old = 0.0, None
    if reverse_target is not None:
        vjp_theta = vjp_ref = None
    if select_backend(ref.device) == "reference" and not use_compiled(ref.device, ref.numel(), COMPILE_MIN_NUMEL):
        return _oracle(states, coeffs, terminal, weights, eps_old, lam, eta, detach_reverse, forward_trains_flow)
    args = (x_t, x_next, eps_theta, eps_ref, vjp_theta, vjp_ref, fl_t, fl_next, flow_t, flow_next, eps_old,
            reverse_target, *coeffs, terminal.to(torch.float32), *weights, eta, lam, bool(detach_reverse),
            bool(forward_trains_flow))
    if torch.compiler.is_compiling():
        terms = torch.ops.fastnabla.residual_nabla_db_loss(*args)
    elif torch.is_grad_enabled():
        terms = _EagerLoss.apply(*args)
    else:  # no autograd: the implementation itself, without the custom-op dispatch
        terms = _forward_impl(*args[:20])
    return NablaDBTerms(*terms.unbind(0))
