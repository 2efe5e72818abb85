"""Sampling trajectories from the current policy and choosing which transitions to train on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fastnabla.ops.checks import FLOAT_DTYPES
from fastnabla.ops.denoise_step import denoise_step_fused, denoise_step_reference
from fastnabla.training.interface import DiffusionTask, select_cond
from fastnabla.training.rng import keyed_generator

Tensor = torch.Tensor


def _cond_to(cond: Any, device: torch.device | str) -> Any:
    if isinstance(cond, Tensor):
        return cond.to(device)
    if isinstance(cond, dict):
        return {k: _cond_to(v, device) for k, v in cond.items()}
    return cond


def _cat_cond(conds: list[Any]) -> Any:
    first = conds[0]
    if first is None:
        return None
    if isinstance(first, Tensor):
        return torch.cat(conds)
    if isinstance(first, (list, tuple)):
        return type(first)(v for c in conds for v in c)
    if isinstance(first, dict):
        return {k: _cat_cond([c[k] for c in conds]) for k in first}
    raise TypeError(f"cannot concatenate conditioning of type {type(first).__name__}")


@dataclass
class Trajectories:
    """``N`` sampled trajectories of a ``T``-step sampler (state ``s`` is at scheduler timestep
    ``mdp.timesteps[s]`` for ``s < T``; ``x_T`` is the sample)."""

    states: Tensor  # [N, T+1, ...]  x_0 (noise) .. x_T (sample)
    eps_old: Tensor  # [N, T, ...]   eps of the sampling policy at each x_t (output regulariser)
    cond: Any  # per-trajectory conditioning or None
    log_reward: Tensor  # [N] log R(decode(x_T))
    index: Tensor | None = None  # [N] int64 global trajectory ids (keys of per-trajectory random draws)
    images: Tensor | None = None  # [N, ...] uint8 decoded samples, when recorded

    def __post_init__(self) -> None:
        if self.index is None:
            self.index = torch.arange(self.states.shape[0])

    @property
    def num(self) -> int:
        return int(self.states.shape[0])

    @property
    def num_steps(self) -> int:
        return int(self.eps_old.shape[1])

    @classmethod
    def cat(cls, parts: list[Trajectories]) -> Trajectories:
        if len(parts) == 1:
            return parts[0]
        images = None if parts[0].images is None else torch.cat([p.images for p in parts])
        return cls(
            torch.cat([p.states for p in parts]), torch.cat([p.eps_old for p in parts]),
            _cat_cond([p.cond for p in parts]), torch.cat([p.log_reward for p in parts]),
            torch.cat([p.index for p in parts]), images,
        )

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors/lists for checkpoints (conditioning kept as is: tensors, lists, dicts)."""
        return {k: getattr(self, k) for k in ("states", "eps_old", "cond", "log_reward", "index", "images")}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Trajectories:
        return cls(**state)

    def to(self, device: torch.device | str) -> Trajectories:
        """The trajectories with states, recorded eps, rewards and tensor conditioning on ``device``
        (global ids and recorded images stay on the CPU)."""
        return Trajectories(
            self.states.to(device), self.eps_old.to(device), _cond_to(self.cond, device), self.log_reward.to(device),
            self.index, self.images,
        )


def _to_uint8_images(images: Tensor) -> Tensor:
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


