"""The digit classifier behind the ``digits`` rewards and metrics: architecture, file format, default location.

:class:`DigitClassifier` takes images in ``[0, 1]`` (``[B, 3, H, W]``, the reward convention; grey is the mean of
R, G, B; other resolutions are bilinearly resized to the one it was trained at) and returns logits ``[B, 10]``;
:meth:`DigitClassifier.features` returns the penultimate features ``[B, F]`` used by the diversity and Frechet
metrics. SiLU activations and average pooling keep it smooth, so rewards built on it have useful pixel gradients.

The weights are one safetensors file whose metadata holds the architecture (``resolution``, ``width``,
``features``), so :func:`load_classifier` needs nothing else. It is trained by ``python -m fastnabla.tasks.digits
build`` (:mod:`fastnabla.tasks.digits`), which saves it in the pipeline directory and, for the full build in the
default cache, also as ``<cache root>/classifier.safetensors``: the rewards' default (:func:`default_classifier_path`).
This module lives in the rewards layer so the rewards need nothing from ``fastnabla.tasks``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor
NUM_CLASSES = 10
CLASSIFIER_FILE = "classifier.safetensors"
BUILD_COMMAND = "python -m fastnabla.tasks.digits build"
_META_KEY = "fastnabla_digits_classifier"


def default_cache_root() -> Path:
    """``$FASTNABLA_CACHE/digits``, else ``~/.cache/fastnabla/digits``: where digits builds are cached."""
    root = os.environ.get("FASTNABLA_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "fastnabla") / "digits"


def default_classifier_path() -> Path:
    """The classifier of the full build in the default cache (it may not exist yet)."""
    return default_cache_root() / CLASSIFIER_FILE


def resolve_classifier_path(classifier: str | Path | None) -> Path:
    """The classifier file for a reward option: None (or ``""``) is :func:`default_classifier_path`, a directory is
    a digits pipeline directory holding ``classifier.safetensors``, anything else the file itself.

    Raises:
        FileNotFoundError: no classifier there (the message names the file and the build command).
    """
    if classifier is None or str(classifier) == "":
        path, how = default_classifier_path(), f"build it with `{BUILD_COMMAND}`"
    else:
        path = Path(classifier).expanduser()
        path = path / CLASSIFIER_FILE if path.is_dir() else path
        how = f"build a digits pipeline with `{BUILD_COMMAND} --out DIR` and pass classifier=DIR"
    if not path.is_file():
        raise FileNotFoundError(f"the digits classifier {str(path)!r} does not exist: {how}")
    return path


class DigitClassifier(nn.Module):
    """Two conv stages (``width``, ``2 width`` channels, SiLU, 2x average pooling), a ``features``-wide SiLU layer
    (the penultimate features) and a linear head to 10 logits."""

    def __init__(self, resolution: int = 16, width: int = 32, features: int = 64):
        super().__init__()
        if resolution % 4:
            raise ValueError(f"classifier resolution must be a multiple of 4, got {resolution}")
        self.resolution, self.width, self.num_features = int(resolution), int(width), int(features)
        w = self.width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.SiLU(), nn.Conv2d(w, w, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.SiLU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.AvgPool2d(2), nn.Flatten(),
            nn.Linear(2 * w * (resolution // 4) ** 2, features), nn.SiLU(),
        )  # fmt: skip
        self.head = nn.Linear(features, NUM_CLASSES)

    def config(self) -> dict[str, int]:
        """The constructor arguments (stored in the weight file's metadata)."""
        return {"resolution": self.resolution, "width": self.width, "features": self.num_features}

    def _prepare(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"classifier input must be [B, 3, H, W] (or [B, 1, H, W]) in [0, 1], got "
                             f"{tuple(images.shape)}")
        grey = images.to(self.head.weight.dtype).mean(dim=1, keepdim=True)  # fp32 weights: fp32 maths
        if grey.shape[-2:] != (self.resolution, self.resolution):
            size = (self.resolution, self.resolution)
            grey = F.interpolate(grey, size=size, mode="bilinear", align_corners=False, antialias=True)
        return grey * 2 - 1

    def features(self, images: Tensor) -> Tensor:
        """Penultimate features ``[B, F]`` (in the weights' dtype, fp32 as saved) of images in ``[0, 1]``."""
        return self.body(self._prepare(images))

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``[B, 10]`` (in the weights' dtype) of images in ``[0, 1]``."""
        return self.head(self.features(images))

    def logits_and_features(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits [B, 10], features [B, F])`` from one pass."""
        f = self.features(images)
        return self.head(f), f


def save_classifier(model: DigitClassifier, path: str | Path, extra: dict | None = None) -> Path:
    """Write the weights (fp32) and the architecture (metadata) as one safetensors file."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    meta = {_META_KEY: json.dumps({"config": model.config(), **(extra or {})}, sort_keys=True)}
    save_file(state, str(path), metadata=meta)
    return path


def load_classifier(path: str | Path, device: torch.device | str = "cpu") -> DigitClassifier:
    """The classifier saved by :func:`save_classifier` (eval mode, frozen).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a digits classifier (no architecture metadata).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"digits classifier file {str(path)!r} does not exist")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if _META_KEY not in meta:
        raise ValueError(f"{str(path)!r} is not a digits classifier file (no {_META_KEY!r} metadata)")
    model = DigitClassifier(**json.loads(meta[_META_KEY])["config"])
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval().requires_grad_(False)
