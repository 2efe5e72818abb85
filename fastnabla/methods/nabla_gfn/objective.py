"""The residual nabla-DB objective as the trainer sees it: per-pass precomputation + per-transition loss.

The trainer is generic over an objective (:class:`~fastnabla.training.interface.Objective`): once per pass
over the stored trajectories it may precompute per-state / per-step tensors from the plan, then it
asks for the loss of each micro-batch of transitions. The baselines plug in the same way.
"""

from __future__ import annotations

import torch

from fastnabla.methods.nabla_gfn.constants import BatchConstants
from fastnabla.methods.nabla_gfn.fl_states import fl_noise, forward_looking_table
from fastnabla.methods.nabla_gfn.flow_average import AveragedFlow
from fastnabla.methods.nabla_gfn.loss import nabla_gfn_loss
from fastnabla.methods.nabla_gfn.options import NablaGFNOptions
from fastnabla.methods.nabla_gfn.pathwise import (
    one_sweep_computes_fl,
    pathwise_flow_targets,
    pathwise_targets_and_forward_looking,
)
from fastnabla.training.interface import ObjectiveDefaults
from fastnabla.training.plan import StateTable

Tensor = torch.Tensor


class NablaGFNObjective(ObjectiveDefaults):
    """Residual nabla-DB (eqs. 15-19) with the options of :class:`NablaGFNOptions`."""

    name = "nabla-gfn"

    def __init__(self, opts: NablaGFNOptions):
        opts.validate()
        self.opts = opts
        self.trains_flow = opts.flow == "learned"
        self.constants = BatchConstants(opts)
        averaged = opts.flow_ema_decay > 0 and opts.flow == "learned"
        self.averaged_flow = AveragedFlow(opts.flow_ema_decay) if averaged else None

    def target_flow(self, task):
        """``g(x_s)`` as the forward target and the pathwise bootstrap read it when it is the Polyak-averaged flow
        (:mod:`.flow_average`); ``None``: the live flow."""
        if self.averaged_flow is None:
            return None
        return lambda x, state, cond: self.averaged_flow.flow(task, x, state, cond)

    def after_update(self, task):
        if self.averaged_flow is not None:
            self.averaged_flow.update(task)

    def prepare(self, task, traj, plan, key, chunk):
        """FL gradients once per *state* (only the planned states, or all of them for the pathwise
        sweep) when they do not depend on the parameters being trained (``fl_model='pretrained'``),
        and the pathwise targets. With kept subsamples (``plan.batch_keys``) the FL gradients and the pretrained
        network's reverse terms are computed once per sampled batch (:mod:`.constants`); otherwise the pathwise sweep
        computes the FL gradients itself when they come from the frozen network at every state, sharing its forwards
        (:func:`.pathwise.pathwise_targets_and_forward_looking`)."""
        m = self.opts
        if m.flow == "oracle":
            return {}, {}
        pathwise = m.reverse_target == "pathwise" and m.reverse_scale > 0
        if m.fl_model != "pretrained" and not pathwise:
            return {}, {}
        if plan.batch_keys is not None:
            need_vjp = m.reverse_scale > 0 and not pathwise
            state, step = self.constants.tables(task, traj, plan, key[0], chunk, pathwise, need_vjp)
            table = state["fl"]
        elif pathwise and one_sweep_computes_fl(m):
            fl, targets = pathwise_targets_and_forward_looking(task, traj, m, m.td_lambda, chunk=chunk,
                                                               flow=self.target_flow(task), noise_key=key)
            every_state = torch.ones(fl.shape[:2], dtype=torch.bool)
            return {"fl": StateTable.build(every_state, fl.flatten(0, 1))}, {"flow_target": targets}
        else:
            mask = None if pathwise else plan.needed_states
            table = forward_looking_table(task, traj, m, mask, chunk=chunk, noise_key=key)
            state, step = {"fl": table}, {}
        if pathwise:
            step["flow_target"] = pathwise_flow_targets(task, traj, table.dense(), m.td_lambda, chunk=chunk,
                                                       flow=self.target_flow(task))
        return state, step

    def state(self):
        out = {}
        kept = self.constants.state()
        if kept:
            out["kept_constants"] = kept
        if self.averaged_flow is not None:
            out["averaged_flow"] = self.averaged_flow.state()
        return out

    def load_state(self, state):
        unknown = sorted(set(state) - {"kept_constants", "averaged_flow"})
        if unknown:
            raise ValueError(f"the {self.name} objective's checkpointed state holds unknown entries {unknown}")
        if ("averaged_flow" in state) != (self.averaged_flow is not None):
            raise ValueError("the checkpoint was written with a different method.flow_ema_decay setting (averaged "
                             "flow " + ("present" if "averaged_flow" in state else "absent") + "): resume with the "
                             "run's own setting")
        self.constants.load_state(state.get("kept_constants", {}))
        if self.averaged_flow is not None:
            self.averaged_flow.load_state(state["averaged_flow"])

    def loss(self, task, batch, key):
        m = self.opts
        if m.fl_noise_var > 0 and "fl_next" not in batch.extras and m.flow == "learned":
            shape = tuple(batch.x_t.shape[1:])
            batch.extras["fl_noise_t"] = fl_noise(*key, batch.traj_index, batch.step, m.fl_num_noise, shape)
            batch.extras["fl_noise_next"] = fl_noise(*key, batch.traj_index, batch.step + 1, m.fl_num_noise, shape)
        return nabla_gfn_loss(task, batch, m, target_flow=self.target_flow(task))
