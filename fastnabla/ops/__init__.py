"""Hot-path ops, one module per op: pure-torch reference + ``torch.library`` custom op (fake +
autograd) + one dispatch rule (:mod:`fastnabla.ops.dispatch`). Triton kernels live in
:mod:`fastnabla.kernels` and are imported only when the Triton backend runs."""

from fastnabla.ops.denoise_step import denoise_step_fused, denoise_step_reference
from fastnabla.ops.forward_looking import (
    forward_looking_gradient_fused,
    forward_looking_pixel_gradient,
    forward_looking_pixel_gradient_reference,
    image_postprocess,
)
from fastnabla.ops.nabla_db_loss import residual_nabla_db_loss_fused
from fastnabla.ops.transition_scores import TransitionScores, transition_scores_fused, transition_scores_reference

__all__ = [
    "TransitionScores",
    "denoise_step_fused",
    "denoise_step_reference",
    "forward_looking_gradient_fused",
    "forward_looking_pixel_gradient",
    "forward_looking_pixel_gradient_reference",
    "image_postprocess",
    "residual_nabla_db_loss_fused",
    "transition_scores_fused",
    "transition_scores_reference",
]
