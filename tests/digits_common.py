"""Shared pieces of the digits tests: the quick build, built once into the default cache (~1 minute on a CPU the
first time; ``FASTNABLA_CACHE`` moves the cache), then reused instantly by every later run."""

from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def quick_build_dir() -> Path:
    from fastnabla.tasks.digits.build import QUICK, build_pipeline

    return build_pipeline(None, QUICK, progress=False)


@functools.cache
def quick_build_classifier():
    from fastnabla.tasks.digits.classifier import CLASSIFIER_FILE, load_classifier

    return load_classifier(quick_build_dir() / CLASSIFIER_FILE)


# small evaluation overrides for the docs/digits/ scripts on the quick build (5 sampler steps, tiny sample sets)
SCRIPT_EVAL = ["sd.num_steps=5", "eval.num_samples=32", "eval.final_num_samples=64", "output.progress=false",
               "output.figure=false"]


def docs_script(name: str):
    """``docs/digits/<name>.py`` imported as a module (the diagnostics behind docs/digits.md run by path)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "docs" / "digits" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class QuadraticValue:
    """``u(x, s) = -(s + 1) |x - c|^2 / 2`` for the value probes' tests: ``grad u = (s + 1)(c - x)``, so the point
    and the state index where a function reads ``grad u`` show in its output."""

    def __init__(self, c):
        self.c = c

    def __call__(self, x, state):
        return -(state.float() + 1) * ((x - self.c) ** 2).flatten(1).sum(1) / 2
