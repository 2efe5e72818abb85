"""Counting forward and backward passes through networks (UNet, VAE decoder, reward, flow).

The release spends per trained transition 3 UNet forwards + 5 backward-type UNet passes, 2 VAE-decode
VJPs and 2 reward VJPs (docs/flops.md); these counters measure the same numbers for our
trainer, on any device.

* a **forward** is one call of a watched module (forward hook) or method (wrapper); ``samples``
  adds up its batch size (a CFG pair call on ``B`` latents counts ``2B``);
* a **backward** is one backward-type pass through such a call: any ``loss.backward()`` or
  ``torch.autograd.grad`` -- VJPs w.r.t. the *input* included -- that propagates a gradient into the
  call's output. It is detected by a hook on the output tensor, registered at forward time only
  when the output requires grad (so ``no_grad`` forwards never count). A pass that reaches the
  output twice (``retain_graph`` and a second ``grad``) counts twice; a call whose output gets no
  gradient counts none.

Counting is for eager runs: under ``torch.compile`` the hooks run inside the compiled region and
may be traced away.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

Tensor = torch.Tensor


@dataclass
class PassCount:
    """Passes through one watched network."""

    forward: int = 0
    backward: int = 0
    forward_samples: int = 0
    backward_samples: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "forward": self.forward,
            "backward": self.backward,
            "forward_samples": self.forward_samples,
            "backward_samples": self.backward_samples,
        }


def _tensors(obj) -> Iterable[Tensor]:
    """Tensors in a module output (tensor, tuple/list, dict, diffusers ``BaseOutput``)."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):  # diffusers BaseOutput is an OrderedDict
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


class PassCounter:
    """Counts passes through watched networks; use as a context manager or call :meth:`close`.

    Example::

        with PassCounter() as counter:
            counter.watch_module("unet", task.unet)
            counter.watch_method("reward", task.reward.model, "score")
            ...  # run a training step
        counter.counts["unet"].backward
    """

    def __init__(self) -> None:
        self.counts: dict[str, PassCount] = {}
        self._undo: list[Callable[[], None]] = []

    # --- recording -----------------------------------------------------------------------------
    def _record(self, name: str, output) -> None:
        count = self.counts[name]
        tensors = [t for t in _tensors(output) if t.is_floating_point()]
        if not tensors:
            return
        batch = int(tensors[0].shape[0]) if tensors[0].dim() else 1
        count.forward += 1
        count.forward_samples += batch
        if not torch.is_grad_enabled():
            return
        head = next((t for t in tensors if t.requires_grad), None)
        if head is None:
            return

        def on_grad(grad: Tensor) -> None:
            count.backward += 1
            count.backward_samples += batch

        head.register_hook(on_grad)

    def watch_module(self, name: str, module: nn.Module) -> PassCounter:
        """Count calls of ``module`` (through ``module(...)``) under ``name``."""
        self.counts.setdefault(name, PassCount())
        handle = module.register_forward_hook(lambda mod, args, output: self._record(name, output))
        self._undo.append(handle.remove)
        return self

    def watch_method(self, name: str, obj: object, method: str) -> PassCounter:
        """Count calls of ``obj.method(...)`` (e.g. a reward model's ``score``) under ``name``."""
        self.counts.setdefault(name, PassCount())
        original = getattr(obj, method)
        had_instance_attr = method in vars(obj)

        @functools.wraps(original)
        def counted(*args, **kwargs):
            out = original(*args, **kwargs)
            self._record(name, out)
            return out

        setattr(obj, method, counted)

        def undo() -> None:
            if had_instance_attr:
                setattr(obj, method, original)
            else:
                delattr(obj, method)

        self._undo.append(undo)
        return self

    # --- results -------------------------------------------------------------------------------
    def reset(self) -> None:
        for name in self.counts:
            self.counts[name] = PassCount()

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {k: v.as_dict() for k, v in self.counts.items()}

    def per(self, units: int) -> dict[str, dict[str, float]]:
        """Counts divided by ``units`` (e.g. trained transitions): passes per unit."""
        if units < 1:
            raise ValueError(f"units must be >= 1, got {units}")
        return {k: {kk: vv / units for kk, vv in v.as_dict().items()} for k, v in self.counts.items()}

    def close(self) -> None:
        """Remove every hook and wrapper (the counts stay readable)."""
        while self._undo:
            self._undo.pop()()

    def __enter__(self) -> PassCounter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def count_task_passes(task) -> Iterator[PassCounter]:
    """A :class:`PassCounter` on an SD task's ``unet``, ``vae_decoder``, ``flow`` and ``reward``
    (the reward model's ``score``; the ``Reward`` wrapper calls it directly, not through ``__call__``), and
    ``fl_surrogate`` (the forward-looking surrogate's decoder) when the task has one."""
    with PassCounter() as counter:
        counter.watch_module("unet", task.unet)
        counter.watch_module("vae_decoder", task.vae.decoder)
        if getattr(task, "fl_surrogate", None) is not None:
            counter.watch_module("fl_surrogate", task.fl_surrogate.decoder)
        counter.watch_module("flow", task.flow_net)
        counter.watch_method("reward", task.reward.model, "score")
        yield counter
