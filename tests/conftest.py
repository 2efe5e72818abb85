"""Shared test setup: offline hub, deterministic seeds, float64 helpers."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _import_triton_in_interpreter_mode() -> None:
    """Triton builds its standard library (``tl.sum``, ``tl.zeros``, ...) when it is first imported, in the mode
    ``TRITON_INTERPRET`` has then. Kernels that the interpreter runs later need the interpreted versions (with
    compiled ones it raises "Cannot call @triton.jit'd outside of the scope of a kernel"), while compiling for a
    GPU works with either. The kernel tests switch the interpreter on per test, and whichever test first imports
    triton (a reward model, inductor, ...) would otherwise decide: import it here, in interpreter mode, then put
    the variable back."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


_import_triton_in_interpreter_mode()

import pytest  # noqa: E402
import torch  # noqa: E402

from fastnabla.compat import prepare_third_party_imports  # noqa: E402

prepare_third_party_imports()  # before any test imports torchvision / transformers / open_clip

# The CPU tests use tiny tensors: intra-op threads only add synchronisation cost (measured: a [5, 3] softmax
# took 11 ms with 2 threads on a busy 2-core machine, 3 us with 1). FASTNABLA_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("FASTNABLA_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same global RNG state (tests stay order-independent)."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def gen():
    """A fresh CPU generator seeded identically in every test."""
    return torch.Generator().manual_seed(1234)


def mutated(**changes):
    """``case -> copy of case`` with ``changes`` applied (a value, or a function of the case): bad-input tables."""

    def mutate(case):
        case = dict(case)
        for k, v in changes.items():
            case[k] = v(case) if callable(v) else v
        return case

    return mutate


def train_stopped_during_iteration_2(monkeypatch, argv: list[str]) -> int:
    """``fastnabla.train.main(argv)`` as if SIGTERM arrived during iteration 2 (the trainer's second
    ``StopRequest.agreed`` check says stop); returns its exit code (130 for a clean stop)."""
    from fastnabla import train
    from fastnabla.training.checkpoint import StopRequest

    calls = {"n": 0}

    def stop_after_two(self):
        calls["n"] += 1
        return calls["n"] >= 2

    with monkeypatch.context() as m:
        m.setattr(StopRequest, "agreed", stop_after_two)
        return train.main(argv)


def assert_close_rel(actual, expected, rel=1e-12, msg=""):
    """``max |actual - expected| <= rel * max(|expected|, tiny)``: a tolerance relative to the scale."""
    actual, expected = torch.as_tensor(actual).detach(), torch.as_tensor(expected).detach()
    assert actual.shape == expected.shape, f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = max(float(expected.abs().max()), 1e-30)
    err = float((actual.double() - expected.double()).abs().max())
    assert err <= rel * scale, f"{msg} max abs err {err:.3e} > {rel:.1e} * scale {scale:.3e}"


@pytest.fixture
def clean_backend_env(monkeypatch):
    """No backend overrides from the caller's environment: the op tests choose them per test."""
    for var in ("FASTNABLA_BACKEND", "TRITON_INTERPRET", "FASTNABLA_COMPILE"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def interpret(monkeypatch):
    """Run Triton kernels on CPU tensors through Triton's interpreter for this test (the dispatch rule reads
    ``TRITON_INTERPRET`` at call time, so other tests keep the reference path)."""
    import importlib.util

    from fastnabla.ops import dispatch

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.select_backend("cpu") == "triton"


@pytest.fixture
def kernels_without_triton(monkeypatch):
    """``load(name)`` -> a fresh copy of ``fastnabla.kernels.<name>`` imported where ``import triton`` fails.

    The kernel modules import ``.triton_utils`` relatively, so the ``kernels/`` folder is mounted again under a
    private package name (a fresh ``triton_utils`` included) while ``triton`` is blocked; the copies are
    dropped after the test."""
    import importlib
    import importlib.util
    import sys
    from importlib.machinery import ModuleSpec

    package = "_fastnabla_kernels_without_triton"
    spec = ModuleSpec(package, None, is_package=True)
    spec.submodule_search_locations = list(importlib.util.find_spec("fastnabla.kernels").submodule_search_locations)
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    monkeypatch.setitem(sys.modules, package, importlib.util.module_from_spec(spec))
    yield lambda name: importlib.import_module(f"{package}.{name}")
    for key in [k for k in sys.modules if k.startswith(f"{package}.")]:
        del sys.modules[key]

