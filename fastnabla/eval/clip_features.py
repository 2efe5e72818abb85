"""CLIP image features for the feature-space fallbacks of the diversity and prior-following metrics.

    f(x) = CLIP_image(normalize(resize_crop(x)))        # [B, D]: the projected image embedding (not L2-normalised)

The image tower and its preprocessing are the ones the Aesthetic reward uses (:mod:`fastnabla.rewards.aesthetic`:
shorter side to the tower's input size with antialiased bicubic, centre crop, CLIP mean/std); this module only
resolves where the weights come from. Metrics computed on these features are labelled as CLIP-feature metrics
(``clip-features`` diversity, ``clip-frechet`` distance), never as DreamSim or FID.

Weights (``--clip``): a transformers CLIP directory (``config.json`` + ``model.safetensors`` or
``pytorch_model.bin``; a full ``CLIPModel`` directory works), a hub id (read from the local hub cache when
``HF_HUB_OFFLINE=1``), or an OpenAI/open_clip checkpoint file of ``--clip-architecture`` (default
``ViT-L-14-quickgelu``). Default: ``openai/clip-vit-large-patch14``, the Aesthetic reward's tower.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fastnabla.eval.extractor import ImageFeatureExtractor, Tensor
from fastnabla.rewards.aesthetic import (
    CLIP_HUB_ID,
    OPEN_CLIP_ARCHITECTURE,
    load_open_clip_file,
    load_transformers_clip,
)
from fastnabla.rewards.loading import WeightFiles, resolve_dir
from fastnabla.rewards.preprocess import ImagePreprocess

CLIP_FILES = WeightFiles(
    reward="evaluation",
    option="--clip",
    description="a CLIP image tower (transformers directory)",
    filenames=("config.json",),
    alternatives=(("model.safetensors", "pytorch_model.bin"),),
    source=f"https://huggingface.co/{CLIP_HUB_ID} (config.json + model.safetensors), or an OpenAI/open_clip "
    "CLIP checkpoint file",
    hub_repo=CLIP_HUB_ID,
)


class CLIPImageFeatures(ImageFeatureExtractor):
    """Projected CLIP image embeddings of an image tower with ``image_size`` / ``embed_dim`` attributes
    (:class:`~fastnabla.rewards.aesthetic.TransformersCLIPImageEncoder` or ``OpenCLIPImageEncoder``)."""

    kind = "clip"

    def __init__(self, encoder: nn.Module, description: str):
        super().__init__(description)
        self.encoder = encoder.eval().requires_grad_(False)
        self.preprocess = ImagePreprocess(size=int(encoder.image_size), geometry="shortest-crop",
                                          crop_rounding="floor")

    def features(self, images: Tensor) -> Tensor:
        weight_dtype = next(self.encoder.parameters()).dtype
        return self.encoder(self.preprocess(images).to(weight_dtype))


def load_clip_features(
    clip: str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    architecture: str = OPEN_CLIP_ARCHITECTURE,
) -> CLIPImageFeatures:
    """The CLIP image tower named by ``clip`` (see the module docstring), on ``device``.

    Raises:
        FileNotFoundError: naming ``--clip``, what was tried, the expected files and where to get them.
        ValueError: the file/directory is not a CLIP checkpoint of the expected layout.
    """
    if clip is not None and Path(clip).expanduser().is_file():
        path = Path(clip).expanduser()
        try:
            encoder = load_open_clip_file(path, dtype, architecture)
        except ValueError as err:
            raise ValueError(f"--clip={path}: not an OpenAI/open_clip {architecture} checkpoint ({err})") from err
        description = f"open_clip {architecture} visual tower from {path}"
    else:
        try:
            directory = resolve_dir(clip, CLIP_FILES)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"--clip: {str(err).split(': ', 1)[-1]}") from err
        try:
            encoder = load_transformers_clip(directory, dtype)
        except (OSError, ValueError) as err:
            raise ValueError(f"--clip={directory}: not a transformers CLIP directory ({err})") from err
        description = f"transformers CLIP image tower from {directory}"
    return CLIPImageFeatures(encoder, description).to(device)
