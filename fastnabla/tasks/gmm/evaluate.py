"""Evaluation of a sampler on the analytic task against the closed-form target."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastnabla.tasks.gmm.metrics import energy_distance, mode_weights, total_variation
from fastnabla.tasks.gmm.model import GMMTask
from fastnabla.training.trajectories import sample_trajectories

Tensor = torch.Tensor


@dataclass
class SamplerEvaluation:
    samples: Tensor  # [N, d] final states x_T
    mode_weights: Tensor  # [K]
    tv_to_target: float
    mean_log_reward: float
    energy_distance: float | None


def evaluate_sampler(
    task: GMMTask,
    num_samples: int,
    seed: int,
    use_reference: bool = False,
    target_samples: Tensor | None = None,
) -> SamplerEvaluation:
    """Sample ``num_samples`` trajectories (policy or pretrained) and score them.

    The energy distance is computed against ``target_samples`` (exact draws from the target) on
    the first ``len(target_samples)`` samples, or skipped when they are not given.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        traj = sample_trajectories(task, num_samples, gen, use_reference=use_reference)
    x = traj.states[:, -1].double()
    w = mode_weights(x, task.target)
    ed = None
    if target_samples is not None:
        ed = energy_distance(x[: len(target_samples)], target_samples)
    return SamplerEvaluation(
        samples=x,
        mode_weights=w,
        tv_to_target=total_variation(w, task.target.weights),
        mean_log_reward=float(traj.log_reward.double().mean()),
        energy_distance=ed,
    )


def target_reference(task: GMMTask, num_samples: int, seed: int) -> tuple[Tensor, float]:
    """Exact target samples and the target's mean log-reward (Monte Carlo on those samples)."""
    gen = torch.Generator().manual_seed(seed)
    y, _ = task.target.sample(num_samples, gen)
    return y, float(task.reward.log_reward(y).mean())
