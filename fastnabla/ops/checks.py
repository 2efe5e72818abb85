"""Input checks shared by the public entries of the fused ops: every error names the argument.

The fused ops take state tensors of one dtype among :data:`FLOAT_DTYPES` (arithmetic is fp32 whatever the
storage dtype) and per-sample coefficients as ``[B]`` (or ``[B, 1, ..., 1]``) floating tensors that are
schedule constants. Their pure-torch references take anything torch does and check nothing, so they stay
traceable by ``torch.compile``.
"""

from __future__ import annotations

import numbers

import torch

Tensor = torch.Tensor
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

__all__ = ["FLOAT_DTYPES", "check_states", "per_sample_vector", "python_float"]


def check_states(named: dict[str, Tensor | None]) -> Tensor:
    """The first entry of ``named`` is the leading state: every other (non-None) entry must be a tensor
    of its shape, dtype (one of fp32/bf16/fp16) and device. Returns the leading state."""
    (ref_name, ref), *rest = named.items()
    if not isinstance(ref, Tensor):
        raise TypeError(f"{ref_name} must be a torch.Tensor, got {type(ref).__name__}")
    if ref.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{ref_name} has dtype {ref.dtype}; supported: {FLOAT_DTYPES}")
    if ref.dim() < 1:
        raise ValueError(f"{ref_name} must have a leading batch dimension, got a 0-d tensor")
    for name, t in rest:
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != ref.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; all state tensors share one dtype"
            )
        if t.shape != ref.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {ref_name} has {tuple(ref.shape)}")
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    return ref


def per_sample_vector(
    name: str, c: Tensor, ref: Tensor, what: str = "a schedule constant", reference: str = "the pure-torch reference"
) -> Tensor:
    """``c`` as a contiguous fp32 ``[B]`` tensor: it must be a floating ``[B]`` or ``[B, 1, ..., 1]`` tensor
    on ``ref``'s device that does not require grad (the fused ops treat it as ``what``; ``reference`` names
    what to use instead to differentiate through it)."""
    batch = ref.shape[0]
    if not isinstance(c, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [{batch}], got {type(c).__name__}")
    if not c.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {c.dtype}")
    if c.device != ref.device:
        raise ValueError(f"{name} is on {c.device} but the states are on {ref.device}")
    if c.numel() != batch or c.dim() == 0 or (c.dim() > 1 and any(s != 1 for s in c.shape[1:])):
        raise ValueError(f"{name} must have shape [{batch}] (or [{batch}, 1, ..., 1]), got {tuple(c.shape)}")
    if c.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{name} requires grad, but the fused op treats it as {what}; use {reference} "
            "(plain autograd) to differentiate through it"
        )
    return c.reshape(batch).to(torch.float32).contiguous()


def python_float(name: str, value: object) -> float:
    """``value`` as a float: it must be a Python number (not a bool, not a tensor)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    return float(value)
