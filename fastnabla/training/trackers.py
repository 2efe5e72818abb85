"""Experiment trackers: TensorBoard and Weights & Biases behind one small interface (``output.report_to``).

Each iteration's record (the ``metrics.jsonl`` line) goes to every tracker as scalars -- nested dicts flattened with
``/`` (``seconds/sample``, ``reward_terms/hpsv2/mean``) -- and the task's image batches (evaluation grids) as images
with one caption per image (the SD task: prompt, seed and ``log R``).

* ``tensorboard`` (``OUT/tensorboard``; the ``sd`` extra installs it): scalars, the images as one grid per batch
  (one column per image) and the captions as a text entry ``<tag>/captions``; skipped with a note on stderr when
  TensorBoard is not installed (the ``tensorboard`` default must not stop a minimal install).
* ``wandb`` (``pip install "fastnabla[wandb]"``): ``wandb.init(project=output.wandb_project, name=<run name>,
  dir=OUT, config=<the resolved config>)``; images as a list of ``wandb.Image`` with their captions. The run id is kept
  in ``OUT/wandb_run_id`` so that ``--resume`` continues the same W&B run. ``WANDB_MODE=offline`` (or
  ``wandb offline``) writes everything under ``OUT/wandb/`` without a network; ``wandb sync`` uploads it later.
  Requested and not installed, it is an error at start-up (before anything is written), not a silent skip.
"""

from __future__ import annotations

import importlib.util
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

Tensor = torch.Tensor
REPORTERS = ("tensorboard", "wandb")
WANDB_ID_FILE = "wandb_run_id"


@dataclass
class LoggedImages:
    """A batch of images to log: ``images`` ``[N, 3, H, W]`` (float in ``[0, 1]`` or uint8) and one caption each."""

    tag: str
    images: Tensor
    captions: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.images.dim() == 3:
            self.images = self.images[None]
        if self.captions and len(self.captions) != self.images.shape[0]:
            raise ValueError(f"{len(self.captions)} captions for {self.images.shape[0]} images")

    def uint8_hwc(self) -> np.ndarray:
        """``[N, H, W, 3]`` uint8."""
        x = self.images.detach().cpu()
        if x.dtype != torch.uint8:
            x = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
        return x.permute(0, 2, 3, 1).numpy()


def flatten_scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numbers of ``record`` (nested dicts flattened with ``/``); booleans, strings, lists and ``iteration`` are left
    out."""
    out: dict[str, float] = {}
    for k, v in record.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_scalars(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and key != "iteration":
            out[key] = float(v)
    return out


def wandb_available() -> bool:
    return importlib.util.find_spec("wandb") is not None


def check_report_to(report_to: Sequence[str]) -> None:
    """Raise ``ImportError`` naming the install command when a requested tracker is not installed (W&B; a missing
    TensorBoard is only noted, see the module docstring)."""
    if "wandb" in report_to and not wandb_available():
        raise ImportError("output.report_to includes 'wandb' but wandb is not installed: pip install "
                          "\"fastnabla[wandb]\" (or pip install wandb), or remove 'wandb' from output.report_to")


class TensorBoardTracker:
    """Scalars, image grids and captions to ``directory`` (a ``SummaryWriter``)."""

    name = "tensorboard"

    def __init__(self, directory: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(directory))

    def scalars(self, record: dict[str, Any], step: int) -> None:
        for k, v in flatten_scalars(record).items():
            self.writer.add_scalar(k, v, step)

    def images(self, batch: LoggedImages, step: int) -> None:
        hwc = batch.uint8_hwc()
        grid = np.concatenate(list(hwc), axis=1)  # one row, one column per image
        self.writer.add_image(batch.tag, grid, step, dataformats="HWC")
        if batch.captions:
            self.writer.add_text(f"{batch.tag}/captions", "\n\n".join(f"{i}: {c}" for i, c in
                                                                    enumerate(batch.captions)), step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run in ``out_dir`` (module docstring)."""

    name = "wandb"

    def __init__(self, out_dir: Path, run_name: str, project: str, config: dict[str, Any], resume: bool):
        import wandb

        self.wandb = wandb
        id_file = out_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
        if run_id is None:
            run_id = uuid.uuid4().hex[:12]  # W&B ids: lowercase letters and digits
            id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=project, name=run_name, dir=str(out_dir), config=config, id=run_id,
                              resume="allow", reinit="create_new")

    def scalars(self, record: dict[str, Any], step: int) -> None:
        self.run.log(flatten_scalars(record), step=step)

    def images(self, batch: LoggedImages, step: int) -> None:
        hwc = batch.uint8_hwc()
        captions = batch.captions or [None] * len(hwc)
        self.run.log({batch.tag: [self.wandb.Image(img, caption=c) for img, c in zip(hwc, captions, strict=True)]},
                     step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """Every tracker of ``output.report_to``; rank 0 only (``enabled=False`` elsewhere: every call is a no-op)."""

    def __init__(self, report_to: Sequence[str], out_dir: Path, run_name: str, *, config: dict[str, Any] | None = None,
                 wandb_project: str = "fastnabla", resume: bool = False, enabled: bool = True):
        self.trackers: list[Any] = []
        if not enabled:
            return
        for name in dict.fromkeys(report_to):
            if name == "tensorboard":
                try:
                    self.trackers.append(TensorBoardTracker(out_dir / "tensorboard"))
                except ImportError:
                    print("note: output.report_to includes 'tensorboard' but TensorBoard is not installed; not "
                          "logging to it (pip install tensorboard)", file=sys.stderr)
            elif name == "wandb":
                check_report_to([name])
                self.trackers.append(WandbTracker(out_dir, run_name, wandb_project, config or {}, resume))
            else:
                raise ValueError(f"output.report_to: unknown tracker {name!r}; one of {REPORTERS}")

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.trackers]

    def scalars(self, record: dict[str, Any], step: int) -> None:
        for t in self.trackers:
            t.scalars(record, step)

    def images(self, batch: LoggedImages | tuple[str, Tensor], step: int) -> None:
        if not isinstance(batch, LoggedImages):
            batch = LoggedImages(batch[0], batch[1])
        for t in self.trackers:
            t.images(batch, step)

    def close(self) -> None:
        for t in self.trackers:
            t.close()
