"""The fused residual nabla-DB loss's entry point and ``torch.library`` registration.

Maths, gradient routing and the closed-form backward in :mod:`fastnabla.ops.nabla_db_loss.reference`.
Paths (:mod:`fastnabla.ops.dispatch`):

* Triton -- ``kernels/nabla_db_loss.py``: a deterministic two-launch reduction forward, one elementwise
  backward that recomputes the residuals from the inputs;
* compiled -- CPU tensors of at least :data:`COMPILE_MIN_NUMEL` elements (or ``FASTNABLA_COMPILE=on``): the
  closed forms compiled by inductor;
* reference -- smaller tensors (or ``FASTNABLA_COMPILE=off``): the reference itself, inline, with plain
  autograd on fp32 copies of low-precision states (measured faster below the threshold; the analytic
  task's ``[300, 2]`` batches stay on it and never compile).

Both fused paths save nothing for backward but the inputs and ``[B]`` vectors.
"""

from __future__ import annotations

import numbers

import torch

from fastnabla.ops.checks import check_states, per_sample_vector, python_float
from fastnabla.ops.dispatch import Autograd, FusedOp, Pass, kernel_memory_format
from fastnabla.ops.nabla_db_loss.reference import (
    NablaDBTerms,
    nabla_db_loss_backward_reference,
    nabla_db_loss_reference,
    residual_nabla_db_loss,
)

Tensor = torch.Tensor
# FASTNABLA_COMPILE=auto compiles CPU calls from this many elements per state tensor. Measured (docs/ops.md,
# one thread, fwd+bwd, compiled closed forms / eager reference): 1.11 at 600 elements, 1.08 at 8192, 0.75 at
# 32768, 0.39 at 131072, 0.15 at 524288.
COMPILE_MIN_NUMEL = 1 << 15

__all__ = ["COMPILE_MIN_NUMEL", "NABLA_DB_LOSS", "residual_nabla_db_loss_fused"]


def _routed(inputs: tuple) -> tuple[bool, ...]:
    """The gradients the reference routes: ``vjp_*`` only in the second-order routing (``detach_reverse=False``,
    no ``reverse_target``), ``eps_old`` only with the regulariser; ``reverse_target`` is detached."""
    second = inputs[11] is None and not inputs[20]
    return (True,) * 4 + (second, second) + (True,) * 4 + (inputs[10] is not None,)


NABLA_DB_LOSS = FusedOp(
    "residual_nabla_db_loss",
    kernels="nabla_db_loss",
    # op args: 12 states, a, b, sigma, terminal, w_forward, w_reverse, eta, lambda, detach_reverse,
    # forward_trains_flow (the last two only route gradients)
    forward=Pass(nabla_db_loss_reference, "nabla_db_loss_forward", args=lambda a: a[:20]),
    backward=Pass(nabla_db_loss_backward_reference, "nabla_db_loss_backward", layout=lambda a: a[1]),
    autograd=Autograd(
        grad_inputs=tuple(range(11)),  # the states of GRAD_INPUTS
        save=lambda i: (i[:18], i[18:22]),  # the inputs themselves: no intermediate is saved
        routed=_routed,
        needs_arg="list",
    ),
    min_numel=COMPILE_MIN_NUMEL,
)


@torch.library.custom_op("fastnabla::residual_nabla_db_loss", mutates_args=())
def _loss_op(
    x_t: Tensor, x_next: Tensor, eps_theta: Tensor, eps_pretrained: Tensor, vjp_theta: Tensor | None,
    vjp_pretrained: Tensor | None, fl_t: Tensor, fl_next: Tensor, flow_t: Tensor, flow_next: Tensor,
    eps_old: Tensor | None, reverse_target: Tensor | None,
    a: Tensor, b: Tensor, sigma: Tensor, terminal: Tensor, w_forward: Tensor, w_reverse: Tensor,
    prior_strength: float, output_reg: float, detach_reverse: bool, forward_trains_flow: bool, path: str = "auto",
) -> Tensor:
    return NABLA_DB_LOSS.forward(
        path, x_t, x_next, eps_theta, eps_pretrained, vjp_theta, vjp_pretrained, fl_t, fl_next, flow_t, flow_next,
        eps_old,
        reverse_target, a, b, sigma, terminal, w_forward, w_reverse, prior_strength, output_reg, detach_reverse,
        forward_trains_flow,
    )


@_loss_op.register_fake
def _(x_t, *rest):
    return x_t.new_empty((5, x_t.shape[0]), dtype=torch.promote_types(x_t.dtype, torch.float32))


