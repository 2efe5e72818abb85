"""The outer training loop shared by every task: steps, periodic and on-signal checkpoints, resume.

``run_steps`` drives ``trainer.step()`` until ``iterations`` are done or a stop was requested
(SIGTERM/SIGINT, agreed across processes), writing a checkpoint every ``checkpoint_every``
iterations, when stopped, and at the end. Task drivers (``fastnabla.tasks.*.run``) add their own
evaluation and outputs around it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastnabla.training.checkpoint import CheckpointManager, StopRequest


@dataclass
class LoopResult:
    finished: bool  # False: stopped by a signal before the last iteration
    iteration: int
    signal: str | None = None


def run_steps(
    trainer,
    iterations: int,
    *,
    on_step: Callable[[dict[str, float]], None] | None = None,
    checkpoints: CheckpointManager | None = None,
    checkpoint_every: int = 0,
    stop: StopRequest | None = None,
    meta: dict[str, Any] | None = None,
) -> LoopResult:
    """Step ``trainer`` from its current iteration to ``iterations``."""
    stop = stop or StopRequest(trainer.dist)
    while trainer.iteration < iterations:
        stats = trainer.step()
        if on_step is not None:
            on_step(stats)
        stopping = stop.agreed()
        last = trainer.iteration >= iterations
        due = checkpoint_every > 0 and trainer.iteration % checkpoint_every == 0
        if checkpoints is not None and (due or stopping or last):
            checkpoints.save(trainer, meta)
        if stopping and not last:
            return LoopResult(False, trainer.iteration, stop.signal_name)
    return LoopResult(True, trainer.iteration)
