"""Training methods on the shared sampler and trainer: nabla-GFlowNet and the paper's baselines.

``build_objective(method_cfg, task, seed)`` returns the objective ``method.name`` selects
(:mod:`fastnabla.methods.registry`); each baseline's loss lives in its own module with its source cited.
The package imports lazily: its config (:mod:`fastnabla.methods.config`) is read without importing torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["OBJECTIVES", "build_objective"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from fastnabla.methods import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'fastnabla.methods' has no attribute {name!r}")