@torch.no_grad()
def sample_trajectories(
    task: DiffusionTask,
    n: int,
    generator: torch.Generator | None = None,
    cond: Any = None,
    storage_dtype: torch.dtype | None = None,
    use_pretrained: bool = False,
    record_images: bool = False,
    x0: Tensor | None = None,
    step_noise: Tensor | None = None,
) -> Trajectories:
    """Run the sampler of ``task.mdp`` from ``n`` noise draws with the policy (or the pretrained model).

    ``cond`` defaults to ``task.sample_conditions(n, generator)``, ``x0`` to ``task.initial_noise(n,
    generator)`` and the step noise (``[T, n, ...]``) to draws from ``generator`` at each step. With
    ``record_images`` the decoded samples are kept as uint8 (for image tasks: the reward's input in
    ``[0, 1]``).

    Each step ``x_{t+1} = a_t x_t + b_t eps + sigma_t z_t`` runs through the fused denoising step
    (:func:`fastnabla.ops.denoise_step_fused`: the Triton kernel on GPU, the pure-torch reference on CPU,
    identical to the eager expression); states of other dtypes (float64) take the reference directly.
    """
    mdp = task.mdp
    cond = task.sample_conditions(n, generator) if cond is None else cond
    x = task.initial_noise(n, generator) if x0 is None else x0
    # the states stay in the sampler's dtype: rounded to bf16 they move by more than sigma_t at the last steps
    # (python -m fastnabla.compare.precision); the recorded eps may be stored in a low-precision dtype
    states = torch.empty((n, mdp.num_steps + 1) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    eps_old = torch.empty((n, mdp.num_steps) + tuple(x.shape[1:]), dtype=storage_dtype or x.dtype, device=x.device)
    states[:, 0] = x
    eps_fn = task.pretrained_eps if use_pretrained else task.policy_eps
    step_fn = denoise_step_fused if x.dtype in FLOAT_DTYPES else denoise_step_reference
    for t in range(mdp.num_steps):
        step = torch.full((n,), t, dtype=torch.int64, device=x.device)
        c = mdp.gather(step, x.ndim, x.dtype)
        eps = eps_fn(x, step, cond)
        if step_noise is None:
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        else:
            noise = step_noise[t].to(x.device, x.dtype)
        x, _ = step_fn(x, eps, noise, c["a"], c["b"], c["sigma"], c["alpha_bar"])
        states[:, t + 1] = x
        eps_old[:, t] = eps
    decoded = task.decode(x)
    log_r = task.log_reward(decoded, cond).detach()
    images = _to_uint8_images(decoded) if record_images else None
    return Trajectories(states, eps_old, cond, log_r, images=images)


def rank_share(global_batch: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, stop)`` global trajectory ids sampled by ``rank`` (contiguous equal shares)."""
    if global_batch % world_size:
        raise ValueError(f"the batch of {global_batch} trajectories does not split over {world_size} processes")
    per_rank = global_batch // world_size
    return rank * per_rank, (rank + 1) * per_rank


def sample_keyed(
    task: DiffusionTask,
    *,
    seed: int,
    iteration: int,
    global_batch: int,
    chunk_size: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    storage_dtype: torch.dtype | None = None,
    record_images: bool = False,
    condition_repeats: int = 1,
) -> Trajectories:
    """This rank's share of the iteration's global batch, sampled in chunks of ``chunk_size``.

    Trajectory ``i`` draws its conditioning, initial noise and step noise from
    ``keyed_generator(seed, "sample", iteration, i)`` (:mod:`fastnabla.training.rng`), so the batch
    does not depend on how it is chunked or split over processes. With ``condition_repeats = k > 1`` the
    trajectories ``k g .. k g + k - 1`` share the conditioning drawn from ``(seed, "condition", iteration, g)``
    (``k`` samples per prompt).
    """
    if condition_repeats < 1 or global_batch % condition_repeats:
        raise ValueError(f"a batch of {global_batch} trajectories does not split into groups of {condition_repeats}")
    start, stop = rank_share(global_batch, rank, world_size)
    size = chunk_size or (stop - start)
    parts = []
    for lo in range(start, stop, size):
        ids = range(lo, min(lo + size, stop))
        gens = [keyed_generator(seed, "sample", iteration, i) for i in ids]
        if condition_repeats == 1:
            cond = _cat_cond([task.sample_conditions(1, g) for g in gens])
        else:
            group_gens = [keyed_generator(seed, "condition", iteration, i // condition_repeats) for i in ids]
            cond = _cat_cond([task.sample_conditions(1, g) for g in group_gens])
        x0 = torch.cat([task.initial_noise(1, g) for g in gens])
        shape = (task.mdp.num_steps, *x0.shape[1:])
        step_noise = torch.stack([torch.randn(shape, generator=g) for g in gens], dim=1)  # [T, n, ...]
        part = sample_trajectories(
            task, len(ids), cond=cond, storage_dtype=storage_dtype, record_images=record_images, x0=x0,
            step_noise=step_noise,
        )
        part.index = torch.arange(lo, lo + len(ids))
        parts.append(part)
    return Trajectories.cat(parts)


def stratified_steps(
    num_trajectories: int,
    num_steps: int,
    fraction: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per trajectory, one uniformly drawn step in each of ``k`` equal chunks plus the terminal step.

    ``k = max(1, round(fraction * T))``; with ``fraction >= 1`` every step is returned. The last
    transition (ending at ``x_T``) is always included, as in the paper (section 4.3). Returns
    int64 ``[N, m]`` with distinct steps per row.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"transition fraction must be in (0, 1], got {fraction}")
    T = num_steps
    if fraction >= 1 or T == 1:
        return torch.arange(T).expand(num_trajectories, T).clone()
    k = max(1, min(T - 1, round(fraction * T)))
    # chunk boundaries over steps 0..T-2 (the terminal step T-1 is added separately)
    edges = torch.linspace(0, T - 1, k + 1).round().long()
    lo, hi = edges[:-1], edges[1:]
    u = torch.rand(num_trajectories, k, generator=generator)
    picks = lo + (u * (hi - lo)).floor().long().clamp(max=(hi - lo - 1).clamp(min=0))
    terminal = torch.full((num_trajectories, 1), T - 1, dtype=torch.int64)
    return torch.cat([picks, terminal], dim=1)


@dataclass
class TransitionBatch:
    """A flat batch of transitions ``x_t -> x_{t+1}`` drawn from stored trajectories."""

    x_t: Tensor
    x_next: Tensor
    step: Tensor  # int64 [B]
    eps_old: Tensor
    cond: Any
    extras: dict[str, Tensor] = field(default_factory=dict)  # precomputed per-transition tensors
    traj_index: Tensor | None = None  # [B] global trajectory ids

    def __len__(self) -> int:
        return int(self.step.shape[0])

    def split(self, num_chunks: int) -> list[TransitionBatch]:
        idx = torch.arange(len(self)).chunk(num_chunks)
        return [
            TransitionBatch(
                self.x_t[i], self.x_next[i], self.step[i], self.eps_old[i], select_cond(self.cond, i),
                {k: v[i] for k, v in self.extras.items()},
                None if self.traj_index is None else self.traj_index[i],
            )
            for i in idx
        ]


def select_transitions(
    traj: Trajectories,
    rows: Tensor,
    steps: Tensor,
    state_extras: dict[str, Any] | None = None,
    step_extras: dict[str, Any] | None = None,
) -> TransitionBatch:
    """Transitions ``(rows[i], steps[i])`` of ``traj``, in that order.

    ``state_extras`` (dense ``[N, T+1, ...]`` tensors or :class:`~fastnabla.training.plan.StateTable`)
    are gathered at both ends of each transition as ``name_t`` and ``name_next``; ``step_extras``
    (``[N, T, ...]`` tensors or tables keyed by the transition's step) at the transition's step.
    """
    dev = traj.states.device
    r, c = rows.to(dev), steps.to(dev)
    extras = {}
    for name, v in (state_extras or {}).items():
        if isinstance(v, Tensor):
            extras[f"{name}_t"], extras[f"{name}_next"] = v[r, c], v[r, c + 1]
        else:
            extras[f"{name}_t"], extras[f"{name}_next"] = v.gather(rows, steps), v.gather(rows, steps + 1)
    for name, v in (step_extras or {}).items():
        extras[name] = v[r, c] if isinstance(v, Tensor) else v.gather(rows, steps)
    return TransitionBatch(
        x_t=traj.states[r, c],
        x_next=traj.states[r, c + 1],
        step=c,
        eps_old=traj.eps_old[r, c],
        cond=select_cond(traj.cond, rows),
        extras=extras,
        traj_index=None if getattr(traj, "index", None) is None else traj.index[rows.cpu()],
    )


def gather_transitions(
    traj: Trajectories,
    steps: Tensor,
    shuffle_generator: torch.Generator | None = None,
    state_extras: dict[str, Any] | None = None,
    step_extras: dict[str, Tensor] | None = None,
) -> TransitionBatch:
    """Flatten the chosen ``steps`` (``[N, m]``) of each trajectory into one shuffled batch."""
    n, m = steps.shape
    rows = torch.arange(n).repeat_interleave(m)
    cols = steps.reshape(-1)
    perm = torch.randperm(rows.numel(), generator=shuffle_generator)
    return select_transitions(traj, rows[perm], cols[perm], state_extras, step_extras)
