"""The residual nabla-DB loss with forward-looking flow (paper eqs. 16-19 + the output regulariser).

``reference`` holds the autograd reference :func:`residual_nabla_db_loss` and the closed-form forward and
backward, ``op`` the custom op and the fused entry :func:`residual_nabla_db_loss_fused`; the Triton
kernels are in ``kernels/nabla_db_loss.py``.
"""

from fastnabla.ops.nabla_db_loss.op import COMPILE_MIN_NUMEL, NABLA_DB_LOSS, residual_nabla_db_loss_fused
from fastnabla.ops.nabla_db_loss.reference import (
    GRAD_INPUTS,
    NablaDBTerms,
    nabla_db_loss_backward_reference,
    nabla_db_loss_reference,
    residual_nabla_db_loss,
)

__all__ = [
    "COMPILE_MIN_NUMEL",
    "GRAD_INPUTS",
    "NABLA_DB_LOSS",
    "NablaDBTerms",
    "nabla_db_loss_backward_reference",
    "nabla_db_loss_reference",
    "residual_nabla_db_loss",
    "residual_nabla_db_loss_fused",
]
