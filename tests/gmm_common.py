"""Shared pieces of the trainer tests on a small analytic (gmm) task: its overrides, its config and the trained
parameters as one vector."""

from __future__ import annotations

import torch

from fastnabla.config.loader import build_config
from fastnabla.run.config import RunConfig

SMALL = [
    "sampler.num_steps=6",
    "train.batch_size=8",
    "train.transition_fraction=0.4",
    "train.updates_per_batch=2",
    "gmm.network.hidden=16",
    "gmm.network.layers=2",
    "eval.every=0",
    "eval.num_samples=32",
    "eval.final_num_samples=32",
    "eval.energy_samples=16",
    "output.progress=false",
    "output.figure=false",
]


def small_config(*extra: str) -> RunConfig:
    """The default run config with :data:`SMALL` and ``extra`` overrides."""
    return build_config(RunConfig, None, None, [*SMALL, *extra])


def trainable_params(task) -> torch.Tensor:
    """Policy and flow parameters of ``task``, flattened into one vector."""
    return torch.cat([p.detach().flatten() for p in [*task.policy_parameters(), *task.flow_parameters()]])
