"""Profiling helpers: NVTX ranges that also appear in ``torch.profiler`` traces, a phase timer, and a
description of the machine a measurement was taken on.

``nvtx_range`` uses the ``nvtx`` package (ranges are no-ops unless a tool such as Nsight Systems is
attached, so it is safe on CPU-only machines). It never calls ``torch.cuda.nvtx``, which raises on
CPU builds of torch. Set ``FASTNABLA_NVTX=0`` to turn NVTX ranges off.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import threading
import time
from collections import defaultdict
from collections.abc import Iterator

import torch

try:
    import nvtx as _nvtx
except ImportError:  # pragma: no cover - nvtx is an optional dependency
    _nvtx = None

NVTX_DOMAIN = "fastnabla"


def nvtx_enabled() -> bool:
    """Whether ``nvtx_range`` emits NVTX ranges (``nvtx`` importable and ``FASTNABLA_NVTX`` != 0)."""
    return _nvtx is not None and os.environ.get("FASTNABLA_NVTX", "1") != "0"


class nvtx_range(contextlib.ContextDecorator):  # noqa: N801 - used like a function
    """Named range: ``with nvtx_range("sample"): ...`` or ``@nvtx_range("loss")``.

    Emits an NVTX push/pop in the ``fastnabla`` domain (see :func:`nvtx_enabled`) and, only while
    ``torch.profiler`` is recording, a ``record_function`` range of the same name, so one
    annotation shows up both in Nsight Systems and in chrome traces. Re-entrant and usable from
    several threads (one stack per thread). Not meant for code inside ``torch.compile`` regions.
    """

    def __init__(self, name: str, color: str | None = None):
        self.name = str(name)
        self.color = color
        self._local = threading.local()

    def __enter__(self) -> nvtx_range:
        stack = self._local.__dict__.setdefault("stack", [])
        record = None
        if torch.autograd._profiler_enabled():
            record = torch.autograd.profiler.record_function(self.name)
            record.__enter__()
        pushed = nvtx_enabled()
        if pushed:
            _nvtx.push_range(self.name, color=self.color, domain=NVTX_DOMAIN)
        stack.append((record, pushed))
        return self

    def __exit__(self, *exc) -> bool:
        record, pushed = self._local.stack.pop()
        if pushed:
            _nvtx.pop_range(domain=NVTX_DOMAIN)
        if record is not None:
            record.__exit__(*exc)
        return False


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class PhaseTimer:
    """Wall time per named phase, accumulated over calls; each phase is also an :class:`nvtx_range`.

    ``sync=True`` synchronizes CUDA at both edges of a phase, so GPU work is charged to the phase
    that launched it (at the cost of the synchronization; leave it off in throughput runs).
    """

    def __init__(self, sync: bool = False):
        self.sync = sync
        self.total: dict[str, float] = defaultdict(float)
        self.count: dict[str, int] = defaultdict(int)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.sync:
            _sync()
        start = time.perf_counter()
        try:
            with nvtx_range(name):
                yield
        finally:
            if self.sync:
                _sync()
            self.total[name] += time.perf_counter() - start
            self.count[name] += 1

    def summary(self) -> dict[str, dict[str, float]]:
        """``{phase: {"total_s", "calls", "mean_ms"}}``, slowest phase first."""
        order = sorted(self.total, key=self.total.get, reverse=True)
        return {
            k: {"total_s": self.total[k], "calls": self.count[k], "mean_ms": 1e3 * self.total[k] / self.count[k]}
            for k in order
        }

    def table(self) -> str:
        """The summary as a markdown table."""
        rows = ["| phase | calls | total (s) | mean (ms) |", "|---|---:|---:|---:|"]
        for k, v in self.summary().items():
            rows.append(f"| {k} | {v['calls']} | {v['total_s']:.3f} | {v['mean_ms']:.2f} |")
        return "\n".join(rows)


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, str]:
    """Where a measurement was taken: CPU model and cores, torch/triton/CUDA versions, GPU names."""
    info = {
        "cpu": _cpu_model(),
        "cpu_cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda or "none (CPU build)",
    }
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["gpu"] = ", ".join(names)
    else:
        info["gpu"] = "none"
    return info
