"""DDPO (Black et al. 2023, "Training diffusion models with reinforcement learning"), PPO-clip variant.

The denoising MDP's transitions are Gaussian, ``P_F(x_{t+1}|x_t) = N(a_t x_t + b_t eps_theta(x_t), sigma_t^2 I)``,
so their log-likelihoods are exact. For a batch sampled with the current policy (``eps_old`` recorded at
sampling time), each transition's loss is the clipped surrogate of PPO (DDPO eq. for ``DDPO_IS``)::

    r_t = exp(log P_F^theta(x_{t+1}|x_t) - log P_F^old(x_{t+1}|x_t))
    L_t = max(-A r_t, -A clip(r_t, 1 - eps, 1 + eps))

with the trajectory's advantage ``A = clip((log R - mean) / (std + 1e-6), -A_max, A_max)`` normalised per
prompt (the batch's statistics for prompts with fewer than ``min_count`` samples; the analytic task has no
prompts, so the whole batch is one group). Defaults are DDPO's released settings: clip range 1e-4, advantages
clipped at 5, log-likelihoods averaged over latent elements (``log_prob_reduction='mean'``), lr 3e-4 (preset).
Differences from the release: advantages use the current batch only (no per-prompt buffer carried across
epochs), and the reward is the task's ``log R`` (the raw score for rewards with the ``exp`` transform).

DDPO is on-policy: the trainer hands it the batch it has just sampled (``on_policy = True``), not ``D_prev``.
Under ``torchrun`` the rewards of the whole batch are gathered before normalising, so every process computes the
advantages a single process would.
"""

from __future__ import annotations

import torch
import torch.distributed as tdist

from fastnabla.methods.db import log_density, step_log_prob
from fastnabla.methods.options import DDPOOptions
from fastnabla.training.interface import DiffusionTask, ObjectiveDefaults
from fastnabla.training.plan import TransitionPlan
from fastnabla.training.trajectories import Trajectories, TransitionBatch

Tensor = torch.Tensor


def prompt_groups(cond, n: int) -> list[str]:
    """The grouping key of each trajectory: its prompt, or one group for unconditional tasks."""
    if isinstance(cond, dict) and "prompts" in cond:
        return [str(p) for p in cond["prompts"]]
    return [""] * n


def per_prompt_advantages(log_reward: Tensor, groups: list[str], min_count: int, clip: float) -> Tensor:
    """``clip((r - mean_g) / (std_g + 1e-6), -clip, clip)`` per group ``g`` (population std, as DDPO's numpy);
    groups with fewer than ``min_count`` members use the whole batch's mean and std. fp64 ``[N]``."""
    r = log_reward.detach().double().cpu()
    if r.numel() != len(groups):
        raise ValueError(f"{r.numel()} rewards but {len(groups)} group keys")
    adv = torch.empty_like(r)
    batch_mean, batch_std = r.mean(), r.std(unbiased=False)
    for key in dict.fromkeys(groups):
        idx = torch.tensor([i for i, g in enumerate(groups) if g == key])
        if idx.numel() >= min_count:
            mean, std = r[idx].mean(), r[idx].std(unbiased=False)
        else:
            mean, std = batch_mean, batch_std
        adv[idx] = (r[idx] - mean) / (std + 1e-6)
    return adv.clamp(-clip, clip)


def _gather_global(index: Tensor, log_reward: Tensor, groups: list[str]) -> tuple[Tensor, Tensor, list[str]]:
    """The whole batch's ``(index, log R, groups)`` ordered by global trajectory id (identity for one process)."""
    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        parts: list = [None] * tdist.get_world_size()
        tdist.all_gather_object(parts, (index.cpu().tolist(), log_reward.detach().cpu().double().tolist(), groups))
        index = torch.tensor([i for p in parts for i in p[0]])
        log_reward = torch.tensor([v for p in parts for v in p[1]], dtype=torch.float64)
        groups = [g for p in parts for g in p[2]]
    order = torch.argsort(index.cpu())
    return index.cpu()[order], log_reward.detach().double().cpu()[order], [groups[i] for i in order.tolist()]


class DDPOObjective(ObjectiveDefaults):
    """PPO-clipped DDPO over the freshly sampled batch."""

    name = "ddpo"
    trains_flow = False
    on_policy = True

    def __init__(self, opts: DDPOOptions):
        opts.validate()
        self.opts = opts

    def prepare(
        self, task: DiffusionTask, traj: Trajectories, plan: TransitionPlan, key: tuple[int, int], chunk: int
    ) -> tuple[dict, dict[str, Tensor]]:
        """Per-trajectory advantages, broadcast over steps as the step extra ``advantage``."""
        index, log_r, groups = _gather_global(traj.index, traj.log_reward, prompt_groups(traj.cond, traj.num))
        adv = per_prompt_advantages(log_r, groups, self.opts.min_count, self.opts.adv_clip_max)
        position = torch.searchsorted(index, traj.index.cpu())
        local = adv[position].float().to(traj.states.device)
        return {}, {"advantage": local[:, None].expand(traj.num, traj.num_steps)}

    def loss(
        self, task: DiffusionTask, batch: TransitionBatch, key: tuple[int, int]
    ) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor | None]]]:
        o = self.opts
        x_t, x_next, step = batch.x_t.float(), batch.x_next.float(), batch.step
        numel = x_t[0].numel()
        eps = task.policy_eps(x_t, step, batch.cond).float()
        log_p = log_density(step_log_prob(task, x_t, x_next, eps, step), numel, o.log_prob_reduction)
        with torch.no_grad():
            log_p_old = log_density(step_log_prob(task, x_t, x_next, batch.eps_old, step), numel,
                                    o.log_prob_reduction)
        adv = batch.extras["advantage"].float()
        ratio = torch.exp(log_p - log_p_old)
        loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - o.clip_range, 1.0 + o.clip_range))
        info = {
            "loss": (loss.detach(), None),
            "ratio": (ratio.detach(), None),
            "clip_fraction": (((ratio - 1).abs() > o.clip_range).float().detach(), None),
            "approx_kl": (0.5 * (log_p - log_p_old).detach() ** 2, None),
            "advantage": (adv.detach(), None),
        }
        return loss, info
