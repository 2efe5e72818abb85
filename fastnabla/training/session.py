"""The outer training loop shared by every task: steps, periodic and on-signal checkpoints, resume.

``run_steps`` drives ``trainer.step()`` until ``iterations`` are done or a stop was requested
(SIGTERM/SIGINT, agreed across processes), writing a checkpoint every ``checkpoint_every``
iterations, when stopped, and at the end. Task drivers (``fastnabla.tasks.*.run``) add their own
evaluation and outputs around it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
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
    resume_hint: Path | None = None,
) -> LoopResult:
    """Step ``trainer`` from its current iteration to ``iterations``, with SIGTERM/SIGINT handlers installed.

    ``resume_hint``: the run directory to name (on rank 0, on stderr) in the "continue with --resume"
    message when a signal stops the run.
    """
    stop = stop or StopRequest(trainer.dist)
    with stop.installed():
        result = _loop(trainer, iterations, on_step, checkpoints, checkpoint_every, stop, meta)
    if not result.finished and resume_hint is not None and trainer.dist.is_main:
        where = checkpoints.latest() if checkpoints is not None else "nowhere (no checkpoint manager)"
        print(f"\nstopped by {result.signal} after iteration {result.iteration}; checkpoint in {where}; "
              f"continue with --resume {resume_hint}", file=sys.stderr)
    return result


def _loop(trainer, iterations, on_step, checkpoints, checkpoint_every, stop, meta) -> LoopResult:
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
