"""Pure-torch reference of the residual nabla-DB loss with the forward-looking (FL) flow (paper eqs. 16-19):
the autograd reference and the closed forms the fused CPU paths run.

:func:`residual_nabla_db_loss` works on tensors: the networks have already been evaluated (``eps_theta``
carries the graph to the policy parameters, ``flow_t``/``flow_next`` to the flow parameters), so it is the
reference that the fused op and its kernels are tested against.

Per transition ``x_t -> x_{t+1}`` with ``mu = a x_t + b eps`` and ``eta_p`` the prior strength:

    s~-> = grad_{x_{t+1}}[log P_F - eta_p log P_F#]  = (-(x_{t+1} - mu) + eta_p (x_{t+1} - mu#)) / sigma^2
    s~<- = grad_{x_t}[log P_F - eta_p log P_F#]      = (a r + b J_eps^T r - eta_p (a r# + b J_eps#^T r#)) / sigma^2
    L->  = || s~-> - [fl_{t+1} + g(x_{t+1})] ||^2     (eq. 16; at t+1 = T the bracket is fl_T = beta grad log R(x_T))
    L<-  = || s~<- + [fl_t + g(x_t)] ||^2             (eq. 17)
    L_T  = || g(x_T) ||^2                             (eq. 18)
    L    = w_F L-> + w_B L<- + L_T + lambda ||eps - eps_old||^2   (eq. 19 plus the output regulariser)

where ``r = x_{t+1} - mu``, ``r# = x_{t+1} - mu#`` and ``fl_s = beta gamma_s grad log R(x_hat(x_s))``
(:mod:`fastnabla.ops.forward_looking.reference`). Norms are means over the non-batch elements, as in the
authors' release, so weights do not scale with the latent size.

Gradient routing (defaults as the authors' release, docs/maths.md):

* ``L->`` trains the policy (through ``eps_theta``) and the flow (through ``flow_next``);
  ``forward_trains_flow=False`` detaches ``flow_next`` there.
* ``L<-`` trains the flow only: ``s~<-`` is a constant (``detach_reverse=True``). With
  ``detach_reverse=False`` the graph of ``r`` and of ``vjp_theta`` (compute it with
  ``create_graph=True``) is kept, adding the second-order terms the paper reports to hurt.
* the FL terms ``fl_t``, ``fl_next`` are constants (computed under ``no_grad`` or detached).

**Closed forms.** :func:`nabla_db_loss_reference` and :func:`nabla_db_loss_backward_reference` compute the
same terms and their gradients without autograd, written so inductor fuses each pass into one loop. Per
transition, with ``k = 1/sigma^2``, ``r = x_{t+1} - (a x_t + b eps_theta)``, ``r# = x_{t+1} - (a x_t +
b eps_pretrained)``, ``tau`` the terminal mask and means over the ``N`` non-batch elements::

    d_f  = (eta_p r# - r) k - [fl_next + (1 - tau) g(x_{t+1})]                   (eq. 16 residual)
    d_r  = k (a r + b vjp_theta - eta_p (a r# + b vjp_pretrained)) + fl_t + g(x_t)      (eq. 17; -G if reverse_target)
    L->  = mean d_f^2,  L<- = mean d_r^2,  L_T = tau mean g(x_{t+1})^2,  L_reg = mean (eps_theta - eps_old)^2
    total = w_F L-> + w_B L<- + L_T + lambda L_reg                               (eq. 19)

returned as :class:`NablaDBTerms` of ``[B]`` fp32 vectors. The loss is quadratic in
affine functions of the inputs, so the backward is closed-form and elementwise. With upstream ``[B]``
gradients ``g_F, g_B, g_T, g_reg, g_tot`` of the five terms::

    u_f = 2/N (g_F + w_F g_tot) d_f,   u_r = 2/N (g_B + w_B g_tot) d_r
    c_T = 2/N tau (g_T + g_tot),       c_reg = 2/N (g_reg + lambda g_tot)
    d eps_theta = k b u_f [- k a b u_r]* + c_reg (eps_theta - eps_old)
    d g(x_{t+1}) = -(1 - tau) u_f [if forward_trains_flow] + c_T g(x_{t+1}),     d g(x_t) = u_r
    d x_t = k a (1 - eta_p) u_f [- k a^2 (1 - eta_p) u_r]*,   d x_{t+1} = k (eta_p - 1) u_f [+ k a (1 - eta_p) u_r]*
    d eps_pretrained = -eta_p k b u_f [+ eta_p k a b u_r]*
    d vjp_theta = [k b u_r]*,   d vjp_pretrained = [-eta_p k b u_r]*
    d fl_next = -u_f,   d fl_t = u_r,   d eps_old = -c_reg (eps_theta - eps_old)

where ``[...]*`` exists only with ``detach_reverse=False`` and no ``reverse_target`` (the second-order
routing; by default ``s~<-`` is a constant, as in the reference). The backward recomputes ``d_f`` and
``d_r`` from the inputs: **nothing is saved for backward beyond the inputs** and ``[B]`` vectors.
Coefficients, weights and the terminal mask are constants; ``reverse_target`` is detached (as in the
autograd reference). Every option combination runs the fused path: there is no fallback.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastnabla.mdp.gaussian_policy import step_mean

Tensor = torch.Tensor
# Gradients the closed-form backward can produce, in the fused op's input order.
GRAD_INPUTS = (
    "x_t", "x_next", "eps_theta", "eps_pretrained", "vjp_theta", "vjp_pretrained", "fl_t", "fl_next", "flow_t",
    "flow_next",
    "eps_old",
)

__all__ = [
    "GRAD_INPUTS",
    "NablaDBTerms",
    "nabla_db_loss_backward_reference",
    "nabla_db_loss_reference",
    "residual_nabla_db_loss",
]


def _elem_mean(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).mean(dim=1)


@dataclass
class NablaDBTerms:
    """Per-sample loss terms, each ``[B]``; ``total`` is what is averaged and backpropagated."""

    forward: Tensor
    reverse: Tensor
    terminal: Tensor
    output_reg: Tensor
    total: Tensor


def residual_nabla_db_loss(
    *,
    x_t: Tensor,
    x_next: Tensor,
    eps_theta: Tensor,
    eps_pretrained: Tensor,
    vjp_theta: Tensor,
    vjp_pretrained: Tensor,
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
    """Residual nabla-DB loss with forward-looking flow, per sample (paper eqs. 16-19).

    Args:
        x_t, x_next: states ``[B, ...]`` of the transitions.
        eps_theta: ``eps_theta(x_t)`` with graph to the policy parameters.
        eps_pretrained: ``eps#(x_t)`` of the pretrained model (constant).
        vjp_theta: ``J_eps_theta(x_t)^T r`` with ``r = x_next - mu_theta`` (constant unless
            ``detach_reverse=False``).
        vjp_pretrained: ``J_eps#(x_t)^T r#`` with ``r# = x_next - mu#``.
        fl_t, fl_next: FL gradients ``beta gamma grad log R(x_hat)`` at ``x_t`` and ``x_{t+1}``
            (``fl_next`` at a terminal ``x_{t+1}`` is ``beta grad log R(x_T)``).
        flow_t, flow_next: flow-network outputs ``g_phi(x_t)``, ``g_phi(x_{t+1})``.
        a, b, sigma: step coefficients broadcastable to ``x_t`` (``[B, 1, ...]``).
        terminal: bool ``[B]``, ``True`` where ``x_{t+1}`` is the terminal state ``x_T``.
        w_forward, w_reverse: ``w_F(t)``, ``w_B(t)`` as scalars or ``[B]``.
        eps_old: ``eps`` recorded when the trajectory was sampled (output regulariser).
        output_reg: ``lambda`` of the output regulariser (0 disables it).
        prior_strength: ``eta_p``.
        reverse_target: if given, a constant target ``G_t`` for ``grad log F~(x_t)`` used in place of
            ``-s~<-`` (the pathwise targets of :mod:`fastnabla.methods.nabla_gfn.pathwise`); ``vjp_theta`` and
            ``vjp_pretrained`` are then unused.
    """
    if terminal.dtype != torch.bool or terminal.shape != (x_t.shape[0],):
        raise ValueError(f"terminal must be a bool tensor of shape [{x_t.shape[0]}]")
    mean = a * x_t + b * eps_theta
    mean_pretrained = a * x_t + b * eps_pretrained
    inv_var = 1.0 / sigma**2

    # forward (eq. 16): s~-> - [fl_{t+1} + g(x_{t+1})]; g(x_T) is replaced by 0 (gamma_T = 1, eq. 18)
    score_fwd = (-(x_next - mean) + prior_strength * (x_next - mean_pretrained)) * inv_var
    t_mask = terminal.reshape((-1,) + (1,) * (x_t.ndim - 1))
    flow_in_fwd = flow_next if forward_trains_flow else flow_next.detach()
    target_fwd = fl_next + torch.where(t_mask, torch.zeros_like(flow_in_fwd), flow_in_fwd)
    loss_fwd = _elem_mean((score_fwd - target_fwd) ** 2)

    # reverse (eq. 17): s~<- + [fl_t + g(x_t)]
    if reverse_target is None:
        r = x_next - mean
        r_pretrained = x_next - mean_pretrained
        score_rev = (a * r + b * vjp_theta - prior_strength * (a * r_pretrained + b * vjp_pretrained)) * inv_var
        if detach_reverse:
            score_rev = score_rev.detach()
    else:
        score_rev = -reverse_target.detach()
    loss_rev = _elem_mean((score_rev + fl_t + flow_t) ** 2)

    # terminal (eq. 18): ||g(x_T)||^2 on transitions that end at x_T
    loss_term = torch.where(terminal, _elem_mean(flow_next**2), torch.zeros_like(loss_fwd))

    if output_reg and eps_old is not None:
        loss_reg = _elem_mean((eps_theta - eps_old) ** 2)
    else:
        loss_reg = torch.zeros_like(loss_fwd)

    total = w_forward * loss_fwd + w_reverse * loss_rev + loss_term + output_reg * loss_reg
    return NablaDBTerms(loss_fwd, loss_rev, loss_term, loss_reg, total)


# ---------------------------------------------------------------- closed forms (no autograd)


def _per_sample(c: Tensor, ndim: int, dtype: torch.dtype) -> Tensor:
    return c.to(dtype).reshape((-1,) + (1,) * (ndim - 1))


def _as_2d(t: Tensor | None) -> Tensor | None:
    return t.unsqueeze(1) if t is not None and t.dim() == 1 else t


def _residuals(
    x, xn, e, e_pretrained, vjp, vjp_pretrained, fl_t, fl_next, flow_t, flow_next, target, a_, b_, inv_var, term_, eta,
    need_f: bool = True, need_r: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """``(d_f, d_r)`` of the module docstring, in the compute dtype (None where not needed)."""
    r = xn - step_mean(x, e, a_, b_)
    r_pretrained = xn - step_mean(x, e_pretrained, a_, b_)
    d_f = d_r = None
    if need_f:
        score_fwd = (-r + eta * r_pretrained) * inv_var
        d_f = score_fwd - (fl_next + torch.where(term_, torch.zeros_like(flow_next), flow_next))
    if need_r:
        score_rev = -target if target is not None else (a_ * r + b_ * vjp - eta * (a_ * r_pretrained
                                                                                   + + b_ * vjp_pretrained)) * inv_var
        d_r = score_rev + fl_t + flow_t
    return d_f, d_r


def nabla_db_loss_reference(
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
    states = [_as_2d(t) for t in (x_t, x_next, eps_theta, eps_pretrained, vjp_theta, vjp_pretrained, fl_t, fl_next,
                                  flow_t,
                                  flow_next, eps_old, reverse_target)]
    x, xn, e, e_pretrained, vjp, vjp_pretrained, flt, fln, flow, flow_n, e_old, target = (
        t.to(compute) if t is not None else None for t in states
    )
    nd = x.dim()
    dims = tuple(range(1, nd))
    a_, b_, sigma_ = (_per_sample(c, nd, compute) for c in (a, b, sigma))
    term_ = _per_sample(terminal, nd, compute) != 0
    d_f, d_r = _residuals(x, xn, e, e_pretrained, vjp, vjp_pretrained, flt, fln, flow, flow_n, target, a_, b_,
                          1.0 / sigma_**2, term_, prior_strength)
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
    eps_pretrained: Tensor,
    vjp_theta: Tensor | None,
    vjp_pretrained: Tensor | None,
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
    states = [_as_2d(t) for t in (x_t, x_next, eps_theta, eps_pretrained, vjp_theta, vjp_pretrained, fl_t, fl_next,
                                  flow_t,
                                  flow_next, eps_old, reverse_target)]
    x, xn, e, e_pretrained, vjp, vjp_pretrained, flt, fln, flow, flow_n, e_old, target = (
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
    need_f = any(need[k] for k in ("x_t", "x_next", "eps_theta", "eps_pretrained", "fl_next")) or (
        need["flow_next"] and forward_trains_flow
    )
    need_r = need["fl_t"] or need["flow_t"] or (second and any(need[k] for k in GRAD_INPUTS[:6]))
    d_f, d_r = _residuals(x, xn, e, e_pretrained, vjp, vjp_pretrained, flt, fln, flow, flow_n, target, a_, b_, inv_var,
                          term_, eta,
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
    if need["eps_pretrained"]:
        grad = -eta * inv_var * b_ * u_f
        out.append(grad + eta * inv_var * a_ * b_ * u_r if second else grad)
    if need["vjp_theta"]:
        out.append(inv_var * b_ * u_r)
    if need["vjp_pretrained"]:
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
