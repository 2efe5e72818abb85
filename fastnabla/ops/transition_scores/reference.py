"""Pure-torch reference of the fused transition scores: the reference, and the closed forms of the CPU paths.

The op computes the residual forward score, the VJP-free part of the residual reverse score, the two
reverse-score cotangents and the Tweedie prediction, from one pass over one transition.

For ``x_t -> x_{t+1}`` with per-*sample* coefficients (a batch may mix timesteps; docs/maths.md)
``mu = a x_t + b eps_theta``, ``mu# = a x_t + b eps_pretrained``, ``r = x_{t+1} - mu``, ``r# = x_{t+1} - mu#``
and ``eta_p`` the prior strength::

    score_fwd = s~->  = (-r + eta_p r#) / sigma^2                         (paper eq. 11, residual forward score)
    rev_local         = (a r - eta_p a r#) / sigma^2                      (the part of s~<- without Jacobians)
    cot_theta         = b r / sigma^2          [+ fl_cot if fl_into="theta"]
    cot_pretrained           = eta_p b r# / sigma^2   [- fl_cot if fl_into="pretrained"]
    x_hat             = (x_t - sqrt(1 - abar) eps_theta) / sqrt(abar)     (Tweedie, paper eq. 2)

so that the residual reverse score (paper eq. 13) is one VJP through each network::

    s~<- = rev_local + J_theta(x_t)^T cot_theta - J_pretrained(x_t)^T cot_pretrained

**Folding the forward-looking term into the same VJP.** The FL gradient at ``x_t`` (paper eq. 15, "full"
Jacobian) is ``fl_local + J_net(x_t)^T v`` with ``v = -beta gamma_t sqrt(1-abar)/sqrt(abar) grad_{x_hat} log R``
and ``net`` the network that predicts ``x_hat`` (the policy or the pretrained model). Since
``J^T u + J^T v = J^T (u + v)``, passing ``fl_cot = v`` makes the VJPs return ``s~<- + J_net^T v`` directly:
the cotangent of the chosen network absorbs ``v`` (``cot_theta + v``, or ``cot_pretrained - v`` because the
reference VJP is subtracted), which saves one network backward per transition. The caller then adds
only ``fl_local`` (the Jacobian-free part) to obtain ``s~<- + fl_t``.

Every output is affine in ``(x_t, x_{t+1}, eps_theta, eps_pretrained, fl_cot)``, so the backward is closed-form
and elementwise (``g_*`` are the upstream gradients of the outputs, ``k = 1/sigma^2``)::

    G_r  = k (-g_fwd + a g_rev + b g_cot_theta),   G_r# = eta_p k (g_fwd - a g_rev + b g_cot_pretrained)
    d x_{t+1} = G_r + G_r#,  d x_t = -a (G_r + G_r#) + g_hat / sqrt(abar)
    d eps_theta = -b G_r - sqrt(1-abar)/sqrt(abar) g_hat,  d eps_pretrained = -b G_r#
    d fl_cot = g_cot_theta (fl_into="theta") or -g_cot_pretrained (fl_into="pretrained")

and needs only the four ``[B]`` coefficients: nothing else is saved for backward. Coefficients are
schedule constants (no gradient); ``sigma > 0`` and ``abar`` in ``(0, 1]`` are not checked (a check would
synchronise the device).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from fastnabla.mdp.gaussian_policy import step_mean, tweedie_x0

Tensor = torch.Tensor
OUTPUTS = ("score_fwd", "rev_local", "cot_theta", "cot_pretrained", "x_hat")
FL_TARGETS = ("theta", "pretrained")

__all__ = [
    "FL_TARGETS",
    "OUTPUTS",
    "TransitionScores",
    "transition_scores_backward_reference",
    "transition_scores_reference",
]


class TransitionScores(NamedTuple):
    """Outputs of :func:`~fastnabla.ops.transition_scores.transition_scores_fused` (``None`` where not
    requested), all ``[B, ...]``."""

    score_fwd: Tensor | None
    rev_local: Tensor | None
    cot_theta: Tensor | None
    cot_pretrained: Tensor | None
    x_hat: Tensor | None


def _per_sample(c: Tensor, ndim: int, dtype: torch.dtype) -> Tensor:
    return c.to(dtype).reshape((-1,) + (1,) * (ndim - 1))


def transition_scores_reference(
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
) -> list[Tensor]:
    """Pure-torch outputs named in ``outputs`` (in :data:`OUTPUTS` order; maths in the module docstring).

    Built from :func:`fastnabla.mdp.gaussian_policy.step_mean` and ``tweedie_x0``; computes in
    ``promote(x_t.dtype, float32)`` (so it is also the float64 reference) and returns ``x_t.dtype``. No input
    checks and no sigma check (it stays traceable by ``torch.compile``); gradients flow to every input.
    """
    compute = torch.promote_types(x_t.dtype, torch.float32)
    nd = x_t.dim()
    a_, b_, sigma_, abar_ = (_per_sample(c, nd, compute) for c in (a, b, sigma, alpha_bar))
    x, xn, e, e_pretrained = (t.to(compute) for t in (x_t, x_next, eps_theta, eps_pretrained))
    inv_var = 1.0 / sigma_**2
    r = xn - step_mean(x, e, a_, b_)
    r_pretrained = xn - step_mean(x, e_pretrained, a_, b_)
    fl = fl_cot.to(compute) if fl_cot is not None else None
    out: list[Tensor] = []
    if "score_fwd" in outputs:
        out.append((prior_strength * r_pretrained - r) * inv_var)
    if "rev_local" in outputs:
        out.append(a_ * (r - prior_strength * r_pretrained) * inv_var)
    if "cot_theta" in outputs:
        cot = b_ * r * inv_var
        out.append(cot + fl if fl is not None and fl_into == "theta" else cot)
    if "cot_pretrained" in outputs:
        cot = prior_strength * b_ * r_pretrained * inv_var
        out.append(cot - fl if fl is not None and fl_into == "pretrained" else cot)
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
    ``(x_t, x_next, eps_theta, eps_pretrained, fl_cot)`` selected by ``needs``, in that order, in the upstream
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
    g_r_pretrained = total(
        g_fwd,
        -a_ * g_rev if g_rev is not None else None,
        b_ * g_cr if g_cr is not None else None,
    ) * (eta * inv_var)
    need_x, need_next, need_eps, need_pretrained, need_fl = needs
    out: list[Tensor] = []
    if need_x:
        dx = -a_ * (g_r + g_r_pretrained)
        out.append(dx + g_hat / abar_.sqrt() if g_hat is not None else dx)
    if need_next:
        out.append(g_r + g_r_pretrained)
    if need_eps:
        de = -b_ * g_r
        out.append(de - ((1 - abar_).sqrt() / abar_.sqrt()) * g_hat if g_hat is not None else de)
    if need_pretrained:
        out.append(-b_ * g_r_pretrained)
    if need_fl:
        g = g_ct if fl_into == "theta" else (-g_cr if g_cr is not None else None)
        out.append(g if g is not None else torch.zeros_like(first, dtype=compute))
    return [t.to(first.dtype) for t in out]
