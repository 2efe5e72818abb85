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

from collections.abc import Callable

import torch

from fastnabla.training.interface import DiffusionTask, select_cond
from fastnabla.training.trajectories import Trajectories

Tensor = torch.Tensor


@torch.no_grad()
def pathwise_flow_targets(
    task: DiffusionTask, traj: Trajectories, fl: Tensor, td_lambda: float, chunk: int | None = None,
    flow: Callable[[Tensor, Tensor, object], Tensor] | None = None,
) -> Tensor:
    """``G_t`` for ``t = 0 .. T-1`` (``[N, T, ...]``) by one backward sweep over each trajectory.

    Args:
        fl: forward-looking gradients at every state, ``[N, T+1, ...]``
            (:func:`fastnabla.methods.nabla_gfn.fl_states.state_forward_looking`); ``fl[:, T]`` is
            ``beta grad log R(x_T)``.
        td_lambda: ``lambda`` in ``[0, 1]``.
        chunk: trajectories swept together (bounds memory; all at once by default).
        flow: ``g(x_s)`` of the bootstrap, ``(x, state, cond) -> Tensor``; default ``task.flow`` (the live flow;
            :mod:`.flow_average` passes the Polyak-averaged one).
    """
    flow = task.flow if flow is None else flow
    if not 0.0 <= td_lambda <= 1.0:
        raise ValueError(f"td_lambda must be in [0, 1], got {td_lambda}")
    if chunk is not None and chunk < traj.num:
        parts = []
        for lo in range(0, traj.num, chunk):
            rows = torch.arange(lo, min(lo + chunk, traj.num))
            sub = Trajectories(
                traj.states[rows], traj.eps_old[rows], select_cond(traj.cond, rows), traj.log_reward[rows],
                traj.index[rows],
            )
            parts.append(pathwise_flow_targets(task, sub, fl[rows.to(fl.device)], td_lambda, flow=flow))
        return torch.cat(parts)
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
            h_next = fl[:, t + 1] + flow(x_next, step_next, traj.cond)
            u = (1 - td_lambda) * h_next + td_lambda * G
        step = torch.full((n,), t, dtype=torch.int64, device=x_next.device)
        c = mdp.gather(step, u.ndim, u.dtype)
        with torch.enable_grad():
            x_in = states[:, t].detach().requires_grad_(True)
            eps = task.pretrained_eps(x_in, step, traj.cond)
            (vjp,) = torch.autograd.grad(eps, x_in, grad_outputs=u)
        G = c["a"] * u + c["b"] * vjp
        targets[:, t] = G
    return targets