@torch.library.custom_op("fastnabla::residual_nabla_db_loss_backward", mutates_args=())
def _loss_backward_op(
    grad_terms: Tensor,
    x_t: Tensor, x_next: Tensor, eps_theta: Tensor, eps_pretrained: Tensor, vjp_theta: Tensor | None,
    vjp_pretrained: Tensor | None, fl_t: Tensor, fl_next: Tensor, flow_t: Tensor, flow_next: Tensor,
    eps_old: Tensor | None, reverse_target: Tensor | None,
    a: Tensor, b: Tensor, sigma: Tensor, terminal: Tensor, w_forward: Tensor, w_reverse: Tensor,
    prior_strength: float, output_reg: float, detach_reverse: bool, forward_trains_flow: bool,
    needs: list[bool], path: str = "auto",
) -> list[Tensor]:
    return NABLA_DB_LOSS.backward(
        path, grad_terms, x_t, x_next, eps_theta, eps_pretrained, vjp_theta, vjp_pretrained, fl_t, fl_next, flow_t,
        flow_next,
        eps_old, reverse_target, a, b, sigma, terminal, w_forward, w_reverse, prior_strength, output_reg,
        detach_reverse, forward_trains_flow, needs,
    )


@_loss_backward_op.register_fake
def _(grad_terms, x_t, x_next, eps_theta, eps_pretrained, vjp_theta, vjp_pretrained, fl_t, fl_next, flow_t, flow_next,
      eps_old,
      reverse_target, a, b, sigma, terminal, w_forward, w_reverse, prior_strength, output_reg, detach_reverse,
      forward_trains_flow, needs, path="auto"):
    fmt = kernel_memory_format(x_t)
    return [torch.empty_like(x_t, memory_format=fmt) for need in needs if need]


NABLA_DB_LOSS.register(_loss_op)


def _reference_path(states, coeffs, terminal, weights, eps_old, lam, eta, detach_reverse,
                    forward_trains_flow) -> NablaDBTerms:
    """The reference path: the reference itself (plain autograd, inlined under ``torch.compile``) on fp32 copies
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
    eps_pretrained: Tensor,
    vjp_theta: Tensor | None,
    vjp_pretrained: Tensor | None,
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
    """Fused :func:`~fastnabla.ops.nabla_db_loss.reference.residual_nabla_db_loss` (paper eqs. 16-19 + the
    output regulariser): same arguments and meaning, per-sample terms in fp32 (maths and gradient routing in
    :mod:`fastnabla.ops.nabla_db_loss.reference`).

    Differences from the reference: the state tensors share one dtype among fp32/bf16/fp16 (arithmetic is
    fp32 either way); ``a``, ``b``, ``sigma`` are ``[B]`` or ``[B, 1, ..., 1]``; ``w_forward``/``w_reverse`` are
    Python numbers, 0-d or ``[B]`` tensors; coefficients and weights must not require grad;
    ``vjp_theta``/``vjp_pretrained`` may be ``None`` when ``reverse_target`` is given (they are unused then).
    ``sigma > 0`` is not checked (that would synchronise the device).

    Raises:
        TypeError / ValueError: naming the argument: a non-tensor, a mismatched dtype, shape or device, a
            non-bool or mis-shaped ``terminal``, a coefficient or weight of the wrong shape or that requires
            grad, a missing ``vjp_theta``/``vjp_pretrained`` without ``reverse_target``.
    """
    states = {
        "x_t": x_t, "x_next": x_next, "eps_theta": eps_theta, "eps_pretrained": eps_pretrained, "vjp_theta": vjp_theta,
        "vjp_pretrained": vjp_pretrained, "fl_t": fl_t, "fl_next": fl_next, "flow_t": flow_t, "flow_next": flow_next,
        "eps_old": eps_old, "reverse_target": reverse_target,
    }
    for name in ("x_next", "eps_theta", "eps_pretrained", "fl_t", "fl_next", "flow_t", "flow_next"):
        if states[name] is None:
            raise TypeError(f"{name} must be a torch.Tensor, got None")
    if reverse_target is None and (vjp_theta is None or vjp_pretrained is None):
        raise ValueError("vjp_theta and vjp_pretrained are needed unless reverse_target is given")
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
    if not (lam and eps_old is not None):  # the reference's rule: the regulariser is off
        lam, eps_old = 0.0, None
    if reverse_target is not None:
        vjp_theta = vjp_pretrained = None
    terms = NABLA_DB_LOSS(
        x_t, x_next, eps_theta, eps_pretrained, vjp_theta, vjp_pretrained, fl_t, fl_next, flow_t, flow_next, eps_old,
        reverse_target, *coeffs, terminal.to(torch.float32), *weights, eta, lam, bool(detach_reverse),
        bool(forward_trains_flow),
        reference=lambda: _reference_path(states, coeffs, terminal, weights, eps_old, lam, eta, detach_reverse,
                                  forward_trains_flow),
    )
    return terms if isinstance(terms, NablaDBTerms) else NablaDBTerms(*terms.unbind(0))
