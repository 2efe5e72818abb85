"""Fused denoising step + Tweedie prediction, optionally with classifier-free guidance first.

``reference`` holds the pure-torch reference and closed-form backward, ``op`` the custom op and the public
entry :func:`denoise_step_fused`; the Triton kernels are in ``kernels/denoise_step.py``.
"""

from fastnabla.ops.denoise_step.op import DENOISE_STEP, denoise_step_fused
from fastnabla.ops.denoise_step.reference import denoise_step_backward_reference, denoise_step_reference

__all__ = ["DENOISE_STEP", "denoise_step_backward_reference", "denoise_step_fused", "denoise_step_reference"]
