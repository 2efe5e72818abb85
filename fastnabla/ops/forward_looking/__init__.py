"""The forward-looking (FL) reward gradient (paper eq. 15): reference and fused, memory-bounded op.

``reference`` holds :func:`forward_looking_gradient` (the autograd reference), :func:`gamma_schedule` and the
pure-torch pieces of the fused op; ``op`` holds the custom ops and the entries
:func:`forward_looking_pixel_gradient` and :func:`forward_looking_gradient_fused`. Kernels:
``kernels/forward_looking.py`` (noisy copies, accumulate); the post-processing is its own op,
:mod:`fastnabla.ops.image_postprocess`.
"""

from fastnabla.ops.forward_looking.op import (
    FL_ACCUMULATE,
    FL_NOISY_COPIES,
    forward_looking_gradient_fused,
    forward_looking_pixel_gradient,
)
from fastnabla.ops.forward_looking.reference import (
    FL_JACOBIANS,
    GAMMA_SCHEDULES,
    accumulate_reference,
    forward_looking_gradient,
    forward_looking_pixel_gradient_reference,
    gamma_schedule,
    noisy_copies_reference,
    seeded_normal,
    smoothed_log_reward_reference,
)
from fastnabla.ops.image_postprocess.op import image_postprocess  # the post-processing this op fuses

__all__ = [
    "FL_ACCUMULATE",
    "FL_JACOBIANS",
    "FL_NOISY_COPIES",
    "GAMMA_SCHEDULES",
    "accumulate_reference",
    "forward_looking_gradient",
    "forward_looking_gradient_fused",
    "forward_looking_pixel_gradient",
    "forward_looking_pixel_gradient_reference",
    "gamma_schedule",
    "image_postprocess",
    "noisy_copies_reference",
    "seeded_normal",
    "smoothed_log_reward_reference",
]
