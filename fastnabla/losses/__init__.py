"""Reference (pure torch) losses: residual nabla-DB with forward-looking flow and the baselines."""

from fastnabla.losses.dag_db import dag_db_loss, noising_log_prob
from fastnabla.losses.forward_looking import forward_looking_gradient, gamma_schedule
from fastnabla.losses.nabla_db import NablaDBTerms, residual_nabla_db_loss
from fastnabla.losses.residual_db import forward_looking_log_flow, residual_db_loss
from fastnabla.losses.weights import loss_weight

__all__ = [
    "NablaDBTerms",
    "dag_db_loss",
    "forward_looking_log_flow",
    "noising_log_prob",
    "residual_db_loss",
    "forward_looking_gradient",
    "gamma_schedule",
    "loss_weight",
    "residual_nabla_db_loss",
]
