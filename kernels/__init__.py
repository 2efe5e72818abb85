"""Triton kernels, one file per op, imported as ``fastnabla.kernels`` (never as top-level ``kernels``)."""
