"""Algorithm 1 of the paper as a thin loop over library pieces.

Each iteration samples a fresh batch of trajectories with the current policy and trains on the
*previous* batch (``D_prev``): a stratified subsample of its transitions (terminal always kept),
shuffled and split into ``updates_per_batch`` optimizer steps. Policy and flow parameters have
their own learning rates and their own gradient-norm clipping; one optimizer step per update.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fastnabla.training.interface import DiffusionTask
from fastnabla.training.objective import NablaGFNOptions, nabla_gfn_loss
from fastnabla.training.pathwise import pathwise_flow_targets, state_forward_looking
from fastnabla.training.trajectories import (
    Trajectories,
    gather_transitions,
    sample_trajectories,
    stratified_steps,
)
from fastnabla.utils.profiling import nvtx_range


def _help(text: str, **kw) -> dict:
    return {"metadata": {"help": text}, **kw}


@dataclass
class OptimOptions:
    """Optimizer settings (Adam/AdamW with separate groups for policy and flow)."""

    optimizer: str = field(default="adam", **_help("'adam' or 'adamw'"))
    lr_policy: float = field(default=1e-3, **_help("learning rate of the policy (residual / LoRA)"))
    lr_flow: float = field(default=1e-3, **_help("learning rate of the flow network g_phi"))
    betas: tuple[float, float] = field(default=(0.9, 0.999), **_help("Adam betas"))
    weight_decay: float = field(default=0.0, **_help("weight decay (AdamW: decoupled)"))
    grad_clip_policy: float = field(default=1.0, **_help("max grad norm of the policy (0: off)"))
    grad_clip_flow: float = field(default=1.0, **_help("max grad norm of the flow (0: off)"))
    lr_schedule: str = field(default="constant", **_help("'constant' or 'cosine' (decay to lr_min_ratio)"))
    lr_min_ratio: float = field(default=0.1, **_help("final lr / initial lr of the cosine schedule"))

    def validate(self) -> None:
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"optim.optimizer={self.optimizer!r} is not one of ('adam', 'adamw')")
        for name in ("lr_policy", "lr_flow"):
            if not getattr(self, name) > 0:
                raise ValueError(f"optim.{name} must be > 0, got {getattr(self, name)}")
        for name in ("weight_decay", "grad_clip_policy", "grad_clip_flow"):
            if getattr(self, name) < 0:
                raise ValueError(f"optim.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"optim.lr_schedule={self.lr_schedule!r} is not one of ('constant', 'cosine')")
        if not 0 <= self.lr_min_ratio <= 1:
            raise ValueError(f"optim.lr_min_ratio must be in [0, 1], got {self.lr_min_ratio}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")


def build_optimizer(task: DiffusionTask, opts: OptimOptions) -> torch.optim.Optimizer:
    groups = [
        {"params": list(task.policy_parameters()), "lr": opts.lr_policy, "name": "policy"},
        {"params": list(task.flow_parameters()), "lr": opts.lr_flow, "name": "flow"},
    ]
    groups = [g for g in groups if g["params"]]
    cls = torch.optim.AdamW if opts.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, betas=tuple(opts.betas), weight_decay=opts.weight_decay)


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, opts: OptimOptions, total_updates: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-update multiplier: constant, or cosine from 1 to ``lr_min_ratio`` over ``total_updates``."""
    if opts.lr_schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
    floor = opts.lr_min_ratio

    def cosine(i: int) -> float:
        u = min(i / max(total_updates, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * u))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)


def _clip(params: list[torch.nn.Parameter], max_norm: float) -> float:
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))


