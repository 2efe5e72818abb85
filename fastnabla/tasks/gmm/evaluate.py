"""Evaluation of a sampler on the analytic task against the closed-form target.

Every sampler is scored by the same function (:func:`score_samples`): the fine-tuned and pretrained samplers
(:func:`evaluate_sampler`), and two references drawn exactly from mixtures (:func:`evaluate_mixture`) -- the
*reweight-only* sampler (:func:`reweight_only_mixture`: the target's mode weights on the pretrained model's
untilted components, mode-weight TV 0 by construction) and the target itself (the sampling floor of every metric
at the evaluation's sample sizes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastnabla.tasks.gmm.metrics import energy_distance, mode_shape, mode_weights, total_variation
from fastnabla.tasks.gmm.mixture import GaussianMixture
from fastnabla.tasks.gmm.model import GMMTask
from fastnabla.training.trajectories import sample_trajectories

Tensor = torch.Tensor

SHAPE_METRICS = ("mean_error", "mean_error_max", "std_ratio_mean", "std_ratio_worst")


@dataclass
class SamplerEvaluation:
    samples: Tensor  # [N, d] final states x_T
    mode_weights: Tensor  # [K]
    tv_to_target: float
    mean_log_reward: float
    energy_distance: float | None
    shape: dict[str, float] = field(default_factory=dict)  # SHAPE_METRICS (metrics.ModeShape.summary)
    mean_error_per_mode: list[float] = field(default_factory=list)  # kept target modes, in target order
    std_ratio_per_mode: list[list[float]] = field(default_factory=list)  # [K'][d]

    def scalars(self) -> dict[str, float | None]:
        """The scalar metrics by name (``tv_to_target``, ``mean_log_reward``, ``energy_distance`` and the shape)."""
        return {"tv_to_target": self.tv_to_target, "mean_log_reward": self.mean_log_reward,
                "energy_distance": self.energy_distance, **self.shape}


def score_samples(task: GMMTask, x: Tensor, log_reward: Tensor, target_samples: Tensor | None = None
                  ) -> SamplerEvaluation:
    """Score samples ``x`` ``[N, d]`` with their log-rewards: mode weights and TV, mean log R, mode shape, and the
    energy distance of the first ``len(target_samples)`` samples to ``target_samples`` (skipped when None)."""
    x = x.double()
    w = mode_weights(x, task.target)
    shape = mode_shape(x, task.target)
    ed = None if target_samples is None else energy_distance(x[: len(target_samples)], target_samples)
    return SamplerEvaluation(
        samples=x,
        mode_weights=w,
        tv_to_target=total_variation(w, task.target.weights),
        mean_log_reward=float(log_reward.double().mean()),
        energy_distance=ed,
        shape=shape.summary(),
        mean_error_per_mode=shape.mean_error.tolist(),
        std_ratio_per_mode=shape.std_ratio.tolist(),
    )


def evaluate_sampler(
    task: GMMTask,
    num_samples: int,
    seed: int,
    use_pretrained: bool = False,
    target_samples: Tensor | None = None,
) -> SamplerEvaluation:
    """Sample ``num_samples`` trajectories (policy or pretrained) and score them.

    The energy distance is computed against ``target_samples`` (exact draws from the target) on
    the first ``len(target_samples)`` samples, or skipped when they are not given.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        traj = sample_trajectories(task, num_samples, gen, use_pretrained=use_pretrained)
    return score_samples(task, traj.states[:, -1], traj.log_reward, target_samples)


def reweight_only_mixture(task: GMMTask) -> GaussianMixture:
    """The *reweight-only* reference: the target's mode weights on the pretrained sampler's (untilted) components.

    It has the target's mode weights exactly (TV 0 by construction), so only the shape metrics can tell it from
    the target."""
    return GaussianMixture(task.prior.means.clone(), task.prior.stds.clone(), task.target.weights.clone())


def evaluate_mixture(task: GMMTask, mixture: GaussianMixture, num_samples: int, seed: int,
                     target_samples: Tensor | None = None) -> SamplerEvaluation:
    """Exact draws from ``mixture`` scored as a sampler's (the reweight-only reference, or the target itself)."""
    y, _ = mixture.sample(num_samples, torch.Generator().manual_seed(seed))
    return score_samples(task, y, task.reward.log_reward(y), target_samples)


def target_reference(task: GMMTask, num_samples: int, seed: int) -> tuple[Tensor, float]:
    """Exact target samples and the target's mean log-reward (Monte Carlo on those samples)."""
    gen = torch.Generator().manual_seed(seed)
    y, _ = task.target.sample(num_samples, gen)
    return y, float(task.reward.log_reward(y).mean())
