"""Fused transition scores: residual forward score, the VJP-free part of the residual reverse score,
the two reverse-score cotangents and the Tweedie prediction, from one pass over one transition.

For ``x_t -> x_{t+1}`` with per-*sample* coefficients (a batch may mix timesteps; DESIGN.md section 1)
``mu = a x_t + b eps_theta``, ``mu# = a x_t + b eps_ref``, ``r = x_{t+1} - mu``, ``r# = x_{t+1} - mu#``
and ``eta_p`` the prior strength::

    score_fwd = s~->  = (-r + eta_p r#) / sigma^2                         (paper eq. 11, residual forward score)
    rev_local         = (a r - eta_p a r#) / sigma^2                      (the part of s~<- without Jacobians)
    cot_theta         = b r / sigma^2          [+ fl_cot if fl_into="theta"]
    cot_ref           = eta_p b r# / sigma^2   [- fl_cot if fl_into="ref"]
    x_hat             = (x_t - sqrt(1 - abar) eps_theta) / sqrt(abar)     (Tweedie, paper eq. 2)

so that the residual reverse score (paper eq. 13) is one VJP through each network::

    s~<- = rev_local + J_theta(x_t)^T cot_theta - J_ref(x_t)^T cot_ref

**Folding the forward-looking term into the same VJP.** The FL gradient at ``x_t`` (paper eq. 15, "full"
Jacobian) is ``fl_local + J_net(x_t)^T v`` with ``v = -beta gamma_t sqrt(1-abar)/sqrt(abar) grad_{x_hat} log R``
and ``net`` the network that predicts ``x_hat`` (the policy or the pretrained model). Since
``J^T u + J^T v = J^T (u + v)``, passing ``fl_cot = v`` makes the VJPs return ``s~<- + J_net^T v`` directly:
the cotangent of the chosen network absorbs ``v`` (``cot_theta + v``, or ``cot_ref - v`` because the
reference VJP is subtracted), which saves one network backward per transition. The caller then adds
only ``fl_local`` (the Jacobian-free part) to obtain ``s~<- + fl_t``.

Every output is affine in ``(x_t, x_{t+1}, eps_theta, eps_ref, fl_cot)``, so the backward is closed-form
and elementwise (``g_*`` are the upstream gradients of the outputs, ``k = 1/sigma^2``)::

    G_r  = k (-g_fwd + a g_rev + b g_cot_theta),   G_r# = eta_p k (g_fwd - a g_rev + b g_cot_ref)
    d x_{t+1} = G_r + G_r#,  d x_t = -a (G_r + G_r#) + g_hat / sqrt(abar)
    d eps_theta = -b G_r - sqrt(1-abar)/sqrt(abar) g_hat,  d eps_ref = -b G_r#
    d fl_cot = g_cot_theta (fl_into="theta") or -g_cot_ref (fl_into="ref")

and needs only the four ``[B]`` coefficients: nothing else is saved for backward. Coefficients are
schedule constants (no gradient); ``sigma > 0`` and ``abar`` in ``(0, 1]`` are not checked (a check would
synchronise the device).

Layers (the :mod:`fastnabla.ops.denoise_step` pattern):

* :func:`transition_scores_reference` / :func:`transition_scores_backward_reference` -- pure torch, the
  oracle of tests and benchmarks and the CPU path;
* ``torch.ops.fastnabla.transition_scores`` (+ ``transition_scores_backward``) -- ``torch.library`` custom
  ops with fake and autograd registrations, so ``torch.compile(fullgraph=True)`` traces through them;
  their implementation is the Triton kernels (:mod:`fastnabla.kernels.transition_scores`) or the closed
  forms above;
* :func:`transition_scores_fused` -- the public entry: input checks, then by
  :func:`fastnabla.ops.dispatch.select_backend`: Triton -> the custom op (in eager mode through an
  equivalent ``autograd.Function`` that skips the custom-op dispatch overhead); reference, CPU tensors of
  at least :data:`COMPILE_MIN_NUMEL` elements (or ``FASTNABLA_COMPILE=on``) -> the same Function over the
  closed forms compiled by inductor (``dynamic=True``: one graph per pass for every batch size > 1, a second
  for B = 1; separate inference graphs, so ``retain_graph=True`` works); reference, smaller tensors (or
  ``FASTNABLA_COMPILE=off``) -> the reference inline with plain autograd (the op is linear, so autograd
  keeps only the ``[B]`` coefficients); under an outer ``torch.compile`` -> the custom op.
"""

