"""Triton kernels of the VAE image post-processing (``fastnabla.kernels.image_postprocess``).

The Stable Diffusion decoder returns images in about ``[-1, 1]``; rewards take ``[0, 1]`` in fp32.
Per element ``d`` of the decoder output (any float dtype), with ``t = d / 2 + 1/2`` in fp32::

    forward   image  = clamp(t, 0, 1)                      (stored in fp32, what the reward reads)
    backward  grad_d = 1/2 * grad_image * [0 <= t <= 1]    (stored in the decoder's dtype)

The in-range test is inclusive, as ``torch.clamp``'s gradient. ``d / 2`` is exact, so ``t`` rounds
like the eager ``d / 2 + 0.5`` in fp32; NaN propagates forward (both comparisons are false) and gets
no gradient. The backward recomputes the mask from ``d`` (which the caller keeps anyway as the
decoder output) instead of saving a mask.

Layout: any dense tensor, walked as a flat array in memory order (contiguous or channels_last; the
output has the input's layout). 1-D grid of ``cdiv(numel, BLOCK)`` programs, int64 offsets, masked
loads, fp32 arithmetic. The kernels are jitted lazily, once per ``TRITON_INTERPRET`` mode
(:mod:`.triton_utils`).
"""

from __future__ import annotations

import torch

from .triton_utils import cdiv, import_triton, interpreter_block, kernel_memory_format, lazy_jit, triton_interpret

triton, tl = import_triton()
HAS_TRITON = triton is not None


@lazy_jit
def _postprocess_fwd_kernel(raw_ptr, image_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    t = tl.load(raw_ptr + offs, mask=mask, other=0.0).to(tl.float32) * 0.5 + 0.5
    image = tl.where(t < 0.0, 0.0, tl.where(t > 1.0, 1.0, t))
    tl.store(image_ptr + offs, image, mask=mask)


@lazy_jit
def _postprocess_bwd_kernel(grad_ptr, raw_ptr, grad_raw_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    t = tl.load(raw_ptr + offs, mask=mask, other=0.0).to(tl.float32) * 0.5 + 0.5
    grad = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    grad_raw = tl.where((t >= 0.0) & (t <= 1.0), 0.5 * grad, 0.0)
    tl.store(grad_raw_ptr + offs, grad_raw.to(grad_raw_ptr.dtype.element_ty), mask=mask)


def _block(numel: int, interpret: bool) -> tuple[int, int]:
    if interpret:
        return interpreter_block(numel), 4
    return 4096, 8  # flat elementwise: 16 elements per thread, enough programs for any SD image batch


def image_postprocess_forward(raw: torch.Tensor) -> torch.Tensor:
    """``clamp(raw / 2 + 1/2, 0, 1)`` in fp32, in ``raw``'s layout (contiguous or channels_last)."""
    fmt = kernel_memory_format(raw)
    raw = raw.contiguous(memory_format=fmt)
    image = torch.empty_like(raw, dtype=torch.float32, memory_format=fmt)
    numel = raw.numel()
    if numel:
        block, num_warps = _block(numel, triton_interpret())
        _postprocess_fwd_kernel[(cdiv(numel, block),)](raw, image, numel, BLOCK=block, num_warps=num_warps)
    return image


def image_postprocess_backward(grad_image: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """``grad_image / 2`` where ``0 <= raw / 2 + 1/2 <= 1`` (else 0), in ``raw``'s dtype and layout."""
    fmt = kernel_memory_format(raw)
    raw = raw.contiguous(memory_format=fmt)
    grad_image = grad_image.contiguous(memory_format=fmt)
    grad_raw = torch.empty_like(raw, memory_format=fmt)
    numel = raw.numel()
    if numel:
        block, num_warps = _block(numel, triton_interpret())
        _postprocess_bwd_kernel[(cdiv(numel, block),)](grad_image, raw, grad_raw, numel, BLOCK=block,
                                                       num_warps=num_warps)
    return grad_raw
