"""Pure-torch reference of the VAE image post-processing (the reference, and the CPU path).

The Stable Diffusion decoder returns images in about ``[-1, 1]``; rewards take ``[0, 1]`` in fp32. Per
element ``d`` of the decoder output (the diffusers post-processing)::

    image  = clamp(d / 2 + 1/2, 0, 1)
    grad_d = 1/2 grad_image [0 <= d / 2 + 1/2 <= 1]        (clamp's inclusive mask)

The backward needs only ``d`` (the decoder output, which the caller keeps anyway): the mask is recomputed.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

__all__ = ["image_postprocess_backward_reference", "image_postprocess_reference"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def image_postprocess_reference(raw: Tensor) -> Tensor:
    """``clamp(raw / 2 + 1/2, 0, 1)`` (the diffusers VAE post-processing) in ``promote(raw.dtype, fp32)``."""
    return (raw.to(_compute_dtype(raw.dtype)) / 2 + 0.5).clamp(0, 1)


def image_postprocess_backward_reference(grad_image: Tensor, raw: Tensor) -> Tensor:
    """``grad_image / 2`` where ``0 <= raw / 2 + 1/2 <= 1`` (clamp's inclusive mask), else 0; ``raw.dtype``."""
    compute = _compute_dtype(raw.dtype)
    t = raw.to(compute) / 2 + 0.5
    inside = (t >= 0) & (t <= 1)
    return torch.where(inside, 0.5 * grad_image.to(compute), 0.0).to(raw.dtype)