from __future__ import annotations

import functools
import numbers
from typing import NamedTuple

import torch

from fastnabla.mdp.gaussian_policy import step_mean, tweedie_x0
from fastnabla.ops.dispatch import compiled, kernel_memory_format, select_backend, use_compiled

Tensor = torch.Tensor
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OUTPUTS = ("score_fwd", "rev_local", "cot_theta", "cot_ref", "x_hat")
FL_TARGETS = ("theta", "ref")
# FASTNABLA_COMPILE=auto compiles CPU calls from this many elements per tensor. Measured (docs/ops.md, one
# thread, fwd+bwd): compiled/eager = 1.11 at 600 elements, 0.97 at 8192, 0.76 at 32768, 0.50 at 131072.
COMPILE_MIN_NUMEL = 1 << 15

__all__ = [
    "FL_TARGETS",
    "OUTPUTS",
    "TransitionScores",
    "transition_scores_backward_reference",
    "transition_scores_fused",
    "transition_scores_reference",
]


class TransitionScores(NamedTuple):
    """Outputs of :func:`transition_scores_fused` (``None`` where not requested), all ``[B, ...]``."""

    score_fwd: Tensor | None
    rev_local: Tensor | None
    cot_theta: Tensor | None
    cot_ref: Tensor | None
    x_hat: Tensor | None


def _per_sample(c: Tensor, ndim: int, dtype: torch.dtype) -> Tensor:
    return c.to(dtype).reshape((-1,) + (1,) * (ndim - 1))


def transition_scores_reference(
    x_t: Tensor,
    x_next: Tensor,
    eps_theta: Tensor,
    eps_ref: Tensor,
    a: Tensor,
    b: Tensor,
    sigma: Tensor,
    alpha_bar: Tensor,
    prior_strength: float = 1.0,
    fl_cot: Tensor | None = None,
    fl_into: str = "theta",
    outputs: tuple[str, ...] = OUTPUTS,
) -> list[Tensor]:
    """Pure-torch outputs named in ``outputs`` (in :data:`OUTPUTS` order; maths in the module docstring).

    Built from :func:`fastnabla.mdp.gaussian_policy.step_mean` and ``tweedie_x0``; computes in
    ``promote(x_t.dtype, float32)`` (so it is also the float64 oracle) and returns ``x_t.dtype``. No input
    checks and no sigma check (it stays traceable by ``torch.compile``); gradients flow to every input.
    """
    compute = torch.promote_types(x_t.dtype, torch.float32)
    nd = x_t.dim()
    a_, b_, sigma_, abar_ = (_per_sample(c, nd, compute) for c in (a, b, sigma, alpha_bar))
    x, xn, e, e_ref = (t.to(compute) for t in (x_t, x_next, eps_theta, eps_ref))
    inv_var = 1.0 / sigma_**2
    r = xn - step_mean(x, e, a_, b_)
    r_ref = xn - step_mean(x, e_ref, a_, b_)
    fl = fl_cot.to(compute) if fl_cot is not None else None
    out: list[Tensor] = []
    if "score_fwd" in outputs:
        out.append((prior_strength * r_ref - r) * inv_var)
    if "rev_local" in outputs:
        out.append(a_ * (r - prior_strength * r_ref) * inv_var)
    if "cot_theta" in outputs:
        cot = b_ * r * inv_var
        out.append(cot + fl if fl is not None and fl_into == "theta" else cot)
    if "cot_ref" in outputs:
        cot = prior_strength * b_ * r_ref * inv_var
        out.append(cot - fl if fl is not None and fl_into == "ref" else cot)
    if "x_hat" in outputs:
        out.append(tweedie_x0(x, e, abar_))
    return [t.to(x_t.dtype) for t in out]


