"""Residual DB (paper eq. 20) and DAG-DB as transition objectives of the shared trainer.

Both enforce detailed balance in log space, per stored transition ``x_t -> x_{t+1}``, with a forward-looking
scalar log-flow (Zhang et al. 2024, "Improving GFlowNets for text-to-image diffusion alignment")::

    log F(x_s) = beta gamma_s log R(decode(x_hat(x_s))) + g_phi(x_s, s, c),     log F(x_T) = beta log R(x_T)

* ``residual-db`` (nabla-GFlowNet paper eq. 20, the DB form of eq. 50 with both flow ends; target p# R^beta):
  ``L = (log F(x_t) + log P_F(x_{t+1}|x_t) - eta_p log P_F#(x_{t+1}|x_t) - log F(x_{t+1}))^2``
  (:func:`fastnabla.losses.residual_db.residual_db_loss`);
* ``dag-db`` (the DAG paper's DB with the VP noising step as backward policy; target R^beta, no prior):
  ``L = (log F(x_t) + log P_F(x_{t+1}|x_t) - log P_B(x_t|x_{t+1}) - log F(x_{t+1}))^2``
  (:func:`fastnabla.losses.dag_db.dag_db_loss`, :func:`fastnabla.losses.dag_db.noising_log_prob`).

Plus the output regulariser ``lambda ||eps_theta(x_t) - eps_old(x_t)||^2`` (element mean; paper section 4.3:
``lambda = 1``, lr 3e-4 for both). The loss trains the policy through ``log P_F`` and the flow through both
``g_phi`` ends; the forward-looking terms are constants, computed once per pass and per *state* that the plan
touches (``x_hat`` from the policy at the start of the pass, or from the pretrained model).
``method.db.log_prob_reduction='mean'`` divides every log-density by the number of latent elements, as the DAG-DB
release does (which tempers the DB condition); the default ``'sum'`` keeps the exact densities.
"""

from __future__ import annotations

import torch
from torch import nn

from fastnabla.losses.dag_db import dag_db_loss, noising_log_prob
from fastnabla.losses.residual_db import forward_looking_log_flow, residual_db_loss
from fastnabla.mdp.gaussian_policy import transition_log_prob, tweedie_x0
from fastnabla.methods.options import DBOptions
from fastnabla.ops.forward_looking import gamma_schedule
from fastnabla.training.interface import DiffusionTask, ObjectiveDefaults, select_cond
from fastnabla.training.plan import StateTable, TransitionPlan
from fastnabla.training.trajectories import Trajectories, TransitionBatch

Tensor = torch.Tensor
DB_VARIANTS = ("residual-db", "dag-db")


def _elem_mean(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).mean(dim=1)


def state_alpha_bar(task: DiffusionTask, state: Tensor) -> Tensor:
    """``abar`` of states ``s = 0 .. T`` (``[B]`` fp32): the step's ``abar_s`` and ``abar_T`` at the end."""
    mdp = task.mdp
    table = torch.cat([mdp.alpha_bar, mdp.alpha_bar_next[-1:]]).float()
    return table[state.cpu()].to(state.device)


@torch.no_grad()
def xhat_log_reward_table(
    task: DiffusionTask, traj: Trajectories, mask: Tensor, fl_model: str = "policy", chunk: int = 8192
) -> StateTable:
    """``log R(decode(x_hat(x_s)))`` (fp32) at the states of ``traj`` selected by ``mask`` (``[N, T+1]`` bool).

    ``x_hat(x_s) = (x_s - sqrt(1 - abar_s) eps(x_s)) / sqrt(abar_s)`` with ``eps`` of the policy or the
    pretrained model at step ``s``; the terminal state uses the stored ``log R(x_T)``."""
    T = traj.num_steps
    rows, states = mask.cpu().nonzero(as_tuple=True)
    eps_fn = task.policy_eps if fl_model == "policy" else task.pretrained_eps
    values = torch.empty(rows.numel(), dtype=torch.float32, device=traj.log_reward.device)
    for i in range(0, rows.numel(), chunk):
        r, s = rows[i : i + chunk], states[i : i + chunk]
        out = torch.empty(r.numel(), dtype=torch.float32, device=values.device)
        end = s == T
        if bool(end.any()):
            out[end.to(out.device)] = traj.log_reward[r[end].to(traj.log_reward.device)].float()
        inner = ~end
        if bool(inner.any()):
            ri, si = r[inner], s[inner]
            x = traj.states[ri.to(traj.states.device), si.to(traj.states.device)].float()
            step = si.to(x.device)
            cond = select_cond(traj.cond, ri)
            ab = task.mdp.gather(step, x.ndim, torch.float32)["alpha_bar"]
            x_hat = tweedie_x0(x, eps_fn(x, step, cond).float(), ab)
            out[inner.to(out.device)] = task.log_reward(task.decode(x_hat), cond).float()
        values[i : i + chunk] = out
    return StateTable.build(mask.cpu(), values)


