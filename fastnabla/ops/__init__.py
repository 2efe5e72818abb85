"""Hot-path ops, one folder per op (``fastnabla/ops/<op>/``): ``reference.py`` (pure torch: the autograd
reference and the closed forms the CPU paths run) beside ``op.py`` (the ``torch.library`` custom op with fake
and autograd registrations, and the public entry with its input checks). Every op dispatches through
:class:`fastnabla.ops.dispatch.FusedOp` (one rule, one path per call); the Triton kernels live in
:mod:`fastnabla.kernels` (``kernels/<op>.py``) and are imported only when the Triton backend runs.

Note: ``fastnabla.ops.image_postprocess`` is the *function* (the public entry); its folder's modules are
reached with ``from fastnabla.ops.image_postprocess import ...``.
"""

from fastnabla.ops.denoise_step import denoise_step_backward_reference, denoise_step_fused, denoise_step_reference
from fastnabla.ops.forward_looking import (
    accumulate_reference,
    forward_looking_gradient,
    forward_looking_gradient_fused,
    forward_looking_pixel_gradient,
    forward_looking_pixel_gradient_reference,
    gamma_schedule,
    noisy_copies_reference,
    smoothed_log_reward_reference,
)
from fastnabla.ops.image_postprocess import (
    image_postprocess,
    image_postprocess_backward_reference,
    image_postprocess_reference,
)
from fastnabla.ops.nabla_db_loss import (
    NablaDBTerms,
    nabla_db_loss_backward_reference,
    nabla_db_loss_reference,
    residual_nabla_db_loss,
    residual_nabla_db_loss_fused,
)
from fastnabla.ops.transition_scores import (
    TransitionScores,
    transition_scores_backward_reference,
    transition_scores_fused,
    transition_scores_reference,
)

__all__ = [
    "NablaDBTerms",
    "TransitionScores",
    "accumulate_reference",
    "denoise_step_backward_reference",
    "denoise_step_fused",
    "denoise_step_reference",
    "forward_looking_gradient",
    "forward_looking_gradient_fused",
    "forward_looking_pixel_gradient",
    "forward_looking_pixel_gradient_reference",
    "gamma_schedule",
    "image_postprocess",
    "image_postprocess_backward_reference",
    "image_postprocess_reference",
    "nabla_db_loss_backward_reference",
    "nabla_db_loss_reference",
    "noisy_copies_reference",
    "residual_nabla_db_loss",
    "residual_nabla_db_loss_fused",
    "smoothed_log_reward_reference",
    "transition_scores_backward_reference",
    "transition_scores_fused",
    "transition_scores_reference",
]
