"""DRaFT-K and DRaFT-LV (Clark et al. 2024, "Directly fine-tuning diffusion models on differentiable rewards").

Loss ``-ReLU(log R(decode(x_T)))`` (``relu=True``, paper section 4.3; ``-log R`` otherwise), with the gradient
taken through part of the sampler only:

* ``draft-k``: the last ``K`` steps (default 1) from ``stopgrad(x_{T-K})``, each
  ``x_{t+1} = a_t x_t + b_t eps_theta(x_t, t) + sigma_t z_t`` differentiated w.r.t. the policy *and* ``x_t``,
  with the trajectory's own noise ``z_t`` (recovered from the stored transition,
  :func:`fastnabla.methods.rollout.replay_noise`);
* ``draft-lv``: the final sample ``x_T`` (detached) is noised back to the level of the last step's input and
  denoised by that step with the policy, ``n`` times (``method.draft.lv_samples``, default 2), and the rewards
  are averaged::

      x'  = sqrt(abar_{T-1} / abar_T) stopgrad(x_T) + sqrt(1 - abar_{T-1} / abar_T) z1
      x'' = a_{T-1} x' + b_{T-1} eps_theta(x', T-1) + sigma_{T-1} z2,      L = -mean_n ReLU(log R(decode(x'')))

  (``z1, z2`` keyed by ``("draft-lv", iteration, trajectory)``).

Both train on this iteration's on-policy trajectories, whose stored states are the no-grad part of the rollout.
"""

from __future__ import annotations

import torch

from fastnabla.methods.options import DRaFTOptions
from fastnabla.methods.rollout import keyed_trajectory_normal, maximised_reward, repeat_cond, replay_noise
from fastnabla.training.interface import DiffusionTask, ObjectiveDefaults
from fastnabla.training.trajectories import Trajectories

Tensor = torch.Tensor
DRAFT_VARIANTS = ("draft-k", "draft-lv")


def lv_noise(seed: int, iteration: int, index: Tensor, num_samples: int, shape: tuple[int, ...]) -> Tensor:
    """DRaFT-LV's draws ``[n, 2, N, *shape]`` (``[:, 0]`` noising, ``[:, 1]`` the denoising step's noise)."""
    draws = keyed_trajectory_normal(seed, "draft-lv", iteration, index, (num_samples, 2, *shape))
    return draws.permute(1, 2, 0, *range(3, draws.ndim))


class DRaFTObjective(ObjectiveDefaults):
    """DRaFT-K (``variant='draft-k'``) or DRaFT-LV (``variant='draft-lv'``) as a rollout objective."""

    trains_flow = False
    on_policy = True
    per_trajectory = True

    def __init__(self, variant: str, opts: DRaFTOptions):
        if variant not in DRAFT_VARIANTS:
            raise ValueError(f"DRaFT variant {variant!r} is not one of {DRAFT_VARIANTS}")
        opts.validate()
        self.name = variant
        self.opts = opts

    def final_states(self, task: DiffusionTask, traj: Trajectories, key: tuple[int, int]) -> Tensor:
        """The differentiable final states: ``[N, ...]`` (draft-k) or ``[n N, ...]`` copy-major (draft-lv)."""
        mdp, T, n = task.mdp, traj.num_steps, traj.num
        dev = traj.states.device
        if self.name == "draft-k":
            k = min(self.opts.k, T)
            x = traj.states[:, T - k].float()
            for t in range(T - k, T):
                step = torch.full((n,), t, dtype=torch.int64, device=dev)
                c = mdp.gather(step, x.ndim, torch.float32)
                x = c["a"] * x + c["b"] * task.policy_eps(x, step, traj.cond).float() + replay_noise(
                    traj.states, traj.eps_old, mdp, t
                )
            return x
        m = self.opts.lv_samples
        seed, iteration = key
        z = lv_noise(seed, iteration, traj.index, m, tuple(traj.states.shape[2:])).to(dev)  # [m, 2, N, ...]
        ratio = float(mdp.alpha_bar[T - 1] / mdp.alpha_bar_next[T - 1])
        x_end = traj.states[:, T].float()
        x = (ratio**0.5 * x_end + (1 - ratio) ** 0.5 * z[:, 0]).flatten(0, 1)  # [m N, ...]
        step = torch.full((m * n,), T - 1, dtype=torch.int64, device=dev)
        c = mdp.gather(step, x.ndim, torch.float32)
        eps = task.policy_eps(x, step, repeat_cond(traj.cond, n, m)).float()
        return c["a"] * x + c["b"] * eps + c["sigma"] * z[:, 1].flatten(0, 1)

    def loss(
        self, task: DiffusionTask, traj: Trajectories, key: tuple[int, int]
    ) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor | None]]]:
        x = self.final_states(task, traj, key)
        copies = x.shape[0] // traj.num
        cond = traj.cond if copies == 1 else repeat_cond(traj.cond, traj.num, copies)
        log_r = task.log_reward(task.decode(x), cond).float()
        gain = maximised_reward(log_r, self.opts.relu).reshape(copies, traj.num).mean(0)
        loss = -gain
        info = {
            "loss": (loss.detach(), None),
            "log_reward_tail": (log_r.detach().reshape(copies, traj.num).mean(0), None),
        }
        return loss, info
