"""Sampling trajectories from the current policy and choosing which transitions to train on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fastnabla.mdp.gaussian_policy import denoise_step
from fastnabla.training.interface import DiffusionTask, select_cond

Tensor = torch.Tensor


@dataclass
class Trajectories:
    """``N`` sampled trajectories of a ``T``-step sampler."""

    states: Tensor  # [N, T+1, ...]  x_0 (noise) .. x_T (sample)
    eps_old: Tensor  # [N, T, ...]   eps of the sampling policy at each x_t (output regulariser)
    cond: Any  # per-trajectory conditioning or None
    log_reward: Tensor  # [N] log R(decode(x_T))

    @property
    def num(self) -> int:
        return int(self.states.shape[0])

    @property
    def num_steps(self) -> int:
        return int(self.eps_old.shape[1])


@torch.no_grad()
def sample_trajectories(
    task: DiffusionTask,
    n: int,
    generator: torch.Generator | None = None,
    cond: Any = None,
    storage_dtype: torch.dtype | None = None,
    use_reference: bool = False,
) -> Trajectories:
    """Run the sampler of ``task.mdp`` from ``n`` noise draws with the policy (or the reference).

    ``cond`` defaults to ``task.sample_conditions(n)``.
    """
    mdp = task.mdp
    cond = task.sample_conditions(n, generator) if cond is None else cond
    x = task.initial_noise(n, generator)
    dtype = storage_dtype or x.dtype
    states = torch.empty((n, mdp.num_steps + 1) + tuple(x.shape[1:]), dtype=dtype, device=x.device)
    eps_old = torch.empty((n, mdp.num_steps) + tuple(x.shape[1:]), dtype=dtype, device=x.device)
    states[:, 0] = x
    eps_fn = task.reference_eps if use_reference else task.policy_eps
    for t in range(mdp.num_steps):
        step = torch.full((n,), t, dtype=torch.int64, device=x.device)
        c = mdp.gather(step, x.ndim, x.dtype)
        eps = eps_fn(x, step, cond)
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        x = denoise_step(x, eps, c["a"], c["b"], c["sigma"], noise)
        states[:, t + 1] = x
        eps_old[:, t] = eps
    log_r = task.log_reward(task.decode(x), cond).detach()
    return Trajectories(states, eps_old, cond, log_r)


def stratified_steps(
    num_trajectories: int,
    num_steps: int,
    fraction: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per trajectory, one uniformly drawn step in each of ``k`` equal chunks plus the terminal step.

    ``k = max(1, round(fraction * T))``; with ``fraction >= 1`` every step is returned. The last
    transition (ending at ``x_T``) is always included, as in the paper (section 4.3). Returns
    int64 ``[N, m]`` with distinct steps per row.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"transition fraction must be in (0, 1], got {fraction}")
    T = num_steps
    if fraction >= 1 or T == 1:
        return torch.arange(T).expand(num_trajectories, T).clone()
    k = max(1, min(T - 1, round(fraction * T)))
    # chunk boundaries over steps 0..T-2 (the terminal step T-1 is added separately)
    edges = torch.linspace(0, T - 1, k + 1).round().long()
    lo, hi = edges[:-1], edges[1:]
    u = torch.rand(num_trajectories, k, generator=generator)
    picks = lo + (u * (hi - lo)).floor().long().clamp(max=(hi - lo - 1).clamp(min=0))
    terminal = torch.full((num_trajectories, 1), T - 1, dtype=torch.int64)
    return torch.cat([picks, terminal], dim=1)


@dataclass
class TransitionBatch:
    """A flat batch of transitions ``x_t -> x_{t+1}`` drawn from stored trajectories."""

    x_t: Tensor
    x_next: Tensor
    step: Tensor  # int64 [B]
    eps_old: Tensor
    cond: Any
    extras: dict[str, Tensor] = field(default_factory=dict)  # precomputed per-transition tensors

    def __len__(self) -> int:
        return int(self.step.shape[0])

    def split(self, num_chunks: int) -> list[TransitionBatch]:
        idx = torch.arange(len(self)).chunk(num_chunks)
        return [
            TransitionBatch(
                self.x_t[i], self.x_next[i], self.step[i], self.eps_old[i], select_cond(self.cond, i),
                {k: v[i] for k, v in self.extras.items()},
            )
            for i in idx
        ]


def gather_transitions(
    traj: Trajectories,
    steps: Tensor,
    shuffle_generator: torch.Generator | None = None,
    state_extras: dict[str, Tensor] | None = None,
    step_extras: dict[str, Tensor] | None = None,
) -> TransitionBatch:
    """Flatten the chosen ``steps`` (``[N, m]``) of each trajectory into one shuffled batch.

    ``state_extras`` (``[N, T+1, ...]`` per name) are gathered at both ends of each transition as
    ``name_t`` and ``name_next``; ``step_extras`` (``[N, T, ...]``) at the transition's step.
    """
    n, m = steps.shape
    rows = torch.arange(n).repeat_interleave(m)
    cols = steps.reshape(-1)
    perm = torch.randperm(rows.numel(), generator=shuffle_generator)
    rows, cols = rows[perm], cols[perm]
    dev = traj.states.device
    r, c = rows.to(dev), cols.to(dev)
    extras = {}
    for name, v in (state_extras or {}).items():
        extras[f"{name}_t"], extras[f"{name}_next"] = v[r, c], v[r, c + 1]
    for name, v in (step_extras or {}).items():
        extras[name] = v[r, c]
    return TransitionBatch(
        x_t=traj.states[r, c],
        x_next=traj.states[r, c + 1],
        step=c,
        eps_old=traj.eps_old[r, c],
        cond=select_cond(traj.cond, rows),
        extras=extras,
    )
