"""Pixel-space features: the weight-free fallback of the diversity and prior-following metrics.

    f(x) = flatten(area_resize(x, 16 x 16))            # [B, 768]: downsampled RGB in [0, 1]

Needs no network and no weights, so ``python -m fastnabla.eval evaluate --fallback-features pixels`` runs anywhere.
Metrics on these features are labelled ``pixel-features`` (diversity: mean pairwise cosine distance of the
downsampled images) and ``pixel-frechet`` (Frechet distance of the downsampled images to the pretrained model's):
they see layout and colour, not semantics, and are never reported as DreamSim, CLIP or FID numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastnabla.eval.extractor import ImageFeatureExtractor, Tensor

PIXEL_SIZE = 16


class PixelFeatures(ImageFeatureExtractor):
    """Images area-resized to ``size x size`` and flattened (``3 size^2`` features)."""

    kind = "pixels"

    def __init__(self, size: int = PIXEL_SIZE, device: torch.device | str = "cpu"):
        if size < 1:
            raise ValueError(f"pixel features need a size >= 1, got {size}")
        super().__init__(f"pixels: RGB area-resized to {size}x{size} ({3 * size * size} features), no weights")
        self.size = size
        self.register_buffer("_anchor", torch.zeros(0, device=device), persistent=False)  # carries the device

    def features(self, images: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(images, self.size).flatten(1)
