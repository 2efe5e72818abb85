"""Per-step loss weights ``w_F(t)``, ``w_B(t)`` of the residual nabla-DB objective (paper eq. 19).

The raw score-space losses scale like ``1 / sigma_t^4`` relative to one another (a residual in
``eps`` of size ``e`` is a score residual of size ``|b_t| e / sigma_t^2``), so with the paper's
``w = 1`` the late, low-noise steps dominate the gradient while the early steps, where mode weights
are decided, barely train. The schedules:

* ``"one"``    ``w = 1`` (the paper's setting);
* ``"eps"``    ``w = (sigma_t^2 / b_t)^2``: the loss measured in eps units, every step equally
  conditioned;
* ``"sigma2"`` ``w = sigma_t^2``: the loss of ``sigma_t``-scaled scores (a middle ground).
"""

from __future__ import annotations

import torch

WEIGHT_SCHEDULES = ("one", "eps", "sigma2")


def loss_weight(kind: str, b: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Weight per sample ``[B]`` from the step coefficients ``b``, ``sigma`` (``[B, 1, ...]``)."""
    b, sigma = b.reshape(-1), sigma.reshape(-1)
    if kind == "one":
        return torch.ones_like(sigma)
    if kind == "eps":
        return (sigma**2 / b) ** 2
    if kind == "sigma2":
        return sigma**2
    raise ValueError(f"loss weight schedule {kind!r} is not one of {WEIGHT_SCHEDULES}")
