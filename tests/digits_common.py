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
