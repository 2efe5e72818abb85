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

The sweep needs the FL gradient ``FL_s`` at every state. When ``x_hat`` comes from the frozen network
(``method.fl_model='pretrained'``), ``FL_t`` (eq. 15, through ``x_hat``'s full Jacobian: one VJP of the frozen
network) and ``J_eps#(x_t)^T u_t`` share the network's input, step and weights, so
:func:`pathwise_targets_and_forward_looking` computes both from one forward of the frozen network at each state
(two VJPs), where a precomputed FL table (:func:`pathwise_flow_targets`) takes two forwards.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastnabla.methods.nabla_gfn.fl_states import fl_noise, forward_looking_fn
from fastnabla.methods.nabla_gfn.options import NablaGFNOptions
from fastnabla.training.interface import DiffusionTask, select_cond
from fastnabla.training.trajectories import Trajectories

Tensor = torch.Tensor
Flow = Callable[[Tensor, Tensor, object], Tensor]

__all__ = ["one_sweep_computes_fl", "pathwise_flow_targets", "pathwise_targets_and_forward_looking"]


def one_sweep_computes_fl(opts: NablaGFNOptions) -> bool:
    """Whether the sweep can compute the FL gradients from its own frozen-network forwards: ``x_hat`` from the frozen
    network (``fl_model='pretrained'``) at every state (``forward_looking='all'``)."""
    return opts.fl_model == "pretrained" and opts.forward_looking != "terminal"


@torch.no_grad()
def pathwise_flow_targets(
    task: DiffusionTask, traj: Trajectories, fl: Tensor, td_lambda: float, chunk: int | None = None,
    flow: Flow | None = None,
) -> Tensor:
    """``G_t`` for ``t = 0 .. T-1`` (``[N, T, ...]``) by one backward sweep over each trajectory, from FL gradients
    computed before.

    Args:
        fl: forward-looking gradients at every state, ``[N, T+1, ...]``
            (:func:`fastnabla.methods.nabla_gfn.fl_states.state_forward_looking`); ``fl[:, T]`` is
            ``beta grad log R(x_T)``.
        td_lambda: ``lambda`` in ``[0, 1]``.
        chunk: trajectories swept together (bounds memory; all at once by default).
        flow: ``g(x_s)`` of the bootstrap, ``(x, state, cond) -> Tensor``; default ``task.flow`` (the live flow;
            :mod:`.flow_average` passes the Polyak-averaged one).
    """
    return _chunked(task, traj, td_lambda, chunk, flow, fl, None, None)[1]


@torch.no_grad()
def pathwise_targets_and_forward_looking(
    task: DiffusionTask, traj: Trajectories, opts: NablaGFNOptions, td_lambda: float, chunk: int | None = None,
    flow: Flow | None = None, noise_key: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """``(FL, G)``: the FL gradients at every state (``[N, T+1, ...]``, as
    :func:`~fastnabla.methods.nabla_gfn.fl_states.forward_looking_table` computes them) and the targets ``G_t``
    (``[N, T, ...]``, as :func:`pathwise_flow_targets`) in one sweep, ``FL_t`` and ``J_eps#(x_t)^T u_t`` from one
    forward of the frozen network at each state (module docstring).

    ``opts`` must take ``x_hat`` from the frozen network (``fl_model='pretrained'``) at every state
    (``forward_looking='all'``); ``noise_key = (seed, iteration)`` keys the smoothing draws per (trajectory, state)
    as the table does. Other arguments as :func:`pathwise_flow_targets`.
    """
    if not one_sweep_computes_fl(opts):
        raise ValueError("one sweep computes the FL gradients only from the frozen network at every state "
                         f"(fl_model='pretrained', forward_looking='all'), got fl_model={opts.fl_model!r}, "
                         f"forward_looking={opts.forward_looking!r}: compute the FL table first")
    return _chunked(task, traj, td_lambda, chunk, flow, None, opts, noise_key)


def _chunked(task, traj, td_lambda, chunk, flow, fl, opts, noise_key) -> tuple[Tensor, Tensor]:
    if not 0.0 <= td_lambda <= 1.0:
        raise ValueError(f"td_lambda must be in [0, 1], got {td_lambda}")
    flow = task.flow if flow is None else flow
    if chunk is None or chunk >= traj.num:
        return _sweep(task, traj, td_lambda, flow, fl, opts, noise_key)
    parts = []
    for lo in range(0, traj.num, chunk):
        rows = torch.arange(lo, min(lo + chunk, traj.num))
        sub = Trajectories(
            traj.states[rows], traj.eps_old[rows], select_cond(traj.cond, rows), traj.log_reward[rows],
            traj.index[rows],
        )
        sub_fl = None if fl is None else fl[rows.to(fl.device)]
        parts.append(_sweep(task, sub, td_lambda, flow, sub_fl, opts, noise_key))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _sweep(task, traj: Trajectories, td_lambda: float, flow: Flow, fl: Tensor | None, opts, noise_key):
    """The backward sweep over ``traj``: ``fl`` given, or (``fl=None``) computed state by state with ``opts``."""
    mdp = task.mdp
    n, T = traj.num, traj.num_steps
    states = traj.states
    dev = states.device
    shape = tuple(states.shape[2:])
    fl_at = None
    if fl is None:
        fl_at = forward_looking_fn(task, opts)
        fl = torch.empty((n, T + 1, *shape), dtype=states.dtype, device=dev)

        def noise(state: int) -> Tensor | None:
            if opts.fl_noise_var <= 0 or noise_key is None:
                return None
            return fl_noise(*noise_key, traj.index, torch.full((n,), state), opts.fl_num_noise, shape)

        last = torch.full((n,), T - 1, dtype=torch.int64, device=dev)  # x_hat(x_T) = x_T: no network runs
        ab_last = mdp.gather(last, states.ndim - 1, states.dtype)["alpha_bar"]
        fl[:, T] = fl_at(states[:, T], last, ab_last, torch.ones(n, dtype=torch.bool, device=dev), traj.cond,
                         noise(T))
    targets = torch.empty_like(traj.eps_old)
    G = fl[:, T]
    for t in range(T - 1, -1, -1):
        x_next = states[:, t + 1]
        if t == T - 1:
            u = G
        else:
            step_next = torch.full((n,), t + 1, dtype=torch.int64, device=dev)
            h_next = fl[:, t + 1] + flow(x_next, step_next, traj.cond)
            u = (1 - td_lambda) * h_next + td_lambda * G
        step = torch.full((n,), t, dtype=torch.int64, device=dev)
        c = mdp.gather(step, u.ndim, u.dtype)
        if fl_at is not None:
            fl[:, t], vjp = fl_at(states[:, t], step, c["alpha_bar"], torch.zeros(n, dtype=torch.bool, device=dev),
                                  traj.cond, noise(t), network_cotangent=u)
        else:
            with torch.enable_grad():
                x_in = states[:, t].detach().requires_grad_(True)
                eps = task.pretrained_eps(x_in, step, traj.cond)
                (vjp,) = torch.autograd.grad(eps, x_in, grad_outputs=u)
        G = c["a"] * u + c["b"] * vjp
        targets[:, t] = G
    return fl, targets