def transition_scores_backward_reference(
    grads: list[Tensor | None],
    a: Tensor,
    b: Tensor,
    sigma: Tensor,
    alpha_bar: Tensor,
    prior_strength: float = 1.0,
    fl_into: str = "theta",
    needs: tuple[bool, bool, bool, bool, bool] = (True, True, True, True, False),
) -> list[Tensor]:
    """Closed-form VJP (maths in the module docstring): ``grads`` holds the upstream gradients of the five
    :data:`OUTPUTS` in order (``None`` = zero; at least one given); returns the gradients of
    ``(x_t, x_next, eps_theta, eps_ref, fl_cot)`` selected by ``needs``, in that order, in the upstream
    dtype, computed in ``promote(dtype, float32)``."""
    first = next(g for g in grads if g is not None)
    compute = torch.promote_types(first.dtype, torch.float32)
    nd = first.dim()
    a_, b_, sigma_, abar_ = (_per_sample(c, nd, compute) for c in (a, b, sigma, alpha_bar))
    inv_var = 1.0 / sigma_**2
    g_fwd, g_rev, g_ct, g_cr, g_hat = (g.to(compute) if g is not None else None for g in grads)
    eta = prior_strength

    def total(*terms: Tensor | None) -> Tensor:
        present = [t for t in terms if t is not None]
        return functools.reduce(torch.add, present) if present else torch.zeros_like(first, dtype=compute)

    g_r = total(
        -g_fwd if g_fwd is not None else None,
        a_ * g_rev if g_rev is not None else None,
        b_ * g_ct if g_ct is not None else None,
    ) * inv_var
    g_r_ref = total(
        g_fwd,
        -a_ * g_rev if g_rev is not None else None,
        b_ * g_cr if g_cr is not None else None,
    ) * (eta * inv_var)
    need_x, need_next, need_eps, need_ref, need_fl = needs
    out: list[Tensor] = []
    if need_x:
        dx = -a_ * (g_r + g_r_ref)
        out.append(dx + g_hat / abar_.sqrt() if g_hat is not None else dx)
    if need_next:
        out.append(g_r + g_r_ref)
    if need_eps:
        de = -b_ * g_r
        out.append(de - ((1 - abar_).sqrt() / abar_.sqrt()) * g_hat if g_hat is not None else de)
    if need_ref:
        out.append(-b_ * g_r_ref)
    if need_fl:
        g = g_ct if fl_into == "theta" else (-g_cr if g_cr is not None else None)
        out.append(g if g is not None else torch.zeros_like(first, dtype=compute))
    return [t.to(first.dtype) for t in out]


# ---------------------------------------------------------------- torch.library registration


def _wanted(flags: tuple[bool, ...]) -> tuple[str, ...]:
    return tuple(name for name, want in zip(OUTPUTS, flags, strict=True) if want)


def _forward_impl(x_t, x_next, eps_theta, eps_ref, a, b, sigma, alpha_bar, prior_strength, fl_cot, fl_into_ref,
                  *flags) -> list[Tensor]:
    fl_into = "ref" if fl_into_ref else "theta"
    if select_backend(x_t.device) == "triton":
        from fastnabla.kernels.transition_scores import transition_scores_forward

        return transition_scores_forward(
            x_t, x_next, eps_theta, eps_ref, a, b, sigma, alpha_bar, prior_strength, fl_cot, fl_into, flags
        )
    fmt = kernel_memory_format(x_t)
    fn = transition_scores_reference
    if use_compiled(x_t.device, x_t.numel(), COMPILE_MIN_NUMEL):
        fn = compiled(transition_scores_reference)
    with torch.no_grad():
        outs = fn(x_t, x_next, eps_theta, eps_ref, a, b, sigma, alpha_bar, prior_strength, fl_cot, fl_into,
                  _wanted(flags))
    return [t.contiguous(memory_format=fmt) for t in outs]