class NablaGFNTrainer:
    """Runs Algorithm 1 on any :class:`DiffusionTask`.

    Args:
        task: model + reward behind the interface.
        method: objective options.
        optim: optimizer options.
        batch_size: trajectories sampled per iteration.
        transition_fraction: fraction of each trajectory's transitions trained on (terminal kept).
        updates_per_batch: optimizer steps per sampled batch (the transitions are split evenly).
        seed: seeds sampling and subsampling generators.
        total_iterations: length of the run, for the learning-rate schedule.
    """

    def __init__(
        self,
        task: DiffusionTask,
        method: NablaGFNOptions,
        optim: OptimOptions,
        batch_size: int,
        transition_fraction: float = 1.0,
        updates_per_batch: int = 1,
        seed: int = 0,
        total_iterations: int = 1,
    ):
        method.validate()
        optim.validate()
        self.task = task
        self.method = method
        self.optim_opts = optim
        self.batch_size = batch_size
        self.transition_fraction = transition_fraction
        self.updates_per_batch = updates_per_batch
        self.optimizer = build_optimizer(task, optim)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, optim, total_iterations * updates_per_batch)
        self.generator = torch.Generator().manual_seed(seed)
        self.previous: Trajectories | None = None
        self.iteration = 0
        self._policy_params = list(task.policy_parameters())
        self._flow_params = list(task.flow_parameters())

    def train_on(self, traj: Trajectories) -> dict[str, float]:
        """One pass of updates on stored trajectories; returns averaged diagnostics."""
        steps = stratified_steps(traj.num, traj.num_steps, self.transition_fraction, self.generator)
        with nvtx_range("flow_targets"):
            extras = self._precompute(traj)
        batch = gather_transitions(traj, steps, self.generator, *extras)
        stats: dict[str, float] = {}
        chunks = batch.split(self.updates_per_batch)
        for chunk in chunks:
            self.optimizer.zero_grad(set_to_none=True)
            with nvtx_range("loss"):
                loss, info = nabla_gfn_loss(self.task, chunk, self.method)
            with nvtx_range("backward"):
                loss.backward()
            with nvtx_range("optimizer_step"):
                info["grad_norm_policy"] = _clip(self._policy_params, self.optim_opts.grad_clip_policy)
                info["grad_norm_flow"] = _clip(self._flow_params, self.optim_opts.grad_clip_flow)
                self.optimizer.step()
                self.lr_scheduler.step()
            for k, v in info.items():
                stats[k] = stats.get(k, 0.0) + float(v) / len(chunks)
        return stats

    def _precompute(self, traj: Trajectories) -> tuple[dict, dict]:
        """Per-state FL gradients (once per state, not twice per transition) and pathwise targets.

        FL is precomputed when it does not depend on the parameters being trained (``fl_model=
        'reference'``) or when the pathwise targets need it at every state anyway."""
        m = self.method
        if m.flow == "oracle":
            return {}, {}
        pathwise = m.reverse_target == "pathwise" and m.reverse_scale > 0
        if m.fl_model != "reference" and not pathwise:
            return {}, {}
        fl = state_forward_looking(self.task, traj, m)
        step_extras = {"flow_target": pathwise_flow_targets(self.task, traj, fl, m.td_lambda)} if pathwise else {}
        return {"fl": fl}, step_extras

    def step(self) -> dict[str, float]:
        """Sample ``D_curr``, train on ``D_prev``, then ``D_prev <- D_curr`` (Algorithm 1, l. 5-9)."""
        t0 = time.perf_counter()
        with nvtx_range("sample"):
            current = sample_trajectories(self.task, self.batch_size, self.generator)
        t1 = time.perf_counter()
        stats: dict[str, float] = {}
        if self.previous is not None:
            with nvtx_range("train"):
                stats = self.train_on(self.previous)
        t2 = time.perf_counter()
        self.previous = current
        self.iteration += 1
        stats.update(
            iteration=self.iteration,
            reward_mean=float(current.log_reward.mean()),
            reward_std=float(current.log_reward.std()),
            time_sample=t1 - t0,
            time_train=t2 - t1,
        )
        return stats

    def fit(
        self,
        iterations: int,
        on_step: Callable[[dict[str, float]], None] | None = None,
    ) -> None:
        """Run ``iterations`` steps (the first only fills ``D_prev``), calling ``on_step`` after each."""
        for _ in range(iterations):
            stats = self.step()
            if on_step is not None:
                on_step(stats)
