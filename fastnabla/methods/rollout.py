"""Shared pieces of the rollout objectives (ReFL, DRaFT-K, DRaFT-LV): losses that backpropagate the reward
through (the tail of) a sampling trajectory.

The trainer hands a rollout objective this iteration's freshly sampled trajectories (``on_policy``): their
states are the no-grad part of the rollout, exactly what ReFL and DRaFT detach (``stopgrad(x_t)``). The
differentiable tail is re-run from a stored state with the *same* step noise, recovered from the stored
transition as ``sigma_t z_t = x_{t+1} - a_t x_t - b_t eps_old(x_t)``: on the first update of a pass the replayed
states equal the stored ones, and the gradient is the pathwise (reparametrised) one of the sampler.
"""

from __future__ import annotations

from typing import Any

import torch

from fastnabla.training.interface import select_cond
from fastnabla.training.rng import keyed_normal

Tensor = torch.Tensor


def maximised_reward(log_reward: Tensor, relu: bool) -> Tensor:
    """What a reward maximiser maximises per sample: ``log R``, or ``ReLU(log R)`` (paper section 4.3's
    ``-ReLU(R)`` loss when ``log R`` is the raw score)."""
    return torch.relu(log_reward) if relu else log_reward


def replay_noise(states: Tensor, eps_old: Tensor, mdp, t: int) -> Tensor:
    """``sigma_t z_t`` of step ``t`` of stored trajectories (fp32 ``[N, ...]``): ``x_{t+1} - a_t x_t - b_t eps_old``."""
    n = states.shape[0]
    step = torch.full((n,), t, dtype=torch.int64, device=states.device)
    c = mdp.gather(step, states.ndim - 1, torch.float32)
    return states[:, t + 1].float() - c["a"] * states[:, t].float() - c["b"] * eps_old[:, t].float()


def keyed_trajectory_normal(
    seed: int, purpose: str, iteration: int, index: Tensor, shape: tuple[int, ...]
) -> Tensor:
    """Standard normal draws ``[N, *shape]`` keyed by ``(purpose, iteration, trajectory id)`` (fp32, CPU)."""
    return keyed_normal(seed, [(purpose, iteration, int(i)) for i in index.tolist()], shape)


def repeat_cond(cond: Any, n: int, copies: int) -> Any:
    """Conditioning of ``copies`` stacked copies of a batch of ``n`` (copy-major, ``[copies * n]``)."""
    return select_cond(cond, torch.arange(n).repeat(copies))
