"""VAE image post-processing ``clamp(d / 2 + 1/2, 0, 1)`` in fp32, fused forward and backward.

``reference`` holds the pure-torch forward and backward, ``op`` the custom op and the public entry
:func:`image_postprocess`; the Triton kernels are in ``kernels/image_postprocess.py``.

Note: :mod:`fastnabla.ops` exports the *function* :func:`image_postprocess` under this package's name, so
``fastnabla.ops.image_postprocess`` as an attribute is the function; reach the package's modules with
``from fastnabla.ops.image_postprocess import ...`` (not ``import fastnabla.ops.image_postprocess as m``).
"""

from fastnabla.ops.image_postprocess.op import IMAGE_POSTPROCESS, image_postprocess
from fastnabla.ops.image_postprocess.reference import (
    image_postprocess_backward_reference,
    image_postprocess_reference,
)

__all__ = [
    "IMAGE_POSTPROCESS",
    "image_postprocess",
    "image_postprocess_backward_reference",
    "image_postprocess_reference",
]
