"""Peak memory of one call, on CUDA and on CPU (imported as ``memory_utils`` by the bench suites).

:func:`peak_memory` returns the extra bytes live at the peak of one call of ``fn`` over what was
live when it started (tensors alive before the call, e.g. model weights and inputs, are not counted):

* **CUDA**: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
  ``memory_allocated`` before the call: every byte the caching allocator handed out (tensors,
  autograd's saved activations, gradients, temporaries, cuBLAS/cuDNN workspaces it serves).
* **CPU** (no allocator statistics there): ``torch.profiler`` with ``profile_memory=True`` records one
  event per allocation and per free served by c10's CPU allocator, with its signed size and a
  timestamp. Replayed in time order, their running sum is the live extra memory; its maximum is the
  peak. That covers every tensor storage (activations, saved tensors, gradients, temporaries, the
  ATen workspaces that allocate tensors), in every thread the profiler sees. Not counted: memory
  that never goes through c10's allocator (oneDNN's private scratchpads, numpy arrays such as the
  Triton interpreter's, Python objects), and nothing is counted at page granularity (no RSS: freed
  blocks that the system allocator keeps do not inflate it). A free of a tensor allocated before the
  call makes the running sum go down, as it does for the CUDA measure.

:func:`check_cpu_peak_memory` allocates tensors of known sizes and checks the CPU measure against
the exact answer; the forward-looking benchmark runs it before trusting any CPU number.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PeakMemory:
    peak_bytes: int  # extra bytes live at the peak of the call
    allocated_bytes: int  # bytes allocated during the call in all (CPU measure; CUDA: None-like 0)
    method: str  # "cuda_max_memory_allocated" or "cpu_profiler_memory_events"


def _cuda_peak(fn: Callable[[], object], device: torch.device) -> PeakMemory:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return PeakMemory(torch.cuda.max_memory_allocated(device) - base, 0, "cuda_max_memory_allocated")


def _cpu_peak(fn: Callable[[], object]) -> PeakMemory:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events = [e for e in events if e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    live = peak = allocated = 0
    for e in events:
        live += e.nbytes()
        allocated += max(e.nbytes(), 0)
        peak = max(peak, live)
    return PeakMemory(peak, allocated, "cpu_profiler_memory_events")


def peak_memory(fn: Callable[[], object], device: torch.device) -> PeakMemory:
    """Extra bytes live at the peak of one call of ``fn`` on ``device`` (see the module docstring)."""
    if device.type == "cuda":
        return _cuda_peak(fn, device)
    if device.type == "cpu":
        return _cpu_peak(fn)
    raise ValueError(f"peak memory is measured on cuda or cpu devices, not {device.type!r}")


def check_cpu_peak_memory() -> None:
    """Raise ``AssertionError`` unless the CPU measure is exact on known allocations (4 + 8 MiB live,
    then 4 MiB freed and 2 MiB allocated: peak 12 MiB), within 64 KiB of bookkeeping tensors."""
    mib = 1 << 20

    def known() -> None:
        a = torch.empty(mib, dtype=torch.float32)  # 4 MiB
        b = torch.empty(2 * mib, dtype=torch.float32)  # 8 MiB: 12 MiB live
        del a
        c = torch.empty(mib // 2, dtype=torch.float32)  # 2 MiB: 10 MiB live
        del b, c

    measured = _cpu_peak(known)
    assert 12 * mib <= measured.peak_bytes <= 12 * mib + 64 * 1024, f"CPU peak {measured.peak_bytes} != 12 MiB"
    assert 14 * mib <= measured.allocated_bytes <= 14 * mib + 64 * 1024, measured
