"""pytest hooks and fixtures of the fastnabla benchmark suites (``pytest bench/ --benchmark-only``).

Measurement helpers live in ``bench/bench_utils.py``; ``bench/summarize.py`` turns the
``--benchmark-json`` output into ``bench/RESULTS.md``.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastnabla.utils.profiling import machine_info as describe_machine


def pytest_configure(config) -> None:
    """CPU runs use ``FASTNABLA_BENCH_THREADS`` intra-op threads (default 1), set before anything is
    compiled. On small shared machines a 2-thread parallel region waits for a descheduled sibling
    thread: with another job on one of our 2 cores, medians moved by 100x between reruns."""
    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("FASTNABLA_BENCH_THREADS", "1")))


def pytest_benchmark_update_machine_info(config, machine_info: dict) -> None:
    """Store the machine description (CPU model, cores, torch, CUDA device) in the JSON."""
    machine_info["fastnabla"] = describe_machine()


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
