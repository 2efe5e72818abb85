"""The feature-extractor interface the image metrics use.

An extractor maps images ``[B, 3, H, W]`` in ``[0, 1]`` (any resolution, any float dtype, any device) to one feature
vector per image, ``[B, D]`` fp32, without gradients. ``kind`` names the network family (``clip``, ``dreamsim``,
``inception-fid``, ``inception-torchvision``) and decides how the metric computed from its features is labelled;
``description`` says which weights were loaded (written into the evaluation JSON).
"""

from __future__ import annotations

import torch
from torch import nn

Tensor = torch.Tensor


class ImageFeatureExtractor(nn.Module):
    """Base class: subclasses implement :meth:`features` and set ``kind`` / ``description``."""

    kind: str = "features"

    def __init__(self, description: str):
        super().__init__()
        self.description = description

    def features(self, images: Tensor) -> Tensor:
        """``[B, D]`` features of ``images`` ``[B, 3, H, W]`` in ``[0, 1]`` on the extractor's device."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        tensor = next(self.parameters(), None)
        tensor = tensor if tensor is not None else next(self.buffers(), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"{self.kind} features: images must be float [B, 3, H, W] in [0, 1], got "
                             f"{tuple(images.shape)} {images.dtype}")
        out = self.features(images.to(device=self.device, dtype=torch.float32))
        return out.reshape(images.shape[0], -1).float()
