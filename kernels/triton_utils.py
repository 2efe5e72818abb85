"""What every Triton kernel module of this folder shares (``fastnabla.kernels.triton_utils``).

The kernels are the lowest layer of fastnabla: this module and the kernel modules import nothing from
``fastnabla`` (they import each other with relative imports), and nothing here imports triton until a
kernel is jitted. That keeps ``import fastnabla.ops`` free of triton (the dispatch layer reads
:func:`triton_interpret` and :func:`kernel_memory_format` from here) and lets the kernel modules import
where triton is missing: :func:`import_triton` is the one guarded import.

* :func:`import_triton` -- ``(triton, triton.language)`` or ``(None, None)``.
* :func:`triton_interpret` -- whether ``TRITON_INTERPRET`` asks for Triton's CPU interpreter.
* :func:`kernel_memory_format` -- the layout the elementwise kernels walk (batch outermost).
* :class:`LazyKernel` / :func:`lazy_jit` -- a kernel jitted on first launch, once per interpreter mode,
  with its derived ``constexpr`` flags declared at the kernel (``@triton.heuristics``).
* :func:`elementwise_config`, :func:`interpreter_block`, :func:`checked_block`, :func:`warps_for`,
  :func:`cdiv`, :func:`next_power_of_2` and :func:`launch_per_sample` -- launch configuration (plain
  Python: a launch where triton is missing fails at the kernel, with the message above) and the 2-D
  ``(blocks, samples)`` launch.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

MAX_GRID_Y = 65535  # CUDA limit on grid axis 1; per-sample launches slice larger batches
INTERPRETER_MAX_BLOCK = 1 << 16  # the interpreter costs ~1.5 ms per program: few, large blocks
NEEDS_TRITON = "the triton backend of fastnabla needs `triton` (pip install 'fastnabla[gpu]')"

__all__ = [
    "INTERPRETER_MAX_BLOCK",
    "MAX_GRID_Y",
    "LazyKernel",
    "cdiv",
    "checked_block",
    "elementwise_config",
    "import_triton",
    "interpreter_block",
    "kernel_memory_format",
    "launch_per_sample",
    "lazy_jit",
    "next_power_of_2",
    "triton_interpret",
    "warps_for",
]


@functools.cache
def import_triton() -> tuple[Any, Any]:
    """``(triton, triton.language)``, or ``(None, None)`` where triton cannot be imported.

    The kernel modules bind the pair at import (``triton, tl = import_triton()``): their kernel functions
    only name ``tl`` inside bodies and string annotations, so they import without triton, and a launch
    then raises a ``RuntimeError`` that says what to install."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None, None
    return triton, tl


def triton_interpret() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's CPU interpreter (``1``, ``true``, ``on``, ``yes``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def kernel_memory_format(x: torch.Tensor) -> torch.memory_format:
    """Layout that elementwise kernels walk linearly, batch outermost: channels_last when ``x`` is
    (only) channels_last-contiguous 4-D, else contiguous. Fused ops return outputs in this layout
    on every backend, so fake (tracing) and real outputs have the same strides."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class LazyKernel:
    """A Triton kernel function, jitted on first launch and cached per ``TRITON_INTERPRET`` mode.

    triton decides between compiling and interpreting when a function is jitted (it reads
    ``TRITON_INTERPRET`` at that moment), so the plain function is kept and jitted once per mode: tests
    may switch the interpreter on at any time before a launch. ``heuristics`` maps ``constexpr``
    parameters that follow from the other launch arguments to the function computing them (what
    ``@triton.heuristics`` does): a launch passes the independent flags only, and :meth:`jit` (the bare
    ``triton.jit`` function, e.g. to compile it for another target) still takes every parameter.

    Launch as a jitted kernel: ``kernel[grid](*args, **constexprs)``.
    """

    def __init__(self, fn: Callable, heuristics: Mapping[str, Callable[[dict], Any]] | None = None) -> None:
        self.fn = fn
        self.heuristics = dict(heuristics or {})
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._by_mode: dict[bool, tuple[Any, Any]] = {}

    def _jitted(self) -> tuple[Any, Any]:
        mode = triton_interpret()
        if mode not in self._by_mode:
            triton, _ = import_triton()
            if triton is None:
                raise RuntimeError(NEEDS_TRITON)
            jitted = triton.jit(self.fn)
            launcher = triton.heuristics(self.heuristics)(jitted) if self.heuristics else jitted
            self._by_mode[mode] = (jitted, launcher)
        return self._by_mode[mode]

    def jit(self) -> Any:
        """The ``triton.jit`` function for the current mode (every ``constexpr`` is a parameter)."""
        return self._jitted()[0]

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., Any]:
        return self._jitted()[1][grid]


def lazy_jit(fn: Callable | None = None, *, heuristics: Mapping[str, Callable[[dict], Any]] | None = None):
    """Decorator: ``@lazy_jit`` or ``@lazy_jit(heuristics={"FLAG": lambda args: ...})`` -> :class:`LazyKernel`."""
    if fn is None:
        return lambda f: LazyKernel(f, heuristics)
    return LazyKernel(fn, heuristics)


# ---------------------------------------------------------------- launch configuration


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for non-negative ``a`` and positive ``b`` (``triton.cdiv``)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``), as ``triton.next_power_of_2`` for ``n >= 1``."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def checked_block(block_size: int) -> int:
    """A caller-chosen block size: a power of two >= 16."""
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    return block_size


def interpreter_block(n: int) -> int:
    """Block for ``n`` elements under the interpreter: all of them in one program, up to 2^16."""
    return min(max(16, next_power_of_2(n)), INTERPRETER_MAX_BLOCK)


def warps_for(block: int) -> int:
    """8 warps for blocks of 2048 elements and more, else 4."""
    return 8 if block >= 2048 else 4


def elementwise_config(n: int, interpret: bool, block_size: int | None = None) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` of an elementwise launch over ``n`` elements per sample: memory-bound, so
    1-2K elements per program, which gives enough programs for SD latents (N = 16384)."""
    if block_size is not None:
        block = checked_block(block_size)
    elif interpret:
        block = interpreter_block(n)
    else:
        block = max(128, min(next_power_of_2(n), 2048 if n >= (1 << 16) else 1024))
    return block, warps_for(block)


def launch_per_sample(kernel: Any, tensors: list[torch.Tensor], scalars: tuple, n: int, block: int, num_warps: int,
                      **constexprs: Any) -> None:
    """Launch ``kernel(*tensors, n, *scalars, BLOCK=block, **constexprs)`` on the grid ``(cdiv(n, block), B)``
    (each program loads its sample's coefficients once), FMA contraction off. Batches beyond the grid's
    axis-1 limit (:data:`MAX_GRID_Y`) launch in slices of every tensor's first dimension."""
    batch = tensors[0].shape[0]
    for start in range(0, batch, MAX_GRID_Y):
        stop = min(batch, start + MAX_GRID_Y)
        kernel[(cdiv(n, block), stop - start)](
            *(t[start:stop] for t in tensors), n, *scalars,
            BLOCK=block, num_warps=num_warps, enable_fp_fusion=False, **constexprs,
        )
