"""The one dispatch path of every fused op in :mod:`fastnabla.ops`: the backend rule, and :class:`FusedOp`,
through which each op registers its implementations and which picks one of them per call, once.

**Backend rule** (:func:`select_backend`):

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
see :func:`use_compiled`. Ops without a measured threshold never compile. Nothing is compiled at
import: :func:`compiled` compiles on first call.

**One path per call** (:meth:`FusedOp.select`, evaluated once, on the call's first tensor):

* ``"triton"`` -- the backend is Triton and the tensors are non-empty fp32/bf16/fp16: the Triton kernels
  of ``kernels/<op>.py`` (forward and backward);
* ``"compiled"`` -- the reference backend and :func:`use_compiled`: the op's closed forms compiled by
  inductor (``dynamic=True``: one graph per pass for every batch size > 1; separate forward and backward
  inference graphs, so nothing but the op's inputs is saved and ``retain_graph=True`` works);
* ``"reference"`` -- anything else: the op's pure-torch reference inline, with plain autograd (and under
  ``torch.compile`` inductor sees through it).

The chosen path is then carried, never re-decided: under ``torch.compile`` the entry calls the op's
``torch.library`` custom op with the path as its last argument (fake + autograd registrations, so
``fullgraph=True`` traces through it); in eager mode with autograd on, an ``autograd.Function`` built
from the same setup and backward (it skips ~0.2 ms of custom-op dispatch per fwd+bwd); without autograd,
the implementation itself. The backward runs on the forward's path. A custom op called directly gets the
path ``"auto"`` by default and selects it itself.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from fastnabla.kernels.triton_utils import kernel_memory_format, triton_interpret
from fastnabla.ops.checks import FLOAT_DTYPES

Tensor = torch.Tensor
ENV_BACKEND = "FASTNABLA_BACKEND"
BACKENDS = ("auto", "reference", "triton")
ENV_COMPILE = "FASTNABLA_COMPILE"
COMPILE_CHOICES = ("auto", "on", "off")
PATHS = ("reference", "compiled", "triton")

__all__ = [
    "Autograd",
    "FusedOp",
    "Pass",
    "compiled",
    "kernel_memory_format",
    "requested_backend",
    "requested_compile",
    "select_backend",
    "triton_available",
    "triton_interpret",
    "triton_runs_on",
    "use_compiled",
]


_TRITON_FOUND = importlib.util.find_spec("triton") is not None  # looked up once, triton not imported


def triton_available() -> bool:
    """Whether ``triton`` is importable (checked without importing it)."""
    return _TRITON_FOUND


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


# ---------------------------------------------------------------- the helper every op registers with


def _first(args: tuple) -> Tensor:
    return args[0]


@dataclass(frozen=True)
class Pass:
    """One pass (forward or backward) of an op, as its two implementations see it.

    ``reference`` is the pure-torch closed form (run under ``no_grad``; compiled by inductor on the
    ``"compiled"`` path); ``triton`` names the launcher in ``kernels/<op>.py``. Both are called with
    ``args(op_args)`` (default: the custom op's arguments unchanged), the launcher with ``triton_args``
    where its arguments differ. ``layout(op_args)`` is the tensor whose kernel layout
    (:func:`kernel_memory_format`) the closed form's outputs of the same dimensionality are given, as the
    kernels return them; it also decides the path of a direct custom-op call."""

    reference: Callable[..., Any]
    triton: str
    args: Callable[[tuple], tuple] | None = None
    triton_args: Callable[[tuple], tuple] | None = None
    layout: Callable[[tuple], Tensor] = _first


@dataclass(frozen=True)
class Autograd:
    """How an op's backward is wired: one generic setup and backward serve every op.

    The backward custom op takes ``(*upstream gradients, *saved tensors, *constants, <needs>, path)`` and
    returns the gradients flagged in ``needs``, in the order of ``grad_inputs``. ``<needs>`` is spelled as
    ``needs_arg`` says: ``"flags"`` one ``bool`` per entry of ``grad_inputs``, ``"list"`` one ``bool[]``,
    ``"none"`` nothing (one differentiable input). The spellings are those of the ops' first release:
    AOTAutograd's cache keys a compiled graph by its forward only, so a backward op whose arguments changed
    would be replayed from an older cache with the old arguments.

    Attributes:
        grad_inputs: positions of the op's inputs that may receive a gradient, in the backward's order.
        save: ``inputs -> (tensors to save, non-tensor constants)`` for the backward.
        routed: ``inputs -> flags``: which of ``grad_inputs`` the options route a gradient to (default all).
        outputs: ``inputs -> flags``: which outputs the forward returns, when that is a subset; their
            missing upstream gradients stay ``None`` (not materialised) and reach the backward as ``None``.
        needs_arg: how the backward custom op takes the flags (above).
    """

    grad_inputs: tuple[int, ...]
    save: Callable[[tuple], tuple[tuple, tuple]]
    routed: Callable[[tuple], Sequence[bool]] | None = None
    outputs: Callable[[tuple], Sequence[bool]] | None = None
    needs_arg: Literal["flags", "list", "none"] = "flags"


def _in_kernel_layout(out: Any, like: Tensor, args: tuple) -> Any:
    """Closed-form outputs as the kernels return them: those with ``like``'s dimensionality in its kernel
    layout, none aliasing an input or an earlier output (an output may not alias under ``torch.library``;
    a closed form may return an input unchanged, e.g. a gradient equal to an upstream gradient)."""
    if out is None:
        return None
    single = isinstance(out, Tensor)
    nd = like.dim()
    fmt = kernel_memory_format(like)
    outs = [t.contiguous(memory_format=fmt) if t.dim() == nd else t for t in ([out] if single else out)]
    ptrs = [t.data_ptr() for t in outs]
    taken = {t.data_ptr() for t in args if isinstance(t, Tensor) and t.dim() == nd}  # [B] vectors never alias
    for i, ptr in enumerate(ptrs):
        if ptr in taken or ptr in ptrs[:i]:  # e.g. d fl_t = d g(x_t), or d fl_cot = an upstream gradient
            outs[i] = outs[i].clone()
    return outs[0] if single else type(out)(outs)


class _FusedFunction(torch.autograd.Function):
    """The eager twin of a custom op's registered autograd formula (same setup, same backward); each
    :class:`FusedOp` gets a subclass named after it, so autograd graphs and profiles name the op."""

    @staticmethod
    def forward(ctx, op: FusedOp, path: str, *args):  # ctx-first: apply() skips a per-call signature bind
        out = op.forward(path, *args)
        op.setup_context(ctx, args, path)
        ctx.op = op
        return tuple(out) if isinstance(out, list) else out

    @staticmethod
    def backward(ctx, *grads):
        op = ctx.op
        grads_in = op.input_grads(ctx, ctx.needs_input_grad[2:], grads, lambda *a: op.backward(ctx.path, *a))
        return (None, None, *grads_in)


class FusedOp:
    """A hot-path op: its implementations, registered once, and the rule that picks one per call.

    The op's module declares its ``torch.library`` custom ops with typed signatures ending in
    ``path: str = "auto"`` whose bodies call :meth:`forward` / :meth:`backward`, registers their fakes,
    and hands the forward one to :meth:`register`. Its public entry checks the inputs and calls the instance:
    ``OP(*op_args, reference=lambda: <the pure-torch reference inline>)``.

    Args:
        name: the custom op's name in the ``fastnabla`` namespace.
        kernels: the module of ``fastnabla.kernels`` holding the Triton launchers (imported on first use).
        forward, backward: the two passes (``backward`` only for ops with autograd).
        autograd: how the backward is wired (``None``: the op has no backward).
        min_numel: elements per tensor from which ``FASTNABLA_COMPILE=auto`` compiles the closed forms on
            CPU (``None``: the op never compiles).
    """

    def __init__(self, name: str, *, kernels: str, forward: Pass, backward: Pass | None = None,
                 autograd: Autograd | None = None, min_numel: int | None = None) -> None:
        self.name = name
        self.kernels = kernels
        self.fwd = forward
        self.bwd = backward
        self.autograd = autograd
        self.min_numel = min_numel
        self.op: Any = None
        self.backward_op: Any = None
        self._kernel_module: Any = None
        title = "".join(part.title() for part in name.split("_"))
        self.function = type(f"{title}Function", (_FusedFunction,), {"__module__": __name__}) if autograd else None

    def __repr__(self) -> str:
        return f"FusedOp(fastnabla::{self.name})"

    # ------------------------------------------------------------ registration

    def register(self, op: Any) -> None:
        """Take the op's custom op ``fastnabla::<name>`` (its fake registered) and, for an op with autograd,
        register the generic autograd formula over its backward op ``fastnabla::<name>_backward``."""
        self.op = getattr(torch.ops.fastnabla, self.name).default
        if self.autograd is None:
            return
        self.backward_op = getattr(torch.ops.fastnabla, f"{self.name}_backward").default

        def setup(ctx, inputs, output) -> None:
            self.setup_context(ctx, inputs[:-1], inputs[-1])

        spelling = self.autograd.needs_arg

        def backward_op(*args, path: str):  # args: (*upstream, *saved, *constants, needs)
            *rest, needs = args
            if spelling == "flags":
                return self.backward_op(*rest, *needs, path)
            if spelling == "list":
                return self.backward_op(*rest, list(needs), path)
            return self.backward_op(*rest, path)

        def backward(ctx, *grads):
            if len(grads) == 1 and isinstance(grads[0], (list, tuple)):  # an op returning Tensor[] gets one list
                grads = tuple(grads[0])
            return tuple(self.input_grads(ctx, ctx.needs_input_grad, grads,
                                          lambda *a: backward_op(*a, path=ctx.path)))

        op.register_autograd(backward, setup_context=setup)

    # ------------------------------------------------------------ the one decision

    def select(self, like: Tensor) -> str:
        """The path (:data:`PATHS`) of one call on tensors like ``like`` (module docstring). Reads (and
        validates) ``FASTNABLA_BACKEND`` on every call, ``FASTNABLA_COMPILE`` where it decides: ops with a
        compiled form, on the reference backend."""
        backend = select_backend(like.device)
        if backend == "triton" and like.numel() and like.dtype in FLOAT_DTYPES:
            return "triton"
        if self.min_numel is not None and use_compiled(like.device, like.numel(), self.min_numel):
            return "compiled"
        return "reference"

    def __call__(self, *args: Any, reference: Callable[[], Any], path: str | None = None) -> Any:
        """Run one call: ``args`` are the custom op's arguments (without the path), ``reference`` runs the
        pure-torch reference inline; ``path`` (default: :meth:`select` on ``args``) lets a driver that calls
        several ops decide once for all of them."""
        path = path or self.select(self.fwd.layout(args))
        if path == "reference":
            return reference()
        if torch.compiler.is_compiling():
            return self.op(*args, path)
        if self.function is not None and torch.is_grad_enabled():
            return self.function.apply(self, path, *args)
        return self.forward(path, *args)

    # ------------------------------------------------------------ implementations

    def forward(self, path: str, *args: Any) -> Any:
        """The forward on ``path`` (``"auto"``: selected here): the custom op's body and the eager paths'."""
        if path == "auto":
            path = self.select(self.fwd.layout(args))
        return self._run(self.fwd, path, args)

    def backward(self, path: str, *args: Any) -> Any:
        """The backward on ``path``: the backward custom op's body and the eager Function's backward;
        ``args`` = ``(*upstream, *saved, *constants, needs)`` with ``needs`` one flag per grad input."""
        args = (*args[:-1], tuple(bool(n) for n in args[-1]))
        if path == "auto":
            path = self.select(self.bwd.layout(args))
        return self._run(self.bwd, path, args)

    def _run(self, impl: Pass, path: str, args: tuple) -> Any:
        if path == "triton":
            if self._kernel_module is None:
                self._kernel_module = importlib.import_module(f"fastnabla.kernels.{self.kernels}")
            launch = getattr(self._kernel_module, impl.triton)  # looked up per call (tests patch launchers)
            adapt = impl.triton_args or impl.args
            return launch(*(adapt(args) if adapt else args))
        fn = compiled(impl.reference) if path == "compiled" else impl.reference
        with torch.no_grad():
            out = fn(*(impl.args(args) if impl.args else args))
        return _in_kernel_layout(out, impl.layout(args), args)

    # ------------------------------------------------------------ autograd (generic)

    def setup_context(self, ctx: Any, inputs: tuple, path: str) -> None:
        """Save what :attr:`autograd` names (no activations unless the op saves its inputs)."""
        spec = self.autograd
        tensors, constants = spec.save(inputs)
        ctx.save_for_backward(*tensors)
        ctx.constants = constants
        ctx.routed = tuple(spec.routed(inputs)) if spec.routed else (True,) * len(spec.grad_inputs)
        ctx.outputs = tuple(spec.outputs(inputs)) if spec.outputs else None
        ctx.path = path
        if spec.outputs:
            ctx.set_materialize_grads(False)  # an unused output's gradient stays None: the backward skips it

    def input_grads(self, ctx: Any, needs_input_grad: Sequence[bool], grads: tuple,
                    backward: Callable[..., Any]) -> list:
        """Gradients of every input of the op: ``backward`` (the backward custom op, or :meth:`backward`)
        computes those autograd asks for and the options route; the rest are ``None``."""
        spec = self.autograd
        result: list = [None] * len(needs_input_grad)
        needs = [bool(needs_input_grad[i]) and routed for i, routed in zip(spec.grad_inputs, ctx.routed, strict=True)]
        if ctx.outputs is not None:
            given = iter(grads)
            grads = tuple(next(given) if returned else None for returned in ctx.outputs)
        if not any(needs) or all(g is None for g in grads):
            return result
        out = backward(*grads, *ctx.saved_tensors, *ctx.constants, needs)
        out = iter([out] if isinstance(out, Tensor) else out)
        for i, need in zip(spec.grad_inputs, needs, strict=True):
            if need:
                result[i] = next(out)
        return result
