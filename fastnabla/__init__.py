"""fastnabla: reward fine-tuning of diffusion models with nabla-GFlowNet (residual nabla-DB).

The Triton kernels live in the top-level ``kernels/`` folder of a checkout and are imported as
``fastnabla.kernels``. That folder has no ``__init__.py`` on purpose: ``kernels`` is also the name of a
PyPI package (Hugging Face's kernel hub, imported by transformers >= 5.25), and a regular package named
``kernels`` on ``sys.path`` (the repository root under ``python -m ...``) would shadow it. A wheel copies
the folder into ``fastnabla/kernels/`` (``package-dir`` in ``pyproject.toml``); in a checkout (editable
install, or running from the repository root) :func:`_mount_checkout_kernels` mounts it. This module
imports nothing heavy, so ``python -m fastnabla.train --help`` stays fast.
"""

from __future__ import annotations

import sys
from importlib.machinery import ModuleSpec
from importlib.util import module_from_spec
from pathlib import Path


def _mount_checkout_kernels() -> None:
    """Register the checkout's ``kernels/`` folder as the namespace package ``fastnabla.kernels``."""
    package_dir = Path(__file__).resolve().parent
    if (package_dir / "kernels").is_dir() or "fastnabla.kernels" in sys.modules:
        return  # an installed wheel ships the kernels inside the package
    checkout_kernels = package_dir.parent / "kernels"
    if not (checkout_kernels.is_dir() and (package_dir.parent / "pyproject.toml").is_file()):
        return
    spec = ModuleSpec("fastnabla.kernels", None, is_package=True)
    spec.submodule_search_locations = [str(checkout_kernels)]
    module = module_from_spec(spec)
    module.__doc__ = "Triton kernels, one file per op (the checkout's top-level kernels/ folder)."
    sys.modules["fastnabla.kernels"] = module
    globals()["kernels"] = module


_mount_checkout_kernels()
