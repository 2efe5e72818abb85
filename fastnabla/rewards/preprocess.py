"""Differentiable image preprocessing of the reward models: resize, crop/pad and normalise tensors in ``[0, 1]``.

The reference packages preprocess PIL images (uint8) or tensors with torchvision; here every step is a
differentiable tensor op so ``d score / d pixels`` flows through it:

* resize: bicubic with antialiasing (``F.interpolate(mode="bicubic", antialias=True)``), which *is* torchvision's
  tensor ``Resize(..., BICUBIC)`` (same kernel, bit-identical) and the transformers ``CLIPImageProcessor``
  (torchvision backend). Its cubic kernel uses ``a = -0.5`` and widens its support by the downscale factor, like
  PIL's ``BICUBIC`` that the PIL paths use; the PIL paths differ only by PIL's uint8 rounding (<= ~1/255).
* ``shortest-crop`` (CLIP, ImageReward): shorter side to ``size`` (longer side ``int(size * long / short)``),
  then a centred ``size x size`` crop;
* ``longest-pad`` (HPSv2's ``ResizeMaxSize``): longer side to ``size`` (other side ``round(side * size / long)``),
  then zero padding to ``size x size`` (left/top get ``pad // 2``);
* normalise: ``(x - mean_c) / std_c`` per channel.

For the square images diffusion models produce, both geometries reduce to one resize to ``size x size``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# OpenAI CLIP's pixel statistics, used by CLIP ViT-L/14, open_clip ViT-H-14 (HPSv2) and ImageReward's BLIP.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
GEOMETRIES = ("shortest-crop", "longest-pad")
CROP_ROUNDINGS = ("floor", "round")


def resize_bicubic(images: Tensor, height: int, width: int) -> Tensor:
    """``images`` ``[B, C, H, W]`` resized to ``[B, C, height, width]`` (antialiased bicubic; identity if same size)."""
    if tuple(images.shape[-2:]) == (height, width):
        return images
    return F.interpolate(images, size=(height, width), mode="bicubic", antialias=True, align_corners=False)


def shortest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output ``(h, w)`` of a resize of the shorter side to ``size`` (torchvision / transformers rule)."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def longest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output ``(h, w)`` of a resize of the longer side to ``size`` (HPSv2's ``ResizeMaxSize`` rule)."""
    scale = size / float(max(height, width))
    return round(height * scale), round(width * scale)


def center_crop(images: Tensor, size: int, rounding: str = "floor") -> Tensor:
    """Centred ``size x size`` crop; offsets ``floor((H - size) / 2)`` (transformers) or ``round(..)`` (torchvision)."""
    height, width = images.shape[-2:]
    if height < size or width < size:
        raise ValueError(f"center_crop: image {height}x{width} is smaller than the crop size {size}")
    if rounding == "floor":
        top, left = (height - size) // 2, (width - size) // 2
    elif rounding == "round":
        top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    else:
        raise ValueError(f"center_crop rounding={rounding!r} is not one of {CROP_ROUNDINGS}")
    return images[..., top : top + size, left : left + size]


def pad_to_square(images: Tensor, size: int, fill: float = 0.0) -> Tensor:
    """Pad ``[.., h, w]`` (``h, w <= size``) to ``size x size`` with ``fill``; left/top get ``pad // 2``."""
    height, width = images.shape[-2:]
    pad_h, pad_w = size - height, size - width
    if pad_h == 0 and pad_w == 0:
        return images
    return F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)


def normalize(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """``(images - mean_c) / std_c`` per channel of ``[B, C, H, W]``, in the images' dtype."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


@dataclass(frozen=True)
class ImagePreprocess:
    """One reward model's preprocessing: geometry to ``size x size``, then per-channel normalisation.

    ``geometry``: ``shortest-crop`` (resize shorter side + centre crop with ``crop_rounding``) or ``longest-pad``
    (resize longer side + pad with ``fill``, in ``[0, 1]`` pixel units, before normalisation).
    """

    size: int = 224
    geometry: str = "shortest-crop"
    crop_rounding: str = "floor"
    fill: float = 0.0
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD

    def __post_init__(self):
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"ImagePreprocess geometry={self.geometry!r} is not one of {GEOMETRIES}")
        if self.crop_rounding not in CROP_ROUNDINGS:
            raise ValueError(f"ImagePreprocess crop_rounding={self.crop_rounding!r} is not one of {CROP_ROUNDINGS}")
        if self.size < 1:
            raise ValueError(f"ImagePreprocess size must be >= 1, got {self.size}")

    def geometry_only(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` in ``[0, 1]`` -> ``[B, 3, size, size]`` in pixel units (no normalisation)."""
        height, width = images.shape[-2:]
        if self.geometry == "shortest-crop":
            images = resize_bicubic(images, *shortest_side_size(height, width, self.size))
            return center_crop(images, self.size, self.crop_rounding)
        images = resize_bicubic(images, *longest_side_size(height, width, self.size))
        return pad_to_square(images, self.size, self.fill)

    def __call__(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` in ``[0, 1]`` -> normalised ``[B, 3, size, size]`` (same dtype, differentiable)."""
        return normalize(self.geometry_only(images), self.mean, self.std)