def step_log_prob(task: DiffusionTask, x_t: Tensor, x_next: Tensor, eps: Tensor, step: Tensor) -> Tensor:
    """``log P_F(x_{t+1}|x_t) = log N(x_{t+1}; a_t x_t + b_t eps, sigma_t^2 I)`` summed per sample, in fp64
    (``[B]``): the DB and PPO losses take differences of log-densities whose large parts cancel, which fp32
    would round away at the late, low-noise steps."""
    c = task.mdp.gather(step, x_t.ndim, torch.float64)
    return transition_log_prob(x_next.double(), c["a"] * x_t.double() + c["b"] * eps.double(), c["sigma"])


def log_density(log_prob: Tensor, numel: int, reduction: str) -> Tensor:
    """A summed log-density, or its mean per element (``reduction='mean'``)."""
    return log_prob / numel if reduction == "mean" else log_prob


class DBObjective(ObjectiveDefaults):
    """Residual DB or DAG-DB over stored transitions (``name`` in :data:`DB_VARIANTS`).

    Args:
        variant: ``'residual-db'`` or ``'dag-db'``.
        flow: the scalar log-flow network ``g_phi(x, state, cond) -> [B]``, trained with the policy.
        opts: ``method.db``.
        beta: reward temperature ``beta``.
        prior_strength: ``eta_p`` of residual DB.
    """

    trains_flow = True

    def __init__(self, variant: str, flow: nn.Module, opts: DBOptions, beta: float, prior_strength: float = 1.0):
        if variant not in DB_VARIANTS:
            raise ValueError(f"DB variant {variant!r} is not one of {DB_VARIANTS}")
        opts.validate()
        self.name = variant
        self.module = flow
        self.opts = opts
        self.beta = float(beta)
        self.prior_strength = float(prior_strength)

    def prepare(
        self, task: DiffusionTask, traj: Trajectories, plan: TransitionPlan, key: tuple[int, int], chunk: int
    ) -> tuple[dict[str, StateTable], dict[str, Tensor]]:
        """The forward-looking ``log R(x_hat)`` at every state the plan touches (``logr_t``, ``logr_next``)."""
        return {"logr": xhat_log_reward_table(task, traj, plan.needed_states, self.opts.fl_model, chunk)}, {}

    def loss(
        self, task: DiffusionTask, batch: TransitionBatch, key: tuple[int, int]
    ) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor | None]]]:
        o = self.opts
        T = task.mdp.num_steps
        x_t, x_next, step, cond = batch.x_t.float(), batch.x_next.float(), batch.step, batch.cond
        numel = x_t[0].numel()
        terminal = step == T - 1

        eps = task.policy_eps(x_t, step, cond).float()
        log_pf = log_density(step_log_prob(task, x_t, x_next, eps, step), numel, o.log_prob_reduction)

        gamma_t = gamma_schedule(state_alpha_bar(task, step), o.gamma)
        gamma_next = gamma_schedule(state_alpha_bar(task, step + 1), o.gamma)
        flow_t = self.module(x_t, step, cond)
        flow_next = self.module(x_next, step + 1, cond)
        log_flow_t = forward_looking_log_flow(
            batch.extras["logr_t"], gamma_t, self.beta, flow_t, torch.zeros_like(terminal)
        )
        log_flow_next = forward_looking_log_flow(batch.extras["logr_next"], gamma_next, self.beta, flow_next, terminal)

        if self.name == "residual-db":
            with torch.no_grad():
                eps_pretrained = task.pretrained_eps(x_t, step, cond).float()
                log_pf_pretrained = log_density(step_log_prob(task, x_t, x_next, eps_pretrained, step), numel,
                                                o.log_prob_reduction)
            loss_db = residual_db_loss(
                log_pf=log_pf, log_pf_pretrained=log_pf_pretrained, log_flow_t=log_flow_t, log_flow_next=log_flow_next,
                prior_strength=self.prior_strength,
            )
        else:
            c = task.mdp.gather(step, x_t.ndim, torch.float64)
            log_pb = log_density(
                noising_log_prob(x_t.double(), x_next.double(), c["alpha_bar"], c["alpha_bar_next"]), numel,
                o.log_prob_reduction,
            )
            loss_db = dag_db_loss(log_pf=log_pf, log_pb=log_pb, log_flow_t=log_flow_t, log_flow_next=log_flow_next)

        loss_reg = _elem_mean((eps - batch.eps_old.float()) ** 2)
        total = loss_db + o.output_reg * loss_reg.double()
        info = {
            "loss": (total.detach(), None),
            "loss_db": (loss_db.detach(), None),
            "loss_output_reg": (loss_reg.detach(), None),
            "log_flow_t": (log_flow_t.detach(), None),
            "flow_t": (flow_t.detach(), None),
        }
        return total, info
