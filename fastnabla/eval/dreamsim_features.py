"""DreamSim embeddings (Fu et al., 2023) for the diversity metric, from a local weights directory only.

    f(x) = DreamSim.embed(resize_224(x))        # [B, D]; DreamSim's distance is 1 - cos(f(x), f(y))

The ``dreamsim`` package (``pip install dreamsim``; not a fastnabla dependency: it pins its own versions of
open_clip/peft/timm) builds the model: ``dreamsim(pretrained=True, cache_dir=DIR, device=...)``. It reads its
weights from ``cache_dir`` when every file it needs is there and otherwise downloads them; here any download attempt
(``torch.hub.download_url_to_file``, which it uses for its weights and for torch.hub backbones) is turned into a
:class:`FileNotFoundError` naming the directory, so nothing is fetched behind the user's back. Fill ``DIR`` once on a
machine with internet (``dreamsim(pretrained=True, cache_dir=DIR)``) and copy it.

Images are resized to 224 x 224 with antialiased bicubic interpolation (the package's PIL preprocessing is a bicubic
resize to 224 x 224), in ``[0, 1]`` as the package expects.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from fastnabla.compat import prepare_third_party_imports
from fastnabla.eval.extractor import ImageFeatureExtractor, Tensor
from fastnabla.rewards.preprocess import resize_bicubic

DREAMSIM_SIZE = 224


class DreamSimFeatures(ImageFeatureExtractor):
    """DreamSim embeddings of a model with an ``embed(images [B, 3, 224, 224] in [0, 1])`` method."""

    kind = "dreamsim"

    def __init__(self, model: nn.Module, description: str):
        super().__init__(description)
        self.model = model.eval().requires_grad_(False)
        # the package keeps its ViTs in a plain list (no registered parameters): a buffer tracks the device
        self.register_buffer("device_marker", torch.zeros(()), persistent=False)

    def features(self, images: Tensor) -> Tensor:
        x = resize_bicubic(images, DREAMSIM_SIZE, DREAMSIM_SIZE).clamp(0, 1)
        return self.model.embed(x).reshape(images.shape[0], -1)


@contextlib.contextmanager
def downloads_forbidden(directory: Path) -> Iterator[None]:
    """Within the block, ``torch.hub.download_url_to_file`` raises a FileNotFoundError naming ``directory``."""
    original = torch.hub.download_url_to_file

    def refuse(url: str, dst: str, *args, **kwargs) -> None:
        raise FileNotFoundError(
            f"--dreamsim={directory}: the DreamSim weights there are incomplete (the dreamsim package tried to "
            f"download {url} to {dst}; nothing is downloaded during evaluation). Run "
            f"dreamsim(pretrained=True, cache_dir='{directory}') once on a machine with internet and copy the "
            "directory."
        )

    torch.hub.download_url_to_file = refuse
    try:
        yield
    finally:
        torch.hub.download_url_to_file = original


def load_dreamsim_features(
    directory: str | Path, device: torch.device | str = "cpu", dreamsim_type: str | None = None
) -> DreamSimFeatures:
    """DreamSim from the weights in ``directory`` (``dreamsim_type``: the package's variant, default its ensemble).

    Raises:
        FileNotFoundError: ``directory`` is missing or incomplete.
        ImportError: the ``dreamsim`` package is not installed (with the install line).
    """
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"--dreamsim={directory}: no such directory (expected the dreamsim package's weight "
                                "cache: the directory dreamsim(pretrained=True, cache_dir=DIR) fills)")
    prepare_third_party_imports()
    try:
        package = importlib.import_module("dreamsim")
    except ImportError as err:
        raise ImportError(f"--dreamsim needs the dreamsim package (pip install dreamsim): {err}. Without it, leave "
                          "--dreamsim out: diversity is then computed on CLIP features and labelled so") from err
    options = {"dreamsim_type": dreamsim_type} if dreamsim_type else {}
    with downloads_forbidden(directory):
        model, _ = package.dreamsim(pretrained=True, device=str(torch.device(device)), cache_dir=str(directory),
                                    **options)
    variant = dreamsim_type or "default (ensemble)"
    return DreamSimFeatures(model, f"DreamSim {variant} from {directory}").to(device)
