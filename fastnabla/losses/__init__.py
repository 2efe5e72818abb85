"""Scalar reference losses of the baselines that have no fused kernel: residual DB and DAG-DB.

The residual nabla-DB loss and the forward-looking gradient are hot-path ops: their references live
beside their fused forms in :mod:`fastnabla.ops.nabla_db_loss` and :mod:`fastnabla.ops.forward_looking`;
the nabla-DB loss weights ``w(t)`` belong to the method (:mod:`fastnabla.methods.nabla_gfn.weights`).
"""

from fastnabla.losses.dag_db import dag_db_loss, noising_log_prob
from fastnabla.losses.residual_db import forward_looking_log_flow, residual_db_loss

__all__ = [
    "dag_db_loss",
    "forward_looking_log_flow",
    "noising_log_prob",
    "residual_db_loss",
]
