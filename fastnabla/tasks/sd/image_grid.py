"""Image grids as PNG files (PIL, written atomically)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch

from fastnabla.utils.io import atomic_write

Tensor = torch.Tensor


def make_grid(images: Tensor, nrow: int, padding: int = 2, pad_value: float = 1.0) -> Tensor:
    """Tile ``[n, C, H, W]`` images (C = 1 or 3) into one ``[C, rows*(H+p)+p, nrow*(W+p)+p]`` image,
    ``nrow`` images per row, row-major; missing cells stay ``pad_value``."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [n, 1 or 3, H, W], got shape {tuple(images.shape)}")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    n, c, h, w = images.shape
    rows = max(1, math.ceil(n / nrow))
    grid = images.new_full((c, rows * (h + padding) + padding, nrow * (w + padding) + padding), pad_value)
    for i in range(n):
        r, k = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + k * (w + padding)
        grid[:, top : top + h, left : left + w] = images[i]
    return grid


def save_image_grid(images: Tensor, path: str | Path, nrow: int, padding: int = 2) -> Path:
    """Write ``images`` (``[n, 3, H, W]`` in ``[0, 1]``, any float dtype/device) as one PNG grid, atomically.

    Raises:
        ValueError: bad shape / ``nrow``, or a ``path`` whose suffix is not ``.png``.
    """
    from PIL import Image

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"image grid path must end in .png, got {str(path)!r}")
    grid = make_grid(images.detach().float().clamp(0, 1).cpu(), nrow, padding)
    pixels = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
    return path
