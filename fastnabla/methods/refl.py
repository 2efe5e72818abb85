"""ReFL (Xu et al. 2023, "ImageReward: learning and evaluating human preferences for text-to-image generation").

Per trajectory, a stop step ``t`` is drawn uniformly from the late steps (paper section 4.3: steps 35..49 of 50,
``method.refl.stop_min/stop_max`` as fractions of ``T``), and the reward of the one-step prediction from the
*detached* state is maximised::

    x_hat = (stopgrad(x_t) - sqrt(1 - abar_t) eps_theta(stopgrad(x_t), t)) / sqrt(abar_t)      (paper eq. 2)
    L     = -ReLU(log R(decode(x_hat)))      (``relu=True``; ``-log R`` otherwise)

so the gradient reaches the policy through one network call at one step. ``stopgrad(x_t)`` is the stored state
of this iteration's on-policy trajectory (the trainer samples the whole trajectory, whose ``x_T`` also gives the
logged reward; ReFL's own sampler stops at ``t``). The stop step is keyed by ``(iteration, trajectory)``.
"""

from __future__ import annotations

import math

import torch

from fastnabla.mdp.gaussian_policy import tweedie_x0
from fastnabla.methods.options import ReFLOptions
from fastnabla.methods.rollout import maximised_reward
from fastnabla.training.interface import DiffusionTask, ObjectiveDefaults
from fastnabla.training.rng import keyed_generator
from fastnabla.training.trajectories import Trajectories

Tensor = torch.Tensor


def stop_step_range(num_steps: int, opts: ReFLOptions) -> tuple[int, int]:
    """Inclusive ``(first, last)`` stop step: ``[floor(stop_min T), ceil(stop_max T) - 1]`` within ``[0, T-1]``."""
    first = min(max(math.floor(opts.stop_min * num_steps + 1e-9), 0), num_steps - 1)
    last = min(max(math.ceil(opts.stop_max * num_steps - 1e-9) - 1, first), num_steps - 1)
    return first, last


def stop_steps(seed: int, iteration: int, index: Tensor, num_steps: int, opts: ReFLOptions) -> Tensor:
    """The stop step of each trajectory (int64 ``[N]``), keyed by ``("refl-stop", iteration, trajectory id)``."""
    first, last = stop_step_range(num_steps, opts)
    draws = [
        torch.randint(first, last + 1, (1,), generator=keyed_generator(seed, "refl-stop", iteration, int(i)))
        for i in index.tolist()
    ]
    return torch.cat(draws) if draws else torch.empty(0, dtype=torch.int64)


class ReFLObjective(ObjectiveDefaults):
    """ReFL as a rollout objective (one loss per trajectory)."""

    name = "refl"
    trains_flow = False
    on_policy = True
    per_trajectory = True

    def __init__(self, opts: ReFLOptions):
        opts.validate()
        self.opts = opts

    def loss(
        self, task: DiffusionTask, traj: Trajectories, key: tuple[int, int]
    ) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor | None]]]:
        seed, iteration = key
        states = traj.states
        stop = stop_steps(seed, iteration, traj.index, traj.num_steps, self.opts).to(states.device)
        x = states[torch.arange(traj.num, device=states.device), stop].float()
        ab = task.mdp.gather(stop, x.ndim, torch.float32)["alpha_bar"]
        x_hat = tweedie_x0(x, task.policy_eps(x, stop, traj.cond).float(), ab)
        log_r = task.log_reward(task.decode(x_hat), traj.cond).float()
        loss = -maximised_reward(log_r, self.opts.relu)
        info = {
            "loss": (loss.detach(), None),
            "log_reward_xhat": (log_r.detach(), None),
            "stop_step": (stop.detach().float(), None),
        }
        return loss, info