def _backward_impl(grads, a, b, sigma, alpha_bar, prior_strength, fl_into_ref, needs) -> list[Tensor]:
    fl_into = "ref" if fl_into_ref else "theta"
    first = next(g for g in grads if g is not None)
    if select_backend(first.device) == "triton":
        from fastnabla.kernels.transition_scores import transition_scores_backward

        return transition_scores_backward(grads, a, b, sigma, alpha_bar, prior_strength, fl_into, needs)
    fmt = kernel_memory_format(first)
    fn = transition_scores_backward_reference
    if use_compiled(first.device, first.numel(), COMPILE_MIN_NUMEL):
        fn = compiled(transition_scores_backward_reference)
    with torch.no_grad():
        outs = [t.contiguous(memory_format=fmt) for t in fn(grads, a, b, sigma, alpha_bar, prior_strength, fl_into,
                                                            needs)]
    taken = {g.data_ptr() for g in grads if g is not None}  # d fl_cot is an upstream gradient itself: copy it
    unaliased = []
    for t in outs:
        unaliased.append(t.clone() if t.data_ptr() in taken else t)
        taken.add(t.data_ptr())
    return unaliased


@torch.library.custom_op("fastnabla::transition_scores", mutates_args=())
def _transition_scores_op(
    x_t: Tensor,
    x_next: Tensor,
    eps_theta: Tensor,
    eps_ref: Tensor,
    a: Tensor,
    b: Tensor,
    sigma: Tensor,
    alpha_bar: Tensor,
    prior_strength: float,
    fl_cot: Tensor | None,
    fl_into_ref: bool,
    want_score_fwd: bool,
    want_rev_local: bool,
    want_cot_theta: bool,
    want_cot_ref: bool,
    want_x_hat: bool,
) -> list[Tensor]:
    return _forward_impl(x_t, x_next, eps_theta, eps_ref, a, b, sigma, alpha_bar, prior_strength, fl_cot,
                         fl_into_ref, want_score_fwd, want_rev_local, want_cot_theta, want_cot_ref, want_x_hat)


@_transition_scores_op.register_fake
def _(x_t, x_next, eps_theta, eps_ref, a, b, sigma, alpha_bar, prior_strength, fl_cot, fl_into_ref, *flags):
    fmt = kernel_memory_format(x_t)
    return [torch.empty_like(x_t, memory_format=fmt) for want in flags if want]


@torch.library.custom_op("fastnabla::transition_scores_backward", mutates_args=())
def _transition_scores_backward_op(
    g_score_fwd: Tensor | None,
    g_rev_local: Tensor | None,
    g_cot_theta: Tensor | None,
    g_cot_ref: Tensor | None,
    g_x_hat: Tensor | None,
    a: Tensor,
    b: Tensor,
    sigma: Tensor,
    alpha_bar: Tensor,
    prior_strength: float,
    fl_into_ref: bool,
    need_x_t: bool,
    need_x_next: bool,
    need_eps_theta: bool,
    need_eps_ref: bool,
    need_fl_cot: bool,
) -> list[Tensor]:
    grads = [g_score_fwd, g_rev_local, g_cot_theta, g_cot_ref, g_x_hat]
    needs = (need_x_t, need_x_next, need_eps_theta, need_eps_ref, need_fl_cot)
    return _backward_impl(grads, a, b, sigma, alpha_bar, prior_strength, fl_into_ref, needs)


@_transition_scores_backward_op.register_fake
def _(g_score_fwd, g_rev_local, g_cot_theta, g_cot_ref, g_x_hat, a, b, sigma, alpha_bar, prior_strength,
      fl_into_ref, *needs):
    first = next(g for g in (g_score_fwd, g_rev_local, g_cot_theta, g_cot_ref, g_x_hat) if g is not None)
    fmt = kernel_memory_format(first)
    return [torch.empty_like(first, memory_format=fmt) for need in needs if need]


