"""Dtype names used in configs (``bf16``, ``fp16``, ``fp32``) and the torch dtypes they stand for."""

from __future__ import annotations

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def torch_dtype(name: str, field_name: str = "dtype") -> torch.dtype:
    """``"bf16" | "fp16" | "fp32"`` -> the torch dtype (a ``ValueError`` naming ``field_name`` otherwise)."""
    if name not in DTYPES:
        raise ValueError(f"{field_name}={name!r} is not one of {tuple(DTYPES)}")
    return DTYPES[name]
