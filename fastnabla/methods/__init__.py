"""Training methods on the shared sampler and trainer: nabla-GFlowNet and the paper's baselines.

``build_objective(method_cfg, task, seed)`` returns the objective ``method.name`` selects
(:mod:`fastnabla.methods.registry`); each baseline's loss lives in its own module with its source cited.
"""

from fastnabla.methods.registry import OBJECTIVES, build_objective

__all__ = ["OBJECTIVES", "build_objective"]
