"""Shared pieces of the trainer tests on a small analytic (gmm) task: its overrides, its config, the trained
parameters as one vector and a checkpoint round trip."""

from __future__ import annotations

import torch

from fastnabla.config.loader import build_config
from fastnabla.run.config import RunConfig
from fastnabla.run.driver import build_trainer
from fastnabla.tasks.gmm.build import build_gmm_task
from fastnabla.training.checkpoint import CheckpointManager

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


def checkpoint_round_trip(cfg: RunConfig, iterations: int, directory):
    """``(interrupted, resumed)``: a trainer of ``cfg`` trained for ``iterations`` and checkpointed into ``directory``,
    and a fresh trainer (fresh networks, other global RNG state) that loaded the checkpoint: what a resumed run
    starts from."""
    first = build_trainer(build_gmm_task(cfg), cfg)
    first.fit(iterations)
    manager = CheckpointManager(directory, keep=1)
    manager.save(first)
    torch.manual_seed(1234)  # a resumed process starts from other global RNG state
    resumed = build_trainer(build_gmm_task(cfg), cfg)  # everything trained comes from the checkpoint
    manager.load(resumed)
    return first, resumed
