"""pytest hooks and fixtures of the fastnabla benchmark suites (``pytest bench/ --benchmark-only``).

Measurement helpers live in ``bench/bench_utils.py``; ``bench/summarize.py`` turns the
``--benchmark-json`` output into ``bench/RESULTS.md``.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastnabla.utils.profiling import machine_info as describe_machine


def pytest_addoption(parser) -> None:
    parser.addoption("--bench-long", action="store_true", default=False,
                     help="on CPU, also run the long cases (bench_utils.LONG_CASES: SD 1.5 batch-32 latents and the "
                          "SD 1.5 VAE decode-VJP; several more minutes on 2 cores). CUDA runs include them anyway.")


def pytest_collection_modifyitems(config, items) -> None:
    """Skip the ``long`` cases on CPU unless ``--bench-long``: the default CPU run stays within 10 minutes."""
    if config.getoption("--bench-long") or torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="long case: pass --bench-long to run it on CPU")
    for item in items:
        if item.get_closest_marker("long"):
            item.add_marker(skip)


def pytest_configure(config) -> None:
    """Registers the ``long`` marker. CPU runs use ``FASTNABLA_BENCH_THREADS`` intra-op threads (default 1), set
    before anything is compiled. On small shared machines a 2-thread parallel region waits for a descheduled sibling
    thread: with another job on one of our 2 cores, medians moved by 100x between reruns."""
    config.addinivalue_line("markers", "long: a case that takes minutes on CPU (skipped there without --bench-long)")
    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("FASTNABLA_BENCH_THREADS", "1")))


def pytest_benchmark_update_machine_info(config, machine_info: dict) -> None:
    """Store the machine description (CPU model, cores, torch, CUDA device) in the JSON."""
    machine_info["fastnabla"] = describe_machine()


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
