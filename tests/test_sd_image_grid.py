"""PNG image grids: pixel values, layout, atomic writes, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastnabla.tasks.sd.image_grid import make_grid, save_image_grid


def test_grid_pixels_round_trip(tmp_path):
    from PIL import Image

    images = torch.rand(5, 3, 6, 7, generator=torch.Generator().manual_seed(0))
    path = save_image_grid(images, tmp_path / "grid.png", nrow=2, padding=1)
    pixels = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    assert pixels.shape == (3, 3 * 7 + 1, 2 * 8 + 1)  # 3 rows of 2, padding 1
    for i in range(5):
        r, c = divmod(i, 2)
        cell = pixels[:, 1 + r * 7 : 1 + r * 7 + 6, 1 + c * 8 : 1 + c * 8 + 7]
        assert torch.equal(cell, (images[i] * 255).round().to(torch.uint8)), i
    assert int(pixels[:, 1 + 2 * 7 :, 1 + 8 :].min()) == 255  # the empty 6th cell is padding
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]


def test_values_are_clamped_and_grayscale_works():
    grid = make_grid(torch.tensor([[[[2.0, -1.0]]]]), nrow=1, padding=0)
    assert grid.shape == (1, 1, 2) and grid.tolist() == [[[2.0, -1.0]]]  # make_grid itself does not clamp


def test_errors(tmp_path):
    with pytest.raises(ValueError, match=r"\.png"):
        save_image_grid(torch.rand(1, 3, 4, 4), tmp_path / "grid.jpg", nrow=1)
    with pytest.raises(ValueError, match=r"\[n, 1 or 3, H, W\]"):
        save_image_grid(torch.rand(3, 4, 4), tmp_path / "grid.png", nrow=1)
    with pytest.raises(ValueError, match="nrow"):
        save_image_grid(torch.rand(1, 3, 4, 4), tmp_path / "grid.png", nrow=0)
