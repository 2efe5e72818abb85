"""Reference (pure torch) losses: residual nabla-DB with forward-looking flow and the baselines."""

from fastnabla.losses.forward_looking import forward_looking_gradient, gamma_schedule
from fastnabla.losses.nabla_db import NablaDBTerms, residual_nabla_db_loss
from fastnabla.losses.weights import loss_weight

__all__ = [
    "NablaDBTerms",
    "forward_looking_gradient",
    "gamma_schedule",
    "loss_weight",
    "residual_nabla_db_loss",
]
