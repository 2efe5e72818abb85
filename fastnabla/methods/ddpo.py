"""DDPO (Black et al. 2023, "Training diffusion models with reinforcement learning"), PPO-clip variant.

The denoising MDP's transitions are Gaussian, ``P_F(x_{t+1}|x_t) = N(a_t x_t + b_t eps_theta(x_t), sigma_t^2 I)``,
so their log-likelihoods are exact. For a batch sampled with the current policy (``eps_old`` recorded at
sampling time), each transition's loss is the clipped surrogate of PPO (DDPO eq. for ``DDPO_IS``)::

    r_t = exp(log P_F^theta(x_{t+1}|x_t) - log P_F^old(x_{t+1}|x_t))
    L_t = max(-A r_t, -A clip(r_t, 1 - eps, 1 + eps))

with the trajectory's advantage ``A = clip((log R - mean) / (std + 1e-6), -A_max, A_max)`` normalised per
prompt by DDPO's per-prompt stat tracker (:class:`PerPromptStatTracker`): each prompt keeps a buffer of its last
``buffer_size`` rewards across iterations (this batch's included); a prompt whose buffer holds fewer than
``min_count`` rewards is normalised with the whole batch's statistics. Tasks without prompts (the analytic task)
normalise with the batch's statistics, as DDPO without stat tracking. Defaults are DDPO's released settings:
clip range 1e-4, advantages clipped at 5, buffer 16 and min count 16, log-likelihoods averaged over latent
elements (``log_prob_reduction='mean'``), lr 3e-4 (preset). The buffers are saved in checkpoints. Difference from
the release: the reward is the task's ``log R`` (the raw score for rewards with the ``exp`` transform).

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


class PerPromptStatTracker:
    """Per-prompt reward statistics over a buffer that persists across iterations (DDPO's stat tracker).

    ``advantages(r, groups)`` first appends each prompt's rewards of this batch to its buffer (the last
    ``buffer_size`` kept), then normalises them with the buffer's mean and population std, or with the whole
    batch's when the buffer holds fewer than ``min_count`` rewards; ``(r - mean) / (std + 1e-6)``.
    """

    def __init__(self, buffer_size: int, min_count: int):
        if buffer_size < 1 or min_count < 1:
            raise ValueError(f"buffer_size and min_count must be >= 1, got {buffer_size} and {min_count}")
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[str, list[float]] = {}

    def advantages(self, log_reward: Tensor, groups: list[str]) -> Tensor:
        r = log_reward.detach().double().cpu()
        if r.numel() != len(groups):
            raise ValueError(f"{r.numel()} rewards but {len(groups)} group keys")
        adv = torch.empty_like(r)
        batch_mean, batch_std = r.mean(), r.std(unbiased=False)
        for key in dict.fromkeys(groups):
            idx = torch.tensor([i for i, g in enumerate(groups) if g == key])
            buffer = (self.buffers.get(key, []) + r[idx].tolist())[-self.buffer_size:]
            self.buffers[key] = buffer
            if len(buffer) >= self.min_count:
                pool = torch.tensor(buffer, dtype=torch.float64)
                mean, std = pool.mean(), pool.std(unbiased=False)
            else:
                mean, std = batch_mean, batch_std
            adv[idx] = (r[idx] - mean) / (std + 1e-6)
        return adv

    def state(self) -> dict[str, list[float]]:
        return {k: list(v) for k, v in self.buffers.items()}

    def load_state(self, state: dict[str, list[float]]) -> None:
        self.buffers = {str(k): [float(x) for x in v] for k, v in state.items()}


def batch_advantages(log_reward: Tensor) -> Tensor:
    """``(r - mean) / (std + 1e-6)`` with the batch's mean and population std (no prompts to group by)."""
    r = log_reward.detach().double().cpu()
    return (r - r.mean()) / (r.std(unbiased=False) + 1e-6)


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
        self.tracker = PerPromptStatTracker(opts.buffer_size, opts.min_count)

    def prepare(
        self, task: DiffusionTask, traj: Trajectories, plan: TransitionPlan, key: tuple[int, int], chunk: int
    ) -> tuple[dict, dict[str, Tensor]]:
        """Per-trajectory advantages, broadcast over steps as the step extra ``advantage``."""
        index, log_r, groups = _gather_global(traj.index, traj.log_reward, prompt_groups(traj.cond, traj.num))
        prompted = any(groups)
        adv = self.tracker.advantages(log_r, groups) if prompted else batch_advantages(log_r)
        adv = adv.clamp(-self.opts.adv_clip_max, self.opts.adv_clip_max)
        position = torch.searchsorted(index, traj.index.cpu())
        local = adv[position].float().to(traj.states.device)
        return {}, {"advantage": local[:, None].expand(traj.num, traj.num_steps)}

    def state(self) -> dict:
        """The per-prompt reward buffers (checkpointed: a resumed run normalises as an uninterrupted one)."""
        return {"prompt_buffers": self.tracker.state()}

    def load_state(self, state: dict) -> None:
        self.tracker.load_state(state.get("prompt_buffers", {}))

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
