"""Reading Stable Diffusion run directories for evaluation (``python -m fastnabla.train --preset ...`` outputs).

A run directory holds ``config.yaml`` (the resolved run config), ``checkpoints/step-XXXXXXX/`` (``rank0.pt`` with
the trainer state, whose ``"task"`` entry holds the LoRA weights under ``lora.*``, and ``meta.json``, written last)
and, once finished, ``metrics.json``. Evaluation needs the config and at least one complete checkpoint; the policy is
rebuilt from the config and its LoRA weights are replaced by a checkpoint's (the flow network and optimizer state are
not needed, so checkpoints of methods without a flow load too). Every error names the file it is about.

Any diffusers model can be evaluated too, with or without LoRAs that were not trained here (:func:`open_model`): the
settings come from a preset and ``--set`` overrides, ``sd.model`` is the model, and each LoRA file (diffusers format,
as ``save_lora_weights`` writes it) becomes an entry whose ``sd.lora`` shape is read from the file and whose weights
are loaded by ``sd.lora.init`` (:func:`fastnabla.tasks.sd.lora.read_lora_file`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastnabla.config.loader import ConfigError, build_config
from fastnabla.run.config import RunConfig
from fastnabla.tasks.sd.task import LORA_PREFIX
from fastnabla.training.checkpoint import UnsafeCheckpointError, load_state_file

CONFIG_FILE, FINISHED_FILE, CHECKPOINT_DIR = "config.yaml", "metrics.json", "checkpoints"
LORA_FILE = "pytorch_lora_weights.safetensors"


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
    kind: str = "run"  # "run": a fastnabla run directory; "lora": a LoRA file on a model; "model": the model alone

    @property
    def method(self) -> str:
        return self.cfg.method.name

    @property
    def final(self) -> Checkpoint | None:
        """The newest complete checkpoint (the final weights of a finished run); None for a model without LoRA."""
        return self.checkpoints[-1] if self.checkpoints else None


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


def open_model(model: str, loras: list[str], preset: str, overrides: list[str] | None = None,
               names: list[str] | None = None) -> list[RunInfo]:
    """Entries evaluating the diffusers model ``model`` (a pipeline directory, a hub id or ``tiny``) with the settings
    of ``preset`` + ``overrides``: one per LoRA of ``loras`` (its rank, alpha and target modules read from the file),
    or one for the model alone (its pretrained evaluation only) when ``loras`` is empty.

    Raises:
        FileNotFoundError / ValueError: a missing or unreadable LoRA file, an unknown preset, a bad override.
    """
    from fastnabla.run.presets import get_preset
    from fastnabla.tasks.sd.lora import read_lora_file

    base = [*(overrides or []), "task=sd", f"sd.model={json.dumps(model)}"]
    try:
        cfg = build_config(RunConfig, get_preset(preset), None, base)
    except (ConfigError, ValueError) as err:
        raise ValueError(f"--model {model} with --preset {preset}: {err}") from err
    label = Path(model).name or model
    if not loras:
        return [RunInfo(Path(model), (names or [label])[0], cfg, True, [], kind="model")]
    out = []
    for i, lora in enumerate(loras):
        info = read_lora_file(lora, "--lora")
        shape = [f"sd.lora.rank={info.rank}", f"sd.lora.alpha={info.alpha}",
                 f"sd.lora.target_modules={json.dumps(info.target_modules)}",
                 f"sd.lora.init={json.dumps(str(info.path))}"]
        cfg = build_config(RunConfig, get_preset(preset), None, [*base, *shape])
        name = names[i] if names else (info.path.parent.name if info.path.name == LORA_FILE else info.path.stem)
        out.append(RunInfo(info.path, name, cfg, True, [Checkpoint(0, info.path)], kind="lora"))
    return out

