"""Checkpoints written atomically, resumed exactly, and taken on SIGTERM/SIGINT.

Layout under a run's ``checkpoints/`` directory::

    step-0000040/rank0.pt ... rankN.pt   (each process's Trainer.state_dict())
    step-0000040/meta.json               (iteration, world size, user metadata; written last)
    latest                               (name of the newest complete checkpoint)

A checkpoint is written into ``step-XXXXXXX.tmp/`` and renamed once every process's file and
``meta.json`` are in place, and ``latest`` is replaced atomically after that, so a crash at any point
leaves the previous checkpoint intact and never a directory that looks complete but is not.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fastnabla.training.distributed import DistContext
from fastnabla.utils.io import atomic_write, write_json

LATEST = "latest"


def _step_name(iteration: int) -> str:
    return f"step-{iteration:07d}"


class CheckpointManager:
    """Saves and restores trainer state in ``directory`` (shared by all processes), keeping ``keep`` checkpoints."""

    def __init__(self, directory: str | Path, keep: int = 2, dist: DistContext | None = None):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep
        self.dist = dist or DistContext()

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        pointer = self.directory / LATEST
        if not pointer.is_file():
            return None
        path = self.directory / pointer.read_text().strip()
        if not (path / "meta.json").is_file():
            raise FileNotFoundError(f"{pointer} names {path.name}, which is not a complete checkpoint")
        return path

    def save(self, trainer, meta: dict[str, Any] | None = None) -> Path:
        """Write ``trainer.state_dict()`` of every process; returns the checkpoint directory."""
        final = self.directory / _step_name(trainer.iteration)
        tmp = final.with_name(final.name + ".tmp")
        if self.dist.is_main:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        self.dist.barrier()
        state = trainer.state_dict()
        atomic_write(tmp / f"rank{self.dist.rank}.pt", lambda f: torch.save(state, f))
        self.dist.barrier()
        if self.dist.is_main:
            write_json(tmp / "meta.json", {"iteration": trainer.iteration, "world_size": self.dist.world_size,
                                           **(meta or {})})
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            atomic_write(self.directory / LATEST, lambda f: f.write(final.name.encode()))
            self._prune()
        self.dist.barrier()
        return final

    def _prune(self) -> None:
        done = sorted(p for p in self.directory.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, trainer, path: str | Path | None = None) -> dict[str, Any]:
        """Restore ``trainer`` from ``path`` (default: the latest checkpoint); returns its metadata."""
        path = Path(path) if path is not None else self.latest()
        if path is None:
            raise FileNotFoundError(f"no checkpoint to resume from in {self.directory}")
        meta_file = path / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no meta.json)")
        meta = json.loads(meta_file.read_text())
        if meta["world_size"] != self.dist.world_size:
            raise ValueError(
                f"{path} was written by {meta['world_size']} process(es); resume it with the same number "
                f"(this run has {self.dist.world_size})"
            )
        state = load_state_file(path / f"rank{self.dist.rank}.pt")
        trainer.load_state_dict(state)
        return meta


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds pickled objects other than tensors and plain values (loading it could run code)."""


def load_state_file(file: str | Path, mmap: bool = False) -> Any:
    """Read a checkpoint file with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists, tuples and
    dicts only. A file someone shares cannot run code on the reader's machine: anything else in it (a pickled
    function or class instance) is refused with :class:`UnsafeCheckpointError` naming the file."""
    file = Path(file)
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        # torch's message opens with advice to reload with weights_only=False; keep only the line naming the object
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = next((line for line in lines if "GLOBAL" in line.upper()), lines[0] if lines else type(err).__name__)
        raise UnsafeCheckpointError(
            f"{file}: refused to load: it holds a pickled object that is not a tensor or plain value, and loading "
            f"it could run code ({detail}). fastnabla checkpoints hold tensors and plain values only: this file was "
            "not written by fastnabla, or was altered."
        ) from err


class StopRequest:
    """Turns SIGTERM/SIGINT into a flag the training loop polls between iterations.

    The first signal sets :attr:`requested`; a second SIGINT raises ``KeyboardInterrupt`` as usual.
    Under several processes :meth:`agreed` makes every process stop at the same iteration.
    """

    def __init__(self, dist: DistContext | None = None):
        self.dist = dist or DistContext()
        self.requested = False
        self.signal_name: str | None = None

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signal handlers can only be installed from the main thread
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in previous:
            signal.signal(s, self._handle)
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def agreed(self) -> bool:
        """Whether any process was asked to stop (a collective call under several processes)."""
        if not self.dist.enabled:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0])
        return bool(self.dist.all_reduce_sum_(flag) > 0)
