"""The fused transition scores' entry point and ``torch.library`` registration.

Maths, backward and the forward-looking fold in :mod:`fastnabla.ops.transition_scores.reference`. Paths
(:mod:`fastnabla.ops.dispatch`): the Triton kernels of ``kernels/transition_scores.py``; on CPU from
:data:`COMPILE_MIN_NUMEL` elements per tensor the closed forms compiled by inductor; below, the reference
inline with plain autograd (the op is linear, so autograd keeps only the ``[B]`` coefficients). Every
fused path saves only the four ``[B]`` coefficients for backward; outputs that receive no gradient cost
nothing in the backward.
"""

from __future__ import annotations

import torch

from fastnabla.ops.checks import check_states, per_sample_vector, python_float
from fastnabla.ops.dispatch import Autograd, FusedOp, Pass, kernel_memory_format
from fastnabla.ops.transition_scores.reference import (
    FL_TARGETS,
    OUTPUTS,
    TransitionScores,
    transition_scores_backward_reference,
    transition_scores_reference,
)

Tensor = torch.Tensor
# FASTNABLA_COMPILE=auto compiles CPU calls from this many elements per tensor. Measured (docs/ops.md, one
# thread, fwd+bwd): compiled/eager = 1.11 at 600 elements, 0.97 at 8192, 0.76 at 32768, 0.50 at 131072.
COMPILE_MIN_NUMEL = 1 << 15

__all__ = ["COMPILE_MIN_NUMEL", "TRANSITION_SCORES", "transition_scores_fused"]


def _wanted(flags) -> tuple[str, ...]:
    return tuple(name for name, want in zip(OUTPUTS, flags, strict=True) if want)


def _fl_into(fl_into_pretrained: bool) -> str:
    return "pretrained" if fl_into_pretrained else "theta"


TRANSITION_SCORES = FusedOp(
    "transition_scores",
    kernels="transition_scores",
    # op args (x_t, x_next, eps_theta, eps_pretrained, a, b, sigma, alpha_bar, eta, fl_cot, fl_into_pretrained,
    # *5 flags)
    forward=Pass(transition_scores_reference, "transition_scores_forward",
                 args=lambda a: (*a[:10], _fl_into(a[10]), _wanted(a[11:16]))),
    # op args (*5 upstream gradients or None, a, b, sigma, alpha_bar, eta, fl_into_pretrained, needs)
    backward=Pass(transition_scores_backward_reference, "transition_scores_backward",
                  args=lambda a: (list(a[:5]), *a[5:10], _fl_into(a[10]), a[11]),
                  layout=lambda a: next(g for g in a[:5] if g is not None)),
    autograd=Autograd(
        grad_inputs=(0, 1, 2, 3, 9),  # x_t, x_next, eps_theta, eps_pretrained, fl_cot
        save=lambda i: (i[4:8], (i[8], i[10])),  # four [B] coefficients; eta, fl_into_pretrained
        routed=lambda i: (True, True, True, True, i[9] is not None),
        outputs=lambda i: i[11:16],
    ),
    min_numel=COMPILE_MIN_NUMEL,
)


@torch.library.custom_op("fastnabla::transition_scores", mutates_args=())
def _transition_scores_op(
    x_t: Tensor,
    x_next: Tensor,
    eps_theta: Tensor,
    eps_pretrained: Tensor,
    a: Tensor,
    b: Tensor,
    sigma: Tensor,
    alpha_bar: Tensor,
    prior_strength: float,
    fl_cot: Tensor | None,
    fl_into_pretrained: bool,
    want_score_fwd: bool,
    want_rev_local: bool,
    want_cot_theta: bool,
    want_cot_pretrained: bool,
    want_x_hat: bool,
    path: str = "auto",
) -> list[Tensor]:
    return TRANSITION_SCORES.forward(
        path, x_t, x_next, eps_theta, eps_pretrained, a, b, sigma, alpha_bar, prior_strength, fl_cot,
        fl_into_pretrained,
        want_score_fwd, want_rev_local, want_cot_theta, want_cot_pretrained, want_x_hat,
    )


@_transition_scores_op.register_fake
def _(x_t, x_next, eps_theta, eps_pretrained, a, b, sigma, alpha_bar, prior_strength, fl_cot, fl_into_pretrained,
      *flags_path):
    fmt = kernel_memory_format(x_t)
    return [torch.empty_like(x_t, memory_format=fmt) for want in flags_path[:5] if want]