def _setup_context(ctx, inputs, output) -> None:
    a, b, sigma, alpha_bar, prior_strength, fl_cot, fl_into_ref, *flags = inputs[4:]
    ctx.save_for_backward(a, b, sigma, alpha_bar)  # four [B] vectors: no activations are saved
    ctx.prior_strength = prior_strength
    ctx.fl_into_ref = fl_into_ref
    ctx.has_fl = fl_cot is not None
    ctx.flags = tuple(flags)
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None: the kernel skips it


def _input_grads(ctx, grads, backward) -> tuple:
    """Gradients of the op's 16 inputs; ``backward`` is the backward custom op or its implementation."""
    req = ctx.needs_input_grad  # (x_t, x_next, eps_theta, eps_ref, a, b, sigma, alpha_bar, eta, fl_cot, ...)
    needs = (req[0], req[1], req[2], req[3], ctx.has_fl and req[9])
    upstream = iter(grads)
    full = [next(upstream) if want else None for want in ctx.flags]
    if not any(needs) or all(g is None for g in full):
        return (None,) * 16
    out = iter(backward(*full, *ctx.saved_tensors, ctx.prior_strength, ctx.fl_into_ref, *needs))
    g_x, g_next, g_eps, g_ref, g_fl = (next(out) if need else None for need in needs)
    return (g_x, g_next, g_eps, g_ref, None, None, None, None, None, g_fl) + (None,) * 6


_transition_scores_op.register_autograd(
    lambda ctx, grads: _input_grads(ctx, grads, torch.ops.fastnabla.transition_scores_backward),
    setup_context=_setup_context,
)


def _eager_backward(*args) -> list[Tensor]:
    return _backward_impl(list(args[:5]), *args[5:11], tuple(args[11:]))


class _EagerScores(torch.autograd.Function):
    """Eager-mode twin of the registered autograd formula (same setup and backward, without the custom-op
    dispatch overhead); under ``torch.compile`` the public entry calls the custom op instead."""

    @staticmethod
    def forward(ctx, *args):  # the ctx-first form: apply() then skips a per-call inspect.signature bind
        outs = _forward_impl(*args)
        _setup_context(ctx, args, outs)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        return _input_grads(ctx, grads, _eager_backward)


# ---------------------------------------------------------------- public entry point


def check_states(named: dict[str, Tensor | None]) -> Tensor:
    """The first entry of ``named`` is the reference state: every other (non-None) entry must be a tensor
    of its shape, dtype (one of fp32/bf16/fp16) and device. Returns the reference state."""
    (ref_name, ref), *rest = named.items()
    if not isinstance(ref, Tensor):
        raise TypeError(f"{ref_name} must be a torch.Tensor, got {type(ref).__name__}")
    if ref.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{ref_name} has dtype {ref.dtype}; supported: {FLOAT_DTYPES}")
    if ref.dim() < 1:
        raise ValueError(f"{ref_name} must have a leading batch dimension, got a 0-d tensor")
    for name, t in rest:
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != ref.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; all state tensors share one dtype"
            )
        if t.shape != ref.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {ref_name} has {tuple(ref.shape)}")
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    return ref


def per_sample_vector(name: str, c: Tensor, ref: Tensor, what: str = "a schedule constant") -> Tensor:
    """``c`` as a contiguous fp32 ``[B]`` tensor: it must be a floating ``[B]`` or ``[B, 1, ..., 1]`` tensor
    on ``ref``'s device that does not require grad (the fused ops treat it as ``what``)."""
    batch = ref.shape[0]
    if not isinstance(c, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [{batch}], got {type(c).__name__}")
    if not c.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {c.dtype}")
    if c.device != ref.device:
        raise ValueError(f"{name} is on {c.device} but the states are on {ref.device}")
    if c.numel() != batch or c.dim() == 0 or (c.dim() > 1 and any(s != 1 for s in c.shape[1:])):
        raise ValueError(f"{name} must have shape [{batch}] (or [{batch}, 1, ..., 1]), got {tuple(c.shape)}")
    if c.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{name} requires grad, but the fused op treats it as {what}; use the pure-torch reference "
            "(plain autograd) to differentiate through it"
        )
    return c.reshape(batch).to(torch.float32).contiguous()


