"""Per-batch constants of the residual nabla-DB loss, computed once per sampled batch when its subsample is kept.

With ``train.replay_subsample='kept'`` a replayed batch trains on the same transitions in each of its ``k`` passes
(:func:`fastnabla.training.plan.plan_transitions`). Whatever the loss takes from the frozen pretrained network is then
the same in every pass, and :class:`BatchConstants` computes it in the batch's first pass and keeps it:

* the forward-looking (FL) gradients ``beta gamma_s grad log R(decode(x_hat#(x_s)))`` (eq. 15) at the planned
  states, when ``x_hat`` comes from the pretrained model (``method.fl_model='pretrained'``; every state of the batch
  for the pathwise target) -- the decodes, reward VJPs and network passes of the term;
* ``eps#(x_t)`` and the pretrained reverse score's VJP ``J_eps#(x_t)^T (x_{t+1} - mu#(x_t))`` (eqs. 11, 17) of
  every planned transition.

What depends on the trained networks (``eps_theta`` and its VJP, the flow, pathwise targets) is computed in every
pass as before. Smoothing draws of the FL term are keyed by the batch's first pass and its trajectories' own ids,
so they are the same in every pass (with fresh subsamples they are redrawn per pass). The kept values are part of
the objective's checkpointed state, so a resumed run reuses exactly what the interrupted one computed.
"""

from __future__ import annotations

from typing import Any

import torch

from fastnabla.methods.nabla_gfn.fl_states import forward_looking_table
from fastnabla.methods.nabla_gfn.loss import eps_and_vjp
from fastnabla.methods.nabla_gfn.options import NablaGFNOptions
from fastnabla.training.interface import DiffusionTask, select_cond
from fastnabla.training.plan import StateTable, TransitionPlan
from fastnabla.training.trajectories import Trajectories

Tensor = torch.Tensor

__all__ = ["BatchConstants", "pretrained_reverse_terms"]


def pretrained_reverse_terms(
    task: DiffusionTask, traj: Trajectories, starts: Tensor, chunk: int, with_vjp: bool
) -> dict[str, StateTable]:
    """``eps#(x_t)`` and, with ``with_vjp``, ``J_eps#(x_t)^T r#`` with ``r# = x_{t+1} - (a_t x_t + b_t eps#(x_t))``
    at the transitions ``starts`` marks (``[N, T+1]`` bool, ``True`` at ``t``), as tables keyed by ``t``."""
    mdp = task.mdp
    rows, steps = starts.cpu().nonzero(as_tuple=True)
    eps_parts, vjp_parts = [], []
    for i in range(0, rows.numel(), chunk):
        r, s = rows[i : i + chunk], steps[i : i + chunk]
        dev = traj.states.device
        x_t, x_next = traj.states[r.to(dev), s.to(dev)], traj.states[r.to(dev), (s + 1).to(dev)]
        if x_t.dtype in (torch.bfloat16, torch.float16):  # as nabla_gfn_loss upcasts low-precision storage
            x_t, x_next = x_t.float(), x_next.float()
        step, cond = s.to(dev), select_cond(traj.cond, r)
        c = mdp.gather(step, x_t.ndim, x_t.dtype)

        def pretrained(x: Tensor, step: Tensor = step, cond: Any = cond) -> Tensor:
            return task.pretrained_eps(x, step, cond)

        if with_vjp:
            with torch.enable_grad():
                eps, vjp = eps_and_vjp(pretrained, x_t, x_next, c["a"], c["b"], False, False)
            eps_parts.append(eps.detach())
            vjp_parts.append(vjp.detach())
        else:
            with torch.no_grad():
                eps_parts.append(pretrained(x_t))
    if not eps_parts:  # no transition of this process's rows (the tables stay empty, their lookups fail loudly)
        dtype = torch.float32 if traj.states.dtype in (torch.bfloat16, torch.float16) else traj.states.dtype
        empty = traj.states.new_zeros((0, *traj.states.shape[2:]), dtype=dtype)
        eps_parts, vjp_parts = [empty], [empty]
    out = {"eps_pretrained": StateTable.build(starts.cpu(), torch.cat(eps_parts))}
    if with_vjp:
        out["vjp_pretrained"] = StateTable.build(starts.cpu(), torch.cat(vjp_parts))
    return out


class BatchConstants:
    """The kept constants of each replayed batch (module docstring), keyed by the iteration that first trained it."""

    def __init__(self, opts: NablaGFNOptions, keep: bool = True):
        self.opts = opts
        self.keep = keep  # False recomputes every pass (the same values; a test switch)
        self.by_batch: dict[int, dict[str, dict[str, StateTable]]] = {}

    def tables(
        self, task: DiffusionTask, traj: Trajectories, plan: TransitionPlan, seed: int, chunk: int, pathwise: bool,
        need_vjp: bool,
    ) -> tuple[dict[str, StateTable], dict[str, StateTable]]:
        """``(state_tables, step_tables)`` over the pass's batches: ``fl`` per state; ``eps_pretrained`` and
        ``vjp_pretrained`` (with ``need_vjp``) per transition; ``seed`` keys the smoothing draws. Batches seen in an
        earlier pass reuse their tables; batches no longer replayed are dropped."""
        if plan.batch_keys is None:
            raise ValueError("BatchConstants needs a plan with kept subsamples (train.replay_subsample='kept')")
        parts = []
        kept: dict[int, dict[str, dict[str, StateTable]]] = {}
        dev = traj.states.device
        for j, key in enumerate(plan.batch_keys):
            part = self.by_batch.get(key) if self.keep else None
            if part is None:
                part = self._compute(task, traj, plan, j, (seed, key), chunk, pathwise, need_vjp)
            # a resumed run's kept tables come back on the CPU; they join the new batch's on the run's device
            part = {kind: {n: _to(t, dev) for n, t in tables.items()} for kind, tables in part.items()}
            kept[key] = part
            parts.append(part)
        self.by_batch = kept if self.keep else {}

        def joined(kind: str) -> dict[str, StateTable]:
            names = parts[0][kind]
            return {n: StateTable.cat([p[kind][n] for p in parts]) for n in names}

        return joined("state"), joined("step")

    def _compute(self, task, traj, plan, j, noise_key, chunk, pathwise, need_vjp) -> dict[str, dict[str, StateTable]]:
        rows, pos = plan.batch_of(j)
        part = Trajectories(traj.states[rows], traj.eps_old[rows], select_cond(traj.cond, torch.arange(
            rows.start, rows.stop)), traj.log_reward[rows], traj.index[rows] % plan.global_batch)
        local = plan.rows[pos] - rows.start
        mask = None if pathwise else plan.needed_states[rows]
        fl = forward_looking_table(task, part, self.opts, mask, chunk=chunk, noise_key=noise_key)
        starts = torch.zeros_like(plan.needed_states[rows])
        starts[local, plan.steps[pos]] = True
        return {"state": {"fl": fl}, "step": pretrained_reverse_terms(task, part, starts, chunk, need_vjp)}

    def state(self) -> dict[str, Any]:
        return {key: {kind: {n: {"values": t.values, "index": t.index} for n, t in tables.items()}
                      for kind, tables in part.items()} for key, part in self.by_batch.items()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.by_batch = {int(key): {kind: {n: StateTable(t["values"], t["index"]) for n, t in tables.items()}
                                    for kind, tables in part.items()} for key, part in state.items()}


def _to(table: StateTable, device: torch.device) -> StateTable:
    return table if table.values.device == device else StateTable(table.values.to(device), table.index)
