"""Pathwise (TD(lambda)) targets for the residual flow: a faster-propagating form of eq. 17.

The reverse loss (eq. 17) regresses ``grad log F~(x_t) = FL_t + g(x_t)`` onto ``-s~<-``, whose
conditional mean at the forward loss' fixed point is ``J_mu#(x_t)^T (mu_theta - mu#) / sigma^2``:
the flow at ``t`` learns from the *policy* at ``t``, which learns from the flow at ``t+1``. Credit
travels one step per round of both fits, and with ``T = 50`` steps that is the bottleneck.

Differentiating the residual DB condition ``log F~(x_t) + log P~(x_{t+1}|x_t) = log F~(x_{t+1})``
along the reparametrised step and taking the lean (pretrained-Jacobian) form gives the target

    G_t = J_mu#(x_t)^T [ (1 - lambda) h_{t+1}(x_{t+1}) + lambda G_{t+1} ],   G_T = beta grad log R(x_T)

with ``h_s = FL_s + g(x_s)`` the current flow estimate and ``J_mu#^T v = a_t v + b_t J_eps#(x_t)^T v``
(one VJP through the frozen network per state). On-policy,
``E[J_mu#^T h_{t+1}(x_{t+1}) | x_t] = J_mu#^T E[h_{t+1}] = J_mu#^T (mu_theta - mu#) / sigma^2`` at the
forward fixed point: the same conditional mean as ``-s~<-`` (the noise term ``(J_mu# - J_mu)^T r``
of eq. 17 has mean zero), so every ``lambda`` shares the fixed point of eq. 17, which is exact at
the optimum (Stein's identity for the twisted kernel ``P_F# F~_{t+1} / F~_t``). ``lambda = 0``
bootstraps from the flow at ``t+1`` without waiting for the policy; ``lambda = 1`` is the Monte-Carlo
adjoint of ``beta log R(x_T)`` through the pretrained sampler (adjoint matching's lean adjoint).
"""

from __future__ import annotations

import torch

from fastnabla.losses.forward_looking import forward_looking_gradient
from fastnabla.training.interface import DiffusionTask, select_cond
from fastnabla.training.objective import NablaGFNOptions, forward_looking_kwargs
from fastnabla.training.trajectories import Trajectories

Tensor = torch.Tensor


def state_forward_looking(
    task: DiffusionTask, traj: Trajectories, opts: NablaGFNOptions, chunk: int = 8192
) -> Tensor:
    """FL gradient at every state of every trajectory, ``[N, T+1, ...]`` (constant)."""
    mdp = task.mdp
    n, T = traj.num, traj.num_steps
    shape = tuple(traj.states.shape[2:])
    states = traj.states.reshape(n * (T + 1), *shape)
    state_idx = torch.arange(T + 1).repeat(n)
    rows = torch.arange(n).repeat_interleave(T + 1)
    fl_eps = task.policy_eps if opts.fl_model == "policy" else task.reference_eps
    out = torch.empty_like(states)
    for i in range(0, states.shape[0], chunk):
        x, s = states[i : i + chunk], state_idx[i : i + chunk]
        cond = select_cond(traj.cond, rows[i : i + chunk])
        terminal = s == T
        step = s.clamp(max=T - 1).to(x.device)
        ab = mdp.gather(step, x.ndim, x.dtype)["alpha_bar"]
        out[i : i + chunk] = forward_looking_gradient(
            x, ab, terminal.to(x.device), lambda y, st=step, c=cond: fl_eps(y, st, c),
            lambda img, c=cond: task.log_reward(img, c), decode=task.decode, **forward_looking_kwargs(opts),
        )
    return out.reshape(n, T + 1, *shape)


@torch.no_grad()
def pathwise_flow_targets(
    task: DiffusionTask, traj: Trajectories, fl: Tensor, td_lambda: float
) -> Tensor:
    """``G_t`` for ``t = 0 .. T-1`` (``[N, T, ...]``) by one backward sweep over each trajectory.

    Args:
        fl: forward-looking gradients at every state, ``[N, T+1, ...]``
            (:func:`state_forward_looking`); ``fl[:, T]`` is ``beta grad log R(x_T)``.
        td_lambda: ``lambda`` in ``[0, 1]``.
    """
    if not 0.0 <= td_lambda <= 1.0:
        raise ValueError(f"td_lambda must be in [0, 1], got {td_lambda}")
    mdp = task.mdp
    n, T = traj.num, traj.num_steps
    states = traj.states
    targets = torch.empty_like(traj.eps_old)
    G = fl[:, T]
    for t in range(T - 1, -1, -1):
        x_next = states[:, t + 1]
        if t == T - 1:
            u = G
        else:
            step_next = torch.full((n,), t + 1, dtype=torch.int64, device=x_next.device)
            h_next = fl[:, t + 1] + task.flow(x_next, step_next, traj.cond)
            u = (1 - td_lambda) * h_next + td_lambda * G
        step = torch.full((n,), t, dtype=torch.int64, device=x_next.device)
        c = mdp.gather(step, u.ndim, u.dtype)
        with torch.enable_grad():
            x_in = states[:, t].detach().requires_grad_(True)
            eps = task.reference_eps(x_in, step, traj.cond)
            (vjp,) = torch.autograd.grad(eps, x_in, grad_outputs=u)
        G = c["a"] * u + c["b"] * vjp
        targets[:, t] = G
    return targets