def python_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    return float(value)


def transition_scores_fused(
    x_t: Tensor,
    x_next: Tensor,
    eps_theta: Tensor,
    eps_ref: Tensor,
    a: Tensor,
    b: Tensor,
    sigma: Tensor,
    alpha_bar: Tensor,
    prior_strength: float = 1.0,
    fl_cot: Tensor | None = None,
    fl_into: str = "theta",
    outputs: tuple[str, ...] = OUTPUTS,
) -> TransitionScores:
    """Residual transition scores, reverse-score cotangents and Tweedie prediction in one pass.

    Args:
        x_t, x_next, eps_theta, eps_ref: ``[B, ...]`` states of the transition and the predictions of the
            fine-tuned and the pretrained network at ``x_t``; one dtype among fp32/bf16/fp16, one device.
        a, b, sigma, alpha_bar: per-sample step coefficients, ``[B]`` or ``[B, 1, ..., 1]`` (used in fp32;
            schedule constants, no gradient). ``alpha_bar`` is ``abar_t`` of ``x_t``.
        prior_strength: ``eta_p`` (a Python number).
        fl_cot: optional ``[B, ...]`` cotangent folded into the VJP of the network named by ``fl_into``
            (``"theta"``: added to ``cot_theta``; ``"ref"``: subtracted from ``cot_ref``), so the two VJPs
            return ``s~<- + J_net^T fl_cot`` (module docstring).
        outputs: the outputs to compute, a subset of :data:`OUTPUTS`; the others come back ``None`` and
            are never written.

    Returns:
        :class:`TransitionScores` in ``x_t.dtype``; differentiable w.r.t. the four states and ``fl_cot``.

    Raises:
        TypeError / ValueError: a non-tensor, mismatched or unsupported dtype, shape or device, a
            coefficient of the wrong shape or that requires grad, an unknown output or ``fl_into``.
    """
    ref = check_states({"x_t": x_t, "x_next": x_next, "eps_theta": eps_theta, "eps_ref": eps_ref, "fl_cot": fl_cot})
    coeffs = [per_sample_vector(n, c, ref) for n, c in (("a", a), ("b", b), ("sigma", sigma), ("alpha_bar", alpha_bar))]
    eta = python_float("prior_strength", prior_strength)
    if fl_into not in FL_TARGETS:
        raise ValueError(f"fl_into={fl_into!r} is not one of {FL_TARGETS}")
    if isinstance(outputs, str) or not outputs or any(o not in OUTPUTS for o in outputs):
        raise ValueError(f"outputs must be a non-empty tuple of names from {OUTPUTS}, got {outputs!r}")
    flags = tuple(name in outputs for name in OUTPUTS)
    if select_backend(ref.device) == "reference" and not use_compiled(ref.device, ref.numel(), COMPILE_MIN_NUMEL):
        # inline pure torch: plain autograd, and inductor sees through it under torch.compile
        outs = iter(transition_scores_reference(
            x_t, x_next, eps_theta, eps_ref, *coeffs, eta, fl_cot, fl_into, _wanted(flags)
        ))
    else:
        args = (x_t, x_next, eps_theta, eps_ref, *coeffs, eta, fl_cot, fl_into == "ref", *flags)
        if torch.compiler.is_compiling():
            outs = iter(torch.ops.fastnabla.transition_scores(*args))
        elif torch.is_grad_enabled():
            outs = iter(_EagerScores.apply(*args))
        else:  # no autograd: the implementation itself, without the custom-op dispatch
            outs = iter(_forward_impl(*args))
    return TransitionScores(*(next(outs) if want else None for want in flags))
