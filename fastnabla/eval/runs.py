"""Reading Stable Diffusion run directories for evaluation (``python -m fastnabla.train --preset ...`` outputs).

A run directory holds ``config.yaml`` (the resolved run config), ``checkpoints/step-XXXXXXX/`` (``rank0.pt`` with
the trainer state, whose ``"task"`` entry holds the LoRA weights under ``lora.*``, and ``meta.json``, written last)
and, once finished, ``metrics.json``. Evaluation needs the config and at least one complete checkpoint; the policy is
rebuilt from the config and its LoRA weights are replaced by a checkpoint's (the flow network and optimizer state are
not needed, so checkpoints of methods without a flow load too). Every error names the file it is about.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastnabla.config.loader import ConfigError, build_config
from fastnabla.run.config import RunConfig
from fastnabla.tasks.sd.task import LORA_PREFIX
from fastnabla.training.checkpoint import UnsafeCheckpointError, load_state_file

CONFIG_FILE, FINISHED_FILE, CHECKPOINT_DIR = "config.yaml", "metrics.json", "checkpoints"


@dataclass
class Checkpoint:
    """One complete checkpoint: its training iteration and directory."""

    step: int
    path: Path


@dataclass
class RunInfo:
    """A run directory opened for evaluation."""

    path: Path
    name: str
    cfg: RunConfig
    finished: bool
    checkpoints: list[Checkpoint] = field(default_factory=list)

    @property
    def method(self) -> str:
        return self.cfg.method.name

    @property
    def final(self) -> Checkpoint:
        """The newest complete checkpoint (the final weights of a finished run)."""
        return self.checkpoints[-1]


def list_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """Complete checkpoints (``meta.json`` and ``rank0.pt`` present) of ``run_dir``, oldest first."""
    found = []
    for path in sorted((run_dir / CHECKPOINT_DIR).glob("step-*")):
        if path.name.endswith(".tmp") or not path.is_dir():
            continue
        if (path / "meta.json").is_file() and (path / "rank0.pt").is_file():
            try:
                step = int(path.name.removeprefix("step-"))
            except ValueError:
                continue
            found.append(Checkpoint(step, path))
    return sorted(found, key=lambda c: c.step)


def open_run(path: str | Path, overrides: list[str] | None = None, name: str | None = None) -> RunInfo:
    """Open the run in ``path``: its config (with ``key.path=value`` overrides applied) and complete checkpoints.

    Raises:
        FileNotFoundError: the directory, its ``config.yaml`` or any complete checkpoint is missing.
        ValueError: the config does not load, or the run is not a Stable Diffusion (``task: sd``) run.
    """
    run_dir = Path(path).expanduser().resolve()
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    config_file = run_dir / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} is missing: {run_dir} is not a fastnabla run directory "
                                "(python -m fastnabla.train writes config.yaml first)")
    try:
        cfg = build_config(RunConfig, None, config_file, list(overrides or []))
    except (ConfigError, ValueError, OSError) as err:
        raise ValueError(f"{config_file}: {err}") from err
    if cfg.task != "sd":
        raise ValueError(f"{config_file}: task is {cfg.task!r}; python -m fastnabla.eval evaluates Stable Diffusion "
                         "runs (task: sd); the analytic task evaluates itself against its closed-form target")
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise FileNotFoundError(f"{run_dir / CHECKPOINT_DIR} holds no complete checkpoint (step-XXXXXXX/ with "
                                "rank0.pt and meta.json): nothing to evaluate")
    return RunInfo(run_dir, name or run_dir.name, cfg, (run_dir / FINISHED_FILE).is_file(), checkpoints)


def read_lora_state(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """The ``lora.*`` tensors of a checkpoint's ``rank0.pt`` (trainer state ``["task"]``)."""
    file = checkpoint.path / "rank0.pt"
    try:
        state: Any = load_state_file(file, mmap=True)
    except UnsafeCheckpointError:
        raise
    except Exception as err:
        raise ValueError(f"{file}: could not read the checkpoint ({type(err).__name__}: {err})") from err
    task_state = state.get("task") if isinstance(state, dict) else None
    if not isinstance(task_state, dict):
        raise ValueError(f"{file}: no 'task' entry with the trainable weights (not a fastnabla trainer checkpoint)")
    lora = {k: v for k, v in task_state.items() if k.startswith(LORA_PREFIX)}
    if not lora:
        raise ValueError(f"{file}: the 'task' entry holds no LoRA weights ({LORA_PREFIX}*)")
    return lora


@torch.no_grad()
def load_lora_weights(task, lora: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``lora`` (``lora.<UNet parameter name>`` tensors) into the task's LoRA parameters; every key must match.

    ``source`` names the file in errors.
    """
    own = {k: v for k, v in task.trainable_state_dict().items() if k.startswith(LORA_PREFIX)}
    missing, unexpected = sorted(set(own) - set(lora)), sorted(set(lora) - set(own))
    if missing or unexpected:
        raise ValueError(f"{source}: LoRA weights do not match the run's config ({len(missing)} missing, first "
                         f"{missing[:3]}; {len(unexpected)} unexpected, first {unexpected[:3]})")
    for key, target in own.items():
        if target.shape != lora[key].shape:
            raise ValueError(f"{source}: {key} has shape {tuple(lora[key].shape)}, the run's LoRA expects "
                             f"{tuple(target.shape)}")
        target.copy_(lora[key])
