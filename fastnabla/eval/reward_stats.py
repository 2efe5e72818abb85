"""Reward statistics of an image set: mean and standard deviation of the run's reward, each image scored with its
own prompt (the paper's reward axis, section 4 and Table 1).

For scores ``s_1 .. s_n``: ``mean = 1/n sum_i s_i`` and ``std = sqrt(1/(n - 1) sum_i (s_i - mean)^2)`` (unbiased;
undefined, reported as NaN / JSON null, for ``n = 1``). Computed in float64.
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


def reward_statistics(scores: Tensor) -> dict[str, float]:
    """``{"mean", "std", "count"}`` of ``scores`` ``[n]`` (``n >= 1``, finite)."""
    if not isinstance(scores, Tensor):
        raise TypeError(f"scores must be a torch.Tensor [n], got {type(scores).__name__}")
    if scores.dim() != 1 or scores.numel() == 0:
        raise ValueError(f"scores must be a non-empty [n] tensor (one score per image), got {tuple(scores.shape)}")
    s = scores.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(s).all():
        raise ValueError("scores hold non-finite values (a reward returned inf/NaN)")
    n = s.numel()
    std = float(s.std(correction=1)) if n > 1 else math.nan
    return {"mean": float(s.mean()), "std": std, "count": n}
