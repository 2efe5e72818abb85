"""Measurement helpers shared by the benchmark suites (imported as ``bench_utils``: pytest puts
``bench/`` on ``sys.path`` for its conftest-rooted tests).

Every benchmark records in ``benchmark.extra_info``: ``op``, ``provider``, ``mode``, ``shape``,
``dtype``, ``bytes_min`` (the bytes the op must read + write at least), ``copy_median_s`` and
``ratio_to_copy`` (its median over the median of a ``Tensor.copy_`` moving ``bytes_min`` bytes,
timed in the same run by :func:`copy_median`), and memory: ``saved_bytes`` (tensors saved for
backward, via ``torch.autograd.graph.saved_tensors_hooks``) and, on CUDA, ``peak_bytes`` (extra
``torch.cuda.max_memory_allocated`` over one call). Suites whose op saves some of its inputs also
record ``saved_extra_bytes``: the saved storages that are *not* the op's inputs, i.e. the memory that
saving for backward allocates and keeps alive (an input is held by the caller anyway, though saving it
can extend its lifetime).
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Iterable

import torch

# Per benchmark: rounds to fill about TARGET_S of timed calls, within [MIN_ROUNDS, MAX_ROUNDS], so
# the whole CPU suite stays around a minute.
TARGET_S = 0.25
MIN_ROUNDS = 5
MAX_ROUNDS = 200
WARMUP_ROUNDS = 2


# Cases that take minutes on a 2-core CPU (SD 1.5 batch-32 latents, the SD 1.5 VAE decode-VJP): marked ``long``
# and skipped on CPU unless ``--bench-long`` is given (conftest.py); a CUDA run includes them.
LONG_CASES = frozenset({"sd-32x4x64x64", "sd15-vae"})


def cases(names: Iterable[str]) -> list:
    """``names`` as ``pytest.mark.parametrize`` values, the ones in :data:`LONG_CASES` marked ``long``."""
    import pytest

    return [pytest.param(n, marks=pytest.mark.long) if n in LONG_CASES else n for n in names]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` followed by a device synchronisation, so each timed call includes its GPU work."""

    def call():
        out = fn()
        sync(device)
        return out

    return call


def rounds_for(fn: Callable[[], object]) -> int:
    """How many rounds give about ``TARGET_S`` of timing, from one (already warm) call."""
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    return int(min(MAX_ROUNDS, max(MIN_ROUNDS, TARGET_S / once)))


def median_time(fn: Callable[[], object], device: torch.device, min_time: float = 0.1, min_reps: int = 10) -> float:
    """Median seconds per call of ``fn`` (synchronised), after 3 warm-up calls."""
    call = timed_call(fn, device)
    for _ in range(3):
        call()
    times: list[float] = []
    total = 0.0
    while len(times) < min_reps or (total < min_time and len(times) < 1000):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
        total += times[-1]
    return statistics.median(times)


@functools.cache
def _copy_median(nbytes: int, device_str: str) -> float:
    device = torch.device(device_str)
    numel = max(1, nbytes // 8)  # fp32: read 4 + write 4 bytes per element = nbytes in all
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    return median_time(lambda: dst.copy_(src), device)


def copy_median(nbytes: int, device: torch.device) -> float:
    """Median seconds of ``dst.copy_(src)`` moving ``nbytes`` bytes (half read, half written)."""
    return _copy_median(int(nbytes), str(device))


def saved_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor | None] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while running ``fn``, leaving out the
    storages of the tensors in ``exclude`` (pass the op's inputs to count only what saving allocates)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude if t is not None}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Extra CUDA memory at the peak of one call of ``fn`` (None off CUDA)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def measure_op(
    benchmark,
    *,
    forward: Callable[[], object],
    wrt: list[torch.Tensor],
    upstream: list[torch.Tensor],
    mode: str,
    device: torch.device,
    group: str,
    nbytes: int,
    info: dict,
    op_inputs: list[torch.Tensor] | None = None,
) -> None:
    """Time one op case and record the standard ``extra_info`` (see the module docstring).

    ``forward()`` runs the op (with grad enabled in the backward modes) and returns its outputs; ``mode``
    is ``fwd`` (``forward`` alone), ``bwd`` (the gradients w.r.t. ``wrt`` under ``upstream``, graph kept)
    or ``fwd+bwd``. ``info`` holds the case keys (``op``, ``provider``, ``shape``, ...); with ``op_inputs``
    the storages saved for backward that are not those inputs are recorded too (``saved_extra_bytes``).
    """
    grad = mode != "fwd"
    if mode == "fwd":
        target = forward
    elif mode == "bwd":
        outs = forward()
        target = lambda: torch.autograd.grad(outs, wrt, upstream, retain_graph=True)  # noqa: E731
    else:
        target = lambda: torch.autograd.grad(forward(), wrt, upstream)  # noqa: E731
    call = timed_call(target, device)
    for _ in range(WARMUP_ROUNDS + 1):  # the first call compiles the `compiled` / `fused` providers
        call()
    benchmark.group = group
    benchmark.pedantic(call, rounds=max(MIN_ROUNDS, rounds_for(call)), warmup_rounds=WARMUP_ROUNDS)
    record = benchmark.extra_info
    record.update(info, mode=mode, device=str(device), bytes_min=nbytes,
                  saved_bytes=saved_bytes(forward) if grad else 0, peak_bytes=peak_bytes(target, device))
    if op_inputs is not None:
        record["saved_extra_bytes"] = saved_bytes(forward, exclude=op_inputs) if grad else 0
    if benchmark.stats is not None:  # None under --benchmark-disable
        copy_s = copy_median(nbytes, device)
        record.update(copy_median_s=copy_s, ratio_to_copy=benchmark.stats.stats.median / copy_s)


def skip_unless_triton(device: torch.device) -> None:
    """Skip a ``triton`` provider where it cannot be benchmarked (no CUDA device, or no triton)."""
    import pytest

    from fastnabla.ops import dispatch

    if device.type != "cuda":
        pytest.skip("triton provider needs a CUDA device (the CPU Triton interpreter is a test tool, not a benchmark)")
    if not dispatch.triton_available():
        pytest.skip("triton provider needs `triton` installed")
