"""``build_objective``: the training objective named by ``method.name``, for a given task.

* ``nabla-gfn``: residual nabla-DB (eqs. 15-19) on ``D_prev`` transitions, the task's (vector) flow network;
* ``residual-db`` / ``dag-db``: log-space DB (eq. 20 / the DAG paper) on ``D_prev`` transitions, with a scalar
  flow network the objective owns (:mod:`fastnabla.methods.db`);
* ``ddpo``: PPO-clipped policy gradient on the transitions of the batch just sampled (:mod:`.ddpo`);
* ``refl``, ``draft-k``, ``draft-lv``: reward maximisers backpropagating through the tail of the trajectories
  just sampled, one loss per trajectory (:mod:`.refl`, :mod:`.draft`). None of these has a flow network.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastnabla.methods.db import DBObjective
from fastnabla.methods.ddpo import DDPOObjective
from fastnabla.methods.draft import DRaFTObjective
from fastnabla.methods.log_flow import build_log_flow
from fastnabla.methods.refl import ReFLObjective
from fastnabla.training.interface import DiffusionTask
from fastnabla.training.nabla_objective import NablaGFNObjective


def _db(name: str) -> Callable[[Any, DiffusionTask, int], Any]:
    def build(cfg, task: DiffusionTask, seed: int) -> DBObjective:
        d = cfg.db
        flow = build_log_flow(task, d.flow_hidden, d.flow_layers, d.flow_channels, seed)
        return DBObjective(name, flow, d, cfg.beta, cfg.prior_strength)

    return build


OBJECTIVES: dict[str, Callable[[Any, DiffusionTask, int], Any]] = {
    "nabla-gfn": lambda cfg, task, seed: NablaGFNObjective(cfg),
    "residual-db": _db("residual-db"),
    "dag-db": _db("dag-db"),
    "ddpo": lambda cfg, task, seed: DDPOObjective(cfg.ddpo),
    "refl": lambda cfg, task, seed: ReFLObjective(cfg.refl),
    "draft-k": lambda cfg, task, seed: DRaFTObjective("draft-k", cfg.draft),
    "draft-lv": lambda cfg, task, seed: DRaFTObjective("draft-lv", cfg.draft),
}


def build_objective(method_cfg, task: DiffusionTask, seed: int = 0):
    """The objective of ``method_cfg`` (a :class:`~fastnabla.config.schema.MethodConfig`) for ``task``.

    ``seed`` draws the initial weights of a network the objective owns (the DB methods' scalar flow).
    """
    name = getattr(method_cfg, "name", "nabla-gfn")
    if name not in OBJECTIVES:
        raise ValueError(f"method.name={name!r} is not one of {tuple(OBJECTIVES)}")
    method_cfg.validate()
    return OBJECTIVES[name](method_cfg, task, seed)
