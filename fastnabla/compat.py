"""Work-arounds for upstream packaging problems, in one place (each says what it works around).

Call :func:`prepare_third_party_imports` before importing ``torchvision``, ``open_clip``,
``transformers``, ``diffusers`` or ``peft``; every fastnabla module that imports them does so. It is
idempotent and does nothing on an environment without the problems below.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

_DONE = False
_TV_LIBRARY: torch.library.Library | None = None  # kept alive: dropping it would undefine the ops


def _torchvision_build_tag() -> str | None:
    """The version string of the installed torchvision (``"0.28.0+cu130"``), read without importing it."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    version_file = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    try:
        for line in version_file.read_text().splitlines():
            if line.startswith("__version__"):
                return line.split("=", 1)[1].strip().strip("'\"")
    except OSError:
        return None
    return None


def _cuda_torchvision_on_cpu_torch() -> bool:
    """Whether a CUDA build of torchvision sits next to a CPU build of torch.

    Upstream problem: PyPI has one torchvision wheel for torch 2.13.0 (``0.28.0``) and it is a
    CUDA build. Its compiled ops do not load into the CPU torch, and ``import torchvision`` then dies
    in its meta registrations with ``operator torchvision::nms does not exist``. That takes down
    ``import open_clip`` and, once torchvision is installed at all, the model imports of
    ``transformers`` / ``peft`` / ``diffusers`` too.
    """
    if torch.version.cuda is not None:
        return False
    tag = _torchvision_build_tag()
    return tag is not None and "+cu" in tag


def _define_torchvision_op_schemas() -> None:
    """Define the two op schemas torchvision's Python side registers fake kernels for.

    With the schemas present ``import torchvision`` succeeds and its transforms work (they are pure
    torch); the compiled ops themselves (``nms``, ``roi_align``, ...) still do not run, and nothing in
    fastnabla uses them.
    """
    global _TV_LIBRARY
    if hasattr(torch.ops.torchvision, "nms"):
        return
    _TV_LIBRARY = torch.library.Library("torchvision", "DEF")
    _TV_LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TV_LIBRARY.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def prepare_third_party_imports() -> None:
    """Apply every work-around that the current environment needs (idempotent)."""
    global _DONE
    if _DONE:
        return
    if _cuda_torchvision_on_cpu_torch():
        _define_torchvision_op_schemas()
    _DONE = True
