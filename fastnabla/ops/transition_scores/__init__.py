"""Fused transition scores: residual scores, reverse-score cotangents and the Tweedie prediction of one
transition in one pass.

``reference`` holds the pure-torch reference and the closed-form backward, ``op`` the custom op and the public
entry :func:`transition_scores_fused`; the Triton kernels are in ``kernels/transition_scores.py``.
"""

from fastnabla.ops.transition_scores.op import COMPILE_MIN_NUMEL, TRANSITION_SCORES, transition_scores_fused
from fastnabla.ops.transition_scores.reference import (
    FL_TARGETS,
    OUTPUTS,
    TransitionScores,
    transition_scores_backward_reference,
    transition_scores_reference,
)

__all__ = [
    "COMPILE_MIN_NUMEL",
    "FL_TARGETS",
    "OUTPUTS",
    "TRANSITION_SCORES",
    "TransitionScores",
    "transition_scores_backward_reference",
    "transition_scores_fused",
    "transition_scores_reference",
]