@torch.library.custom_op("fastnabla::transition_scores_backward", mutates_args=())
def _transition_scores_backward_op(
    g_score_fwd: Tensor | None,
    g_rev_local: Tensor | None,
    g_cot_theta: Tensor | None,
    g_cot_pretrained: Tensor | None,
    g_x_hat: Tensor | None,
    a: Tensor,
    b: Tensor,
    sigma: Tensor,
    alpha_bar: Tensor,
    prior_strength: float,
    fl_into_pretrained: bool,
    need_x_t: bool,
    need_x_next: bool,
    need_eps_theta: bool,
    need_eps_pretrained: bool,
    need_fl_cot: bool,
    path: str = "auto",
) -> list[Tensor]:
    needs = (need_x_t, need_x_next, need_eps_theta, need_eps_pretrained, need_fl_cot)
    return TRANSITION_SCORES.backward(path, g_score_fwd, g_rev_local, g_cot_theta, g_cot_pretrained, g_x_hat, a, b,
                                      sigma,
                                      alpha_bar, prior_strength, fl_into_pretrained, needs)


@_transition_scores_backward_op.register_fake
def _(g_score_fwd, g_rev_local, g_cot_theta, g_cot_pretrained, g_x_hat, a, b, sigma, alpha_bar, prior_strength,
      fl_into_pretrained, *needs_path):
    first = next(g for g in (g_score_fwd, g_rev_local, g_cot_theta, g_cot_pretrained, g_x_hat) if g is not None)
    fmt = kernel_memory_format(first)
    return [torch.empty_like(first, memory_format=fmt) for need in needs_path[:5] if need]


TRANSITION_SCORES.register(_transition_scores_op)


def transition_scores_fused(
    x_t: Tensor,
    x_next: Tensor,
    eps_theta: Tensor,
    eps_pretrained: Tensor,
    a: Tensor,
    b: Tensor,
    sigma: Tensor,
    alpha_bar: Tensor,
    prior_strength: float = 1.0,
    fl_cot: Tensor | None = None,
    fl_into: str = "theta",
    outputs: tuple[str, ...] = OUTPUTS,
) -> TransitionScores:
    """Residual transition scores (paper eqs. 11, 13), reverse-score cotangents and Tweedie prediction
    (eq. 2) in one pass.

    Args:
        x_t, x_next, eps_theta, eps_pretrained: ``[B, ...]`` states of the transition and the predictions of the
            fine-tuned and the pretrained network at ``x_t``; one dtype among fp32/bf16/fp16, one device.
        a, b, sigma, alpha_bar: per-sample step coefficients, ``[B]`` or ``[B, 1, ..., 1]`` (used in fp32;
            schedule constants, no gradient). ``alpha_bar`` is ``abar_t`` of ``x_t``.
        prior_strength: ``eta_p`` (a Python number).
        fl_cot: optional ``[B, ...]`` cotangent folded into the VJP of the network named by ``fl_into``
            (``"theta"``: added to ``cot_theta``; ``"pretrained"``: subtracted from ``cot_pretrained``), so the two VJPs
            return ``s~<- + J_net^T fl_cot`` (see :mod:`fastnabla.ops.transition_scores.reference`).
        outputs: the outputs to compute, a subset of :data:`OUTPUTS`; the others come back ``None`` and
            are never written.

    Returns:
        :class:`TransitionScores` in ``x_t.dtype``; differentiable w.r.t. the four states and ``fl_cot``.

    Raises:
        TypeError / ValueError: a non-tensor, mismatched or unsupported dtype, shape or device, a
            coefficient of the wrong shape or that requires grad, an unknown output or ``fl_into``.
    """
    ref = check_states({"x_t": x_t, "x_next": x_next, "eps_theta": eps_theta, "eps_pretrained": eps_pretrained,
                        "fl_cot": fl_cot})
    coeffs = [per_sample_vector(n, c, ref) for n, c in (("a", a), ("b", b), ("sigma", sigma), ("alpha_bar", alpha_bar))]
    eta = python_float("prior_strength", prior_strength)
    if fl_into not in FL_TARGETS:
        raise ValueError(f"fl_into={fl_into!r} is not one of {FL_TARGETS}")
    if isinstance(outputs, str) or not outputs or any(o not in OUTPUTS for o in outputs):
        raise ValueError(f"outputs must be a non-empty tuple of names from {OUTPUTS}, got {outputs!r}")
    flags = tuple(name in outputs for name in OUTPUTS)
    outs = iter(TRANSITION_SCORES(
        x_t, x_next, eps_theta, eps_pretrained, *coeffs, eta, fl_cot, fl_into == "pretrained", *flags,
        reference=lambda: transition_scores_reference(
            x_t, x_next, eps_theta, eps_pretrained, *coeffs, eta, fl_cot, fl_into, _wanted(flags)
        ),
    ))
    return TransitionScores(*(next(outs) if want else None for want in flags))
