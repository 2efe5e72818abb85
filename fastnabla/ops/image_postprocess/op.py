"""The fused image post-processing's entry point and ``torch.library`` registration.

Maths in :mod:`fastnabla.ops.image_postprocess.reference`. The Triton kernels
(``kernels/image_postprocess.py``) read the decoder output once and write the fp32 image once; the backward
is one pass that recomputes the clamp mask from the decoder output, so nothing is saved but that output.
Paths (:mod:`fastnabla.ops.dispatch`): Triton on the Triton backend for fp32/bf16/fp16 decoder outputs,
else the reference inline (the measured CPU gain of compiling it is nil, docs/forward-looking.md).
"""

from __future__ import annotations

import torch

from fastnabla.ops.dispatch import Autograd, FusedOp, Pass, kernel_memory_format
from fastnabla.ops.image_postprocess.reference import image_postprocess_backward_reference, image_postprocess_reference

Tensor = torch.Tensor

__all__ = ["IMAGE_POSTPROCESS", "image_postprocess"]


def _postprocess_fp32(raw: Tensor) -> Tensor:
    """The reference forward as the op returns it: fp32 whatever the decoder dtype."""
    return image_postprocess_reference(raw).to(torch.float32)


IMAGE_POSTPROCESS = FusedOp(
    "image_postprocess",
    kernels="image_postprocess",
    forward=Pass(_postprocess_fp32, "image_postprocess_forward"),
    # backward args: (grad_image, raw, needs)
    backward=Pass(image_postprocess_backward_reference, "image_postprocess_backward", args=lambda a: a[:2],
                  layout=lambda a: a[1]),
    # the decoder output is saved (the caller keeps it anyway); one differentiable input
    autograd=Autograd(grad_inputs=(0,), save=lambda i: ((i[0],), ()), needs_arg="none"),
)


@torch.library.custom_op("fastnabla::image_postprocess", mutates_args=())
def _postprocess_op(raw: Tensor, path: str = "auto") -> Tensor:
    return IMAGE_POSTPROCESS.forward(path, raw)


@_postprocess_op.register_fake
def _(raw, path="auto"):
    return torch.empty_like(raw, dtype=torch.float32, memory_format=kernel_memory_format(raw))


@torch.library.custom_op("fastnabla::image_postprocess_backward", mutates_args=())
def _postprocess_backward_op(grad_image: Tensor, raw: Tensor, path: str = "auto") -> Tensor:
    return IMAGE_POSTPROCESS.backward(path, grad_image, raw, (True,))


@_postprocess_backward_op.register_fake
def _(grad_image, raw, path="auto"):
    return torch.empty_like(raw, memory_format=kernel_memory_format(raw))


IMAGE_POSTPROCESS.register(_postprocess_op)


def image_postprocess(raw: Tensor) -> Tensor:
    """``clamp(raw / 2 + 1/2, 0, 1)`` in fp32 (VAE output -> reward input), differentiable w.r.t. ``raw``.

    Fused (one read, one fp32 write; backward one pass, nothing saved but ``raw``) on the Triton
    backend; :func:`~fastnabla.ops.image_postprocess.reference.image_postprocess_reference` otherwise
    (also for float64 decoder outputs).
    """
    if not isinstance(raw, Tensor) or not raw.is_floating_point():
        raise TypeError(f"decoder output must be a floating torch.Tensor, got {getattr(raw, 'dtype', type(raw))}")
    return IMAGE_POSTPROCESS(raw, reference=lambda: image_postprocess_reference(raw))
