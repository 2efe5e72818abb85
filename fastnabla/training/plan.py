"""Which stored transitions are trained on, in which optimizer update, on which process.

Per training pass over ``D_prev`` (``N`` trajectories of the *global* batch):

1. every trajectory keeps a stratified subsample of its steps, terminal always included
   (:func:`~fastnabla.training.trajectories.stratified_steps`, keyed by ``("subsample", iteration)``);
2. the ``N m`` chosen transitions are shuffled globally (keyed by ``("shuffle", iteration)``) and split
   into ``U`` consecutive groups, one per optimizer update;
3. each process keeps the transitions of its own trajectories, in the global order, and processes its
   share of an update in micro-batches; the loss of an update is the *sum* over its transitions divided
   by the update's *global* size, so after an all-reduce (sum) of the gradients every process holds
   exactly the gradient of the one-process mean.

With ``train.replay_batches = k > 1`` a pass covers the ``k`` most recent sampled batches: trajectory ``j B + i`` of
the pass is trajectory ``i`` of the ``j``-th most recent batch (``j = 0``: the previous one), and each process holds
its rows of every batch, batch after batch. Every trajectory is then trained in ``k`` consecutive passes, each time
on a fresh subsample of its transitions (the subsample is keyed by the iteration), or, with ``keep_subsample``
(``train.replay_subsample='kept'``), on the subsample of its first pass in every pass: the ``j``-th most recent batch's
subsample is keyed by ``iteration - j``, the iteration that first trained it, so constants of its transitions that do
not depend on the trained parameters can be computed once (:mod:`fastnabla.methods.nabla_gfn.objective`).

Every process computes the same global plan (a few integer tensors), so nothing is communicated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastnabla.training.rng import keyed_generator
from fastnabla.training.trajectories import stratified_steps

Tensor = torch.Tensor


@dataclass
class TransitionPlan:
    """This process's transitions for one pass, in training order."""

    rows: Tensor  # [M] row in this process's Trajectories
    steps: Tensor  # [M] transition index t
    update: Tensor  # [M] optimizer update each transition belongs to
    update_sizes: Tensor  # [U] global number of transitions per update
    needed_states: Tensor  # [n_local, T+1] bool: states at either end of a planned transition
    rows_per_batch: int = 0  # this process's trajectories of each sampled batch (rows j * rows_per_batch + i)
    global_batch: int = 0  # trajectories per sampled batch over all processes
    batch_keys: tuple[int, ...] | None = None  # kept subsample: the iteration that first trained each batch

    def batch_of(self, j: int) -> tuple[slice, Tensor]:
        """Rows of the ``j``-th batch (newest first) and the positions (into ``rows`` / ``steps``) of its
        transitions."""
        lo = j * self.rows_per_batch
        pos = ((self.rows >= lo) & (self.rows < lo + self.rows_per_batch)).nonzero().flatten()
        return slice(lo, lo + self.rows_per_batch), pos

    @property
    def num_updates(self) -> int:
        return int(self.update_sizes.numel())

    def micro_batches(self, update: int, micro_batch_size: int | None) -> list[Tensor]:
        """Positions (into ``rows``/``steps``) of ``update``'s transitions, in micro-batches."""
        idx = (self.update == update).nonzero().flatten()
        if idx.numel() == 0:
            return []
        size = micro_batch_size or idx.numel()
        return list(idx.split(size))


def plan_transitions(
    *,
    seed: int,
    iteration: int,
    global_batch: int,
    local_start: int,
    local_count: int,
    num_steps: int,
    fraction: float,
    num_updates: int,
    num_batches: int = 1,
    keep_subsample: bool = False,
) -> TransitionPlan:
    """The plan of the process holding global trajectories ``[local_start, local_start + local_count)`` of each of
    the pass's ``num_batches`` sampled batches of ``global_batch`` trajectories (module docstring); its ``rows`` index
    the process's trajectories of all batches, concatenated batch after batch. ``keep_subsample``: every batch keeps
    the subsample of the pass that first trained it (with ``num_batches = 1`` the same plan either way)."""
    if num_updates < 1:
        raise ValueError(f"num_updates must be >= 1, got {num_updates}")
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    total_traj = global_batch * num_batches
    if keep_subsample:  # batch j was first trained at iteration - j: its subsample then, in every pass
        steps = torch.cat([stratified_steps(global_batch, num_steps, fraction,
                                            keyed_generator(seed, "subsample", iteration - j))
                           for j in range(num_batches)])
    else:
        steps = stratified_steps(total_traj, num_steps, fraction, keyed_generator(seed, "subsample", iteration))
    m = steps.shape[1]
    traj = torch.arange(total_traj).repeat_interleave(m)
    cols = steps.reshape(-1)
    perm = torch.randperm(traj.numel(), generator=keyed_generator(seed, "shuffle", iteration))
    traj, cols = traj[perm], cols[perm]
    total = traj.numel()
    if num_updates > total:
        raise ValueError(f"{num_updates} updates per batch but only {total} transitions are trained on")
    # consecutive groups of (almost) equal size, like torch.chunk over the shuffled list
    sizes = torch.full((num_updates,), total // num_updates, dtype=torch.int64)
    sizes[: total % num_updates] += 1
    update = torch.repeat_interleave(torch.arange(num_updates), sizes)
    within, batch = traj % global_batch, traj // global_batch
    mine = (within >= local_start) & (within < local_start + local_count)
    rows = batch[mine] * local_count + within[mine] - local_start
    cols, update = cols[mine], update[mine]
    needed = torch.zeros(num_batches * local_count, num_steps + 1, dtype=torch.bool)
    needed[rows, cols] = True
    needed[rows, cols + 1] = True
    keys = tuple(iteration - j for j in range(num_batches)) if keep_subsample else None
    return TransitionPlan(rows, cols, update, sizes, needed, local_count, global_batch, keys)


class StateTable:
    """Per-state tensors computed only where needed: ``values[index[row, state]]``."""

    def __init__(self, values: Tensor, index: Tensor):
        self.values = values  # [M, ...]
        self.index = index  # [n, T+1] int64, -1 where absent

    @classmethod
    def cat(cls, tables: list[StateTable]) -> StateTable:
        """The tables of consecutive row blocks as one (``index`` stacked over rows)."""
        offsets = [0]
        for t in tables[:-1]:
            offsets.append(offsets[-1] + t.values.shape[0])
        index = torch.cat([torch.where(t.index >= 0, t.index + o, t.index) for t, o in zip(tables, offsets,
                                                                                              strict=True)])
        return cls(torch.cat([t.values for t in tables]), index)

    @classmethod
    def build(cls, mask: Tensor, values: Tensor) -> StateTable:
        """``values`` holds the entries of ``mask.nonzero()`` in row-major order."""
        index = torch.full(mask.shape, -1, dtype=torch.int64)
        index[mask] = torch.arange(int(mask.sum()))
        return cls(values, index)

    def gather(self, rows: Tensor, states: Tensor) -> Tensor:
        pos = self.index[rows.cpu(), states.cpu()]
        if bool((pos < 0).any()):
            raise KeyError("state table lookup of a state that was not computed")
        return self.values[pos.to(self.values.device)]

    def dense(self) -> Tensor:
        """``[n, T+1, ...]`` (only when every state is present)."""
        if bool((self.index < 0).any()):
            raise ValueError("the state table is not complete")
        return self.values[self.index.flatten().to(self.values.device)].reshape(
            *self.index.shape, *self.values.shape[1:]
        )
