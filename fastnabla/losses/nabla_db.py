"""Reference residual nabla-DB losses with the forward-looking (FL) flow (paper eqs. 16-19).

Pure torch, on tensors: the networks have already been evaluated (``eps_theta`` carries the graph
to the policy parameters, ``flow_t``/``flow_next`` to the flow parameters), so this function is the
oracle that fused kernels are tested against.

Per transition ``x_t -> x_{t+1}`` with ``mu = a x_t + b eps`` and ``eta_p`` the prior strength:

    s~-> = grad_{x_{t+1}}[log P_F - eta_p log P_F#]  = (-(x_{t+1} - mu) + eta_p (x_{t+1} - mu#)) / sigma^2
    s~<- = grad_{x_t}[log P_F - eta_p log P_F#]      = (a r + b J_eps^T r - eta_p (a r# + b J_eps#^T r#)) / sigma^2
    L->  = || s~-> - [fl_{t+1} + g(x_{t+1})] ||^2     (eq. 16; at t+1 = T the bracket is fl_T = beta grad log R(x_T))
    L<-  = || s~<- + [fl_t + g(x_t)] ||^2             (eq. 17)
    L_T  = || g(x_T) ||^2                             (eq. 18)
    L    = w_F L-> + w_B L<- + L_T + lambda ||eps - eps_old||^2   (eq. 19 plus the output regulariser)

where ``r = x_{t+1} - mu``, ``r# = x_{t+1} - mu#`` and ``fl_s = beta gamma_s grad log R(x_hat(x_s))``
(:mod:`fastnabla.losses.forward_looking`). Norms are means over the non-batch elements, as in the
authors' release, so weights do not scale with the latent size.

Gradient routing (defaults as the authors' release, DESIGN.md section 1):

* ``L->`` trains the policy (through ``eps_theta``) and the flow (through ``flow_next``);
  ``forward_trains_flow=False`` detaches ``flow_next`` there.
* ``L<-`` trains the flow only: ``s~<-`` is a constant (``detach_reverse=True``). With
  ``detach_reverse=False`` the graph of ``r`` and of ``vjp_theta`` (compute it with
  ``create_graph=True``) is kept, adding the second-order terms the paper reports to hurt.
* the FL terms ``fl_t``, ``fl_next`` are constants (computed under ``no_grad`` or detached).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor


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
    eps_ref: Tensor,
    vjp_theta: Tensor,
    vjp_ref: Tensor,
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
        eps_ref: ``eps#(x_t)`` of the pretrained model (constant).
        vjp_theta: ``J_eps_theta(x_t)^T r`` with ``r = x_next - mu_theta`` (constant unless
            ``detach_reverse=False``).
        vjp_ref: ``J_eps#(x_t)^T r#`` with ``r# = x_next - mu#``.
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
            ``vjp_ref`` are then unused.
    """
    if terminal.dtype != torch.bool or terminal.shape != (x_t.shape[0],):
        raise ValueError(f"terminal must be a bool tensor of shape [{x_t.shape[0]}]")
    mean = a * x_t + b * eps_theta
    mean_ref = a * x_t + b * eps_ref
    inv_var = 1.0 / sigma**2

    # forward (eq. 16): s~-> - [fl_{t+1} + g(x_{t+1})]; g(x_T) is replaced by 0 (gamma_T = 1, eq. 18)
    score_fwd = (-(x_next - mean) + prior_strength * (x_next - mean_ref)) * inv_var
    t_mask = terminal.reshape((-1,) + (1,) * (x_t.ndim - 1))
    flow_in_fwd = flow_next if forward_trains_flow else flow_next.detach()
    target_fwd = fl_next + torch.where(t_mask, torch.zeros_like(flow_in_fwd), flow_in_fwd)
    loss_fwd = _elem_mean((score_fwd - target_fwd) ** 2)

    # reverse (eq. 17): s~<- + [fl_t + g(x_t)]
    if reverse_target is None:
        r = x_next - mean
        r_ref = x_next - mean_ref
        score_rev = (a * r + b * vjp_theta - prior_strength * (a * r_ref + b * vjp_ref)) * inv_var
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
