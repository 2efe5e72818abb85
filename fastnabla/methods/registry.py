"""``build_objective``: the training objective named by ``method.name``, for a given task.

* ``nabla-gfn``: residual nabla-DB (eqs. 15-19) on ``D_prev`` transitions, the task's (vector) flow network;
* ``residual-db`` / ``dag-db``: log-space DB (eq. 20 / the DAG paper) on ``D_prev`` transitions, with a scalar
  flow network the objective owns (:mod:`fastnabla.methods.db`);
* ``ddpo``: PPO-clipped policy gradient on the transitions of the batch just sampled (:mod:`.ddpo`);
* ``refl``, ``draft-k``, ``draft-lv``: reward maximisers backpropagating through the tail of the trajectories
  just sampled, one loss per trajectory (:mod:`.refl`, :mod:`.draft`). None of these has a flow network.

The names are :data:`fastnabla.methods.config.METHODS` (the one list); each builder imports its method lazily.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastnabla.methods.config import METHODS
from fastnabla.training.interface import DiffusionTask, Objective


def _nabla_gfn(cfg, task: DiffusionTask, seed: int) -> Objective:
    from fastnabla.methods.nabla_gfn.objective import NablaGFNObjective

    return NablaGFNObjective(cfg)


def _db(name: str) -> Callable[[Any, DiffusionTask, int], Objective]:
    def build(cfg, task: DiffusionTask, seed: int) -> Objective:
        from fastnabla.methods.db import DBObjective
        from fastnabla.methods.log_flow import build_log_flow

        d = cfg.db
        flow = build_log_flow(task, d.flow_hidden, d.flow_layers, d.flow_channels, seed)
        return DBObjective(name, flow, d, cfg.beta, cfg.prior_strength)

    return build


def _ddpo(cfg, task: DiffusionTask, seed: int) -> Objective:
    from fastnabla.methods.ddpo import DDPOObjective

    return DDPOObjective(cfg.ddpo)


def _refl(cfg, task: DiffusionTask, seed: int) -> Objective:
    from fastnabla.methods.refl import ReFLObjective

    return ReFLObjective(cfg.refl)


def _draft(variant: str) -> Callable[[Any, DiffusionTask, int], Objective]:
    def build(cfg, task: DiffusionTask, seed: int) -> Objective:
        from fastnabla.methods.draft import DRaFTObjective

        return DRaFTObjective(variant, cfg.draft)

    return build


OBJECTIVES: dict[str, Callable[[Any, DiffusionTask, int], Objective]] = {
    "nabla-gfn": _nabla_gfn,
    "residual-db": _db("residual-db"),
    "dag-db": _db("dag-db"),
    "ddpo": _ddpo,
    "refl": _refl,
    "draft-k": _draft("draft-k"),
    "draft-lv": _draft("draft-lv"),
}
assert tuple(OBJECTIVES) == METHODS, "every method name has exactly one builder"


def build_objective(method_cfg, task: DiffusionTask, seed: int = 0) -> Objective:
    """The objective of ``method_cfg`` (a :class:`~fastnabla.methods.config.MethodConfig`) for ``task``.

    ``seed`` draws the initial weights of a network the objective owns (the DB methods' scalar flow).
    """
    name = getattr(method_cfg, "name", "nabla-gfn")
    if name not in OBJECTIVES:
        raise ValueError(f"method.name={name!r} is not one of {METHODS}")
    method_cfg.validate()
    return OBJECTIVES[name](method_cfg, task, seed)
