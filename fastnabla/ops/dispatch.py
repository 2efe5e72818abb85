"""The one backend rule shared by every fused op in :mod:`fastnabla.ops`.

=============================================  ===========================================
situation                                      backend
=============================================  ===========================================
``FASTNABLA_BACKEND=reference``                pure-torch reference, on any device
``FASTNABLA_BACKEND=triton``                   Triton (error if it cannot run here)
CUDA tensors and triton importable             Triton
CPU tensors and ``TRITON_INTERPRET=1``         Triton through its CPU interpreter (tests)
anything else (CPU, MPS, CUDA without triton)  reference
=============================================  ===========================================

``FASTNABLA_BACKEND`` accepts ``auto`` (the default: the rule above), ``reference`` or ``triton``;
any other value raises a ``ValueError`` naming the variable. The rule is evaluated at call time,
so tests can switch backends with ``monkeypatch.setenv``; under ``torch.compile`` it is read when
the function is traced.

Within the reference backend an op may run its pure-torch closed forms under ``torch.compile``
(inductor C++ on CPU) where that pays: ``FASTNABLA_COMPILE`` = ``auto`` (the default: compile CPU
tensors with at least the op's measured ``min_numel`` elements), ``on`` (always) or ``off`` (never);
see :func:`use_compiled`. Nothing is compiled at import: :func:`compiled` compiles on first call.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable

import torch

ENV_BACKEND = "FASTNABLA_BACKEND"
BACKENDS = ("auto", "reference", "triton")
ENV_COMPILE = "FASTNABLA_COMPILE"
COMPILE_CHOICES = ("auto", "on", "off")


_TRITON_FOUND = importlib.util.find_spec("triton") is not None  # looked up once, triton not imported


def triton_available() -> bool:
    """Whether ``triton`` is importable (checked without importing it)."""
    return _TRITON_FOUND


def triton_interpret() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def requested_backend() -> str:
    """The validated value of ``FASTNABLA_BACKEND`` (``auto`` when unset or empty)."""
    value = os.environ.get(ENV_BACKEND, "").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV_BACKEND}={os.environ[ENV_BACKEND]!r} is not one of {BACKENDS}")
    return value


def triton_runs_on(device: torch.device) -> bool:
    """Whether Triton kernels can run on ``device`` here (CUDA, or CPU under the interpreter)."""
    if not triton_available():
        return False
    if device.type == "cuda":
        return not triton_interpret()  # the interpreter works on CPU tensors only
    return device.type == "cpu" and triton_interpret()


def select_backend(device: torch.device | str) -> str:
    """``"triton"`` or ``"reference"`` for tensors on ``device`` (see the module table).

    Raises:
        ValueError: ``FASTNABLA_BACKEND`` holds an unknown value.
        RuntimeError: ``FASTNABLA_BACKEND=triton`` but Triton cannot run on ``device``.
    """
    device = torch.device(device)
    requested = requested_backend()
    if requested == "reference":
        return "reference"
    runs = triton_runs_on(device)
    if requested == "triton" and not runs:
        why = (
            "triton is not installed"
            if not triton_available()
            else f"tensors are on {device.type!r}: Triton needs CUDA tensors, or CPU tensors with "
            "TRITON_INTERPRET=1 (the interpreter cannot run CUDA tensors)"
        )
        raise RuntimeError(f"{ENV_BACKEND}=triton but {why}")
    return "triton" if runs else "reference"


def kernel_memory_format(x: torch.Tensor) -> torch.memory_format:
    """Layout that elementwise kernels walk linearly, batch outermost: channels_last when ``x`` is
    (only) channels_last-contiguous 4-D, else contiguous. Fused ops return outputs in this layout
    on every backend, so fake (tracing) and real outputs have the same strides."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def requested_compile() -> str:
    """The validated value of ``FASTNABLA_COMPILE`` (``auto`` when unset or empty)."""
    value = os.environ.get(ENV_COMPILE, "").strip().lower() or "auto"
    if value not in COMPILE_CHOICES:
        raise ValueError(f"{ENV_COMPILE}={os.environ[ENV_COMPILE]!r} is not one of {COMPILE_CHOICES}")
    return value


def use_compiled(device: torch.device | str, numel: int, min_numel: int) -> bool:
    """Whether an op on the reference backend runs its closed forms compiled: ``FASTNABLA_COMPILE=on``,
    or ``auto`` with CPU tensors of at least ``min_numel`` elements (the op's measured break-even)."""
    choice = requested_compile()
    if choice == "auto":
        return torch.device(device).type == "cpu" and numel >= min_numel
    return choice == "on"


@functools.cache
def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn, dynamic=True)``, created on first use and cached: one compiled artefact per
    function for every batch size (size-0/1 dimensions still specialise, as dynamo always does)."""
    return torch.compile(fn, dynamic=True)
