"""Algorithm 1 of the paper as a thin loop over library pieces, for any training method.

Each iteration samples a fresh batch of trajectories with the current policy and trains on the *previous* batch
(``D_prev``): a stratified subsample of its transitions (terminal always kept), shuffled and split into
``updates_per_batch`` optimizer updates, each accumulated over micro-batches (:mod:`fastnabla.training.plan`). With
``replay_batches = k > 1`` ``D_prev`` is the ``k`` most recent sampled batches: each trajectory is trained in ``k``
consecutive passes (an off-policy objective only), so one sampled trajectory pays for ``k`` times as many trained
transitions (docs/cost.md). Policy and flow parameters have their own learning rates and their own gradient-norm
clipping; one optimizer step per update, after which the Polyak average of the policy weights, if asked for
(``policy_ema_decay``, :mod:`fastnabla.training.policy_average`), takes its step. Every random draw is keyed
(:mod:`fastnabla.training.rng`), so a resumed run and a ``torchrun`` run reproduce a one-process, uninterrupted run
(:mod:`fastnabla.training.distributed`, :mod:`fastnabla.training.checkpoint`).

The objective (:class:`~fastnabla.training.interface.Objective`, one per method in :mod:`fastnabla.methods`)
decides what a pass trains on: stored transitions of ``D_prev``; with ``on_policy`` the batch just sampled;
with ``per_trajectory`` (ReFL, DRaFT) one loss per trajectory of the batch just sampled, whose plan is the
transition plan of a one-step MDP (each trajectory once, shuffled over the updates). An objective that owns a
network (``module``: the DB baselines' scalar flow) has it trained in the flow group and saved in checkpoints;
otherwise the flow group is the task's flow network, trained only when the objective ``trains_flow``.

**Divergence guard.** An update whose loss or gradient norm is not finite, or a pass over trajectories with
non-finite rewards, is skipped (no optimizer step; the learning-rate schedule still advances) and the reason is
returned in the pass's statistics. After ``max_skipped_updates`` consecutive skips :class:`DivergedError` stops
the run; the parameters are those of the last finite update.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import warnings
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch

from fastnabla.rewards.combined import concat_terms, record_terms
from fastnabla.training.config import REPLAY_SUBSAMPLES, OptimOptions
from fastnabla.training.distributed import DistContext
from fastnabla.training.interface import DiffusionTask, Objective, select_cond
from fastnabla.training.optim import build_lr_scheduler, build_optimizer, clip_grad_norm
from fastnabla.training.plan import TransitionPlan, plan_transitions
from fastnabla.training.policy_average import PolicyAverage
from fastnabla.training.trajectories import Trajectories, rank_share, sample_keyed, select_transitions
from fastnabla.utils.profiling import PhaseTimer

__all__ = ["DivergedError", "Trainer", "TrainObserver"]

CHECKPOINT_FORMAT = 2


class DivergedError(RuntimeError):
    """Too many consecutive updates were skipped for non-finite values; the message says why."""


class TrainObserver(Protocol):
    """Called around every training pass (e.g. the SD run's pass counters): not around sampling."""

    def before_train(self) -> None: ...

    def after_train(self, stats: dict[str, Any]) -> None: ...


def select_trajectories(traj: Trajectories, rows: torch.Tensor) -> Trajectories:
    """Rows ``rows`` of ``traj`` (states, recorded eps, conditioning, rewards, global ids)."""
    r = rows.to(traj.states.device)
    return Trajectories(
        traj.states[r], traj.eps_old[r], select_cond(traj.cond, rows), traj.log_reward[rows.to(traj.log_reward.device)],
        traj.index[rows.cpu()],
    )


def trainable_state(task: DiffusionTask) -> dict[str, Any]:
    if hasattr(task, "trainable_state_dict"):
        return task.trainable_state_dict()
    return {
        "policy": [p.detach().clone() for p in task.policy_parameters()],
        "flow": [p.detach().clone() for p in task.flow_parameters()],
    }


@torch.no_grad()
def load_trainable_state(task: DiffusionTask, state: dict[str, Any]) -> None:
    if hasattr(task, "load_trainable_state_dict"):
        task.load_trainable_state_dict(state)
        return
    for name, params in (("policy", task.policy_parameters()), ("flow", task.flow_parameters())):
        params = list(params)
        if len(params) != len(state[name]):
            raise ValueError(f"checkpoint holds {len(state[name])} {name} tensors, the task has {len(params)}")
        for p, v in zip(params, state[name], strict=True):
            p.copy_(v)


def _numpy_rng_state() -> dict[str, Any]:
    """numpy's global RNG state as plain values and a tensor (checkpoints load with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {"bit_generator": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _set_numpy_rng_state(state: dict[str, Any]) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["bit_generator"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"]))


class Trainer:
    """Runs Algorithm 1 on any :class:`DiffusionTask` with any :class:`Objective`.

    Args:
        task: model + reward behind the interface.
        objective: the training method (:func:`fastnabla.methods.build_objective` builds one from config).
        optim: optimizer options.
        batch_size: trajectories sampled per iteration, over all processes.
        transition_fraction: fraction of each trajectory's transitions trained on (terminal kept).
        updates_per_batch: optimizer steps per sampled batch.
        seed: keys every random draw of the run.
        total_iterations: length of the run, for the learning-rate schedule.
        sample_batch_size: trajectories per sampling call (default: this process's whole share).
        micro_batch_size: transitions per forward/backward; an update accumulates its micro-batches
            (default: the whole update in one).
        fl_batch_size: states per call when precomputing forward-looking gradients / pathwise targets.
        storage_dtype: dtype of the stored trajectories (default: the task's).
        record_images: keep the decoded samples (uint8) with the trajectories.
        max_skipped_updates: consecutive skipped updates (non-finite loss, gradient or rewards) after which
            :meth:`step` raises :class:`DivergedError`.
        condition_repeats: trajectories sampled per conditioning draw (``k`` samples per prompt).
        replay_batches: how many of the most recent sampled batches a pass trains on (1: the previous one); more
            than 1 only for an objective that trains on stored transitions (not ``on_policy``, not
            ``per_trajectory``).
        replay_subsample: ``'fresh'`` (a replayed batch trains on a fresh subsample of its transitions in every pass)
            or ``'kept'`` (on the subsample of its first pass; :func:`~fastnabla.training.plan.plan_transitions`).
        policy_ema_decay: ``d`` of the Polyak-averaged policy weights (:mod:`fastnabla.training.policy_average`),
            which :meth:`handed_out_policy` puts in place for the evaluations and the export; 0: the live weights.
        dist: this process's rank / world size (default: one process).
        timer: accumulates wall time per phase (``sample``, ``prepare``, ``loss``, ``backward``, ...).
        observers: called before and after every training pass.
    """

    def __init__(
        self,
        task: DiffusionTask,
        objective: Objective,
        optim: OptimOptions,
        batch_size: int,
        transition_fraction: float = 1.0,
        updates_per_batch: int = 1,
        seed: int = 0,
        total_iterations: int = 1,
        *,
        sample_batch_size: int | None = None,
        micro_batch_size: int | None = None,
        fl_batch_size: int = 8192,
        storage_dtype: torch.dtype | None = None,
        record_images: bool = False,
        max_skipped_updates: int = 10,
        condition_repeats: int = 1,
        replay_batches: int = 1,
        replay_subsample: str = "fresh",
        policy_ema_decay: float = 0.0,
        dist: DistContext | None = None,
        timer: PhaseTimer | None = None,
        observers: list[TrainObserver] | None = None,
    ):
        if not isinstance(objective, Objective):
            raise TypeError(
                f"objective must implement fastnabla.training.interface.Objective, got {type(objective).__name__}; "
                "build one with fastnabla.methods.build_objective(cfg.method, task)"
            )
        optim.validate()
        if max_skipped_updates < 1:
            raise ValueError(f"max_skipped_updates must be >= 1, got {max_skipped_updates}")
        if replay_batches < 1:
            raise ValueError(f"train.replay_batches must be >= 1, got {replay_batches}")
        if replay_batches > 1 and (objective.on_policy or objective.per_trajectory):
            raise ValueError(f"train.replay_batches={replay_batches}: the {objective.name} objective trains on the "
                             "batch it has just sampled, so it cannot replay older batches; use 1")
        if not 0.0 <= policy_ema_decay < 1.0:
            raise ValueError(f"train.policy_ema_decay={policy_ema_decay}: expected 0 (the live policy) or a decay in "
                             "(0, 1)")
        if replay_subsample not in REPLAY_SUBSAMPLES:
            raise ValueError(f"train.replay_subsample={replay_subsample!r}: expected one of {REPLAY_SUBSAMPLES}")
        self.objective = objective
        self.task = task
        self.optim_opts = optim
        self.dist = dist or DistContext()
        self.batch_size = batch_size
        self.local_start, local_stop = rank_share(batch_size, self.dist.rank, self.dist.world_size)
        self.local_count = local_stop - self.local_start
        self.transition_fraction = transition_fraction
        self.updates_per_batch = updates_per_batch
        self.seed = seed
        self.sample_batch_size = sample_batch_size
        self.micro_batch_size = micro_batch_size
        self.fl_batch_size = fl_batch_size
        self.storage_dtype = storage_dtype
        self.record_images = record_images
        self.max_skipped_updates = max_skipped_updates
        self.condition_repeats = condition_repeats
        self.replay_batches = replay_batches
        self.replay_subsample = replay_subsample
        self.timer = timer or PhaseTimer()
        self.observers = list(observers or [])
        self._policy_params = [p for p in task.policy_parameters() if p.requires_grad]
        own = objective.module
        flow = [p for p in (own.parameters() if own is not None else task.flow_parameters()) if p.requires_grad]
        self._flow_params = flow if objective.trains_flow else []
        self.policy_average = PolicyAverage(self._policy_params, policy_ema_decay) if policy_ema_decay else None
        self.optimizer = build_optimizer(self._policy_params, self._flow_params, optim)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, optim, total_iterations * updates_per_batch)
        self.history: list[Trajectories] = []  # D_prev: the most recent sampled batches, newest first
        self.iteration = 0
        self.skipped_in_a_row = 0

    @property
    def previous(self) -> Trajectories | None:
        """The most recently sampled batch that training has not consumed yet (``None`` before the first)."""
        return self.history[0] if self.history else None

    def replayed(self) -> Trajectories | None:
        """This process's share of ``D_prev``: the batches of :attr:`history` concatenated, newest first, their
        global ids offset by ``j * batch_size`` for the ``j``-th (so per-trajectory draws stay distinct)."""
        if not self.history:
            return None
        parts = [h if j == 0 else Trajectories(h.states, h.eps_old, h.cond, h.log_reward, h.index + j * self.batch_size,
                                               h.images) for j, h in enumerate(self.history)]
        return Trajectories.cat(parts)

    # ------------------------------------------------------------------ one pass over D_prev
    def plan(self, iteration: int, num_batches: int = 1) -> TransitionPlan:
        """This pass's plan over ``num_batches`` stored batches; for a rollout objective the plan of a one-step MDP
        (``rows``: trajectories)."""
        one = self.objective.per_trajectory
        return plan_transitions(
            seed=self.seed, iteration=iteration, global_batch=self.batch_size, local_start=self.local_start,
            local_count=self.local_count, num_steps=1 if one else self.task.mdp.num_steps,
            fraction=1.0 if one else self.transition_fraction, num_updates=self.updates_per_batch,
            num_batches=num_batches, keep_subsample=self.replay_subsample == "kept" and self.replay_batches > 1,
        )

    def train_on(self, traj: Trajectories, iteration: int | None = None, num_batches: int = 1) -> dict[str, Any]:
        """One pass of updates on stored trajectories (``num_batches`` sampled batches concatenated, as
        :meth:`replayed` does); returns diagnostics averaged over transitions (trajectories for a rollout objective;
        ``transitions`` counts what was trained on), the number of skipped updates and, when there were any, their
        reasons (``skip_reasons``).

        Raises:
            DivergedError: the last ``max_skipped_updates`` updates were all skipped (raised at the last of them).
        """
        for observer in self.observers:
            observer.before_train()
        iteration = self.iteration + 1 if iteration is None else iteration
        key = (self.seed, iteration)
        if traj.num != num_batches * self.local_count:
            raise ValueError(f"train_on: {traj.num} trajectories, but {num_batches} batch(es) of this process's "
                             f"{self.local_count} were planned")
        plan = self.plan(iteration, num_batches)
        skipped: list[str] = []
        bad_rewards = self._count_over_ranks(~torch.isfinite(traj.log_reward.detach()))
        if bad_rewards:
            reason = f"{bad_rewards} sampled trajectories have a non-finite reward"
            for u in range(plan.num_updates):
                self._skip_update(skipped, u, reason, iteration)
            stats: dict[str, Any] = {}
        else:
            stats = self._updates(traj, plan, key, skipped)
        stats["transitions"] = float(plan.update_sizes.sum())
        stats["skipped_updates"] = len(skipped)
        if skipped:
            stats["skip_reasons"] = skipped
        for observer in self.observers:
            observer.after_train(stats)
        return stats

    def _updates(self, traj: Trajectories, plan: TransitionPlan, key: tuple[int, int], skipped: list[str]) -> dict:
        state_extras, step_extras = {}, {}
        if not self.objective.per_trajectory:
            with self.timer.phase("prepare"):
                state_extras, step_extras = self.objective.prepare(self.task, traj, plan, key, self.fl_batch_size)
        sums: dict[str, torch.Tensor] = {}
        norms = torch.zeros(2, dtype=torch.float64)
        applied = 0
        for u in range(plan.num_updates):
            self.optimizer.zero_grad(set_to_none=True)
            size = float(plan.update_sizes[u])
            loss_sum = torch.zeros((), dtype=torch.float64)
            for pos in plan.micro_batches(u, self.micro_batch_size):
                if self.objective.per_trajectory:
                    batch = select_trajectories(traj, plan.rows[pos])
                else:
                    batch = select_transitions(traj, plan.rows[pos], plan.steps[pos], state_extras, step_extras)
                with self.timer.phase("loss"):
                    per_sample, info = self.objective.loss(self.task, batch, key)
                with self.timer.phase("backward"):
                    (per_sample.sum() / size).backward()
                loss_sum += per_sample.detach().double().sum().cpu()
                for name, (values, mask) in info.items():
                    v = values.detach().double().cpu()
                    m = torch.ones_like(v) if mask is None else mask.detach().double().cpu()
                    s = sums.setdefault(name, torch.zeros(2, dtype=torch.float64))
                    s += torch.stack([(v * m).sum(), m.sum()])
            with self.timer.phase("optimizer_step"):
                self.dist.all_reduce_gradients(self._policy_params + self._flow_params)
                norm_policy = clip_grad_norm(self._policy_params, self.optim_opts.grad_clip_policy)
                norm_flow = clip_grad_norm(self._flow_params, self.optim_opts.grad_clip_flow)
                reason = None
                if self._count_over_ranks(~torch.isfinite(loss_sum)):
                    reason = "non-finite loss"
                elif not math.isfinite(norm_policy):
                    reason = f"non-finite policy gradient (norm {norm_policy})"
                elif not math.isfinite(norm_flow):
                    reason = f"non-finite flow gradient (norm {norm_flow})"
                if reason is None:
                    norms += torch.tensor([norm_policy, norm_flow], dtype=torch.float64)
                    applied += 1
                    self.skipped_in_a_row = 0
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    if self.policy_average is not None:
                        self.policy_average.update()
                    self.objective.after_update(self.task)
                else:
                    self._skip_update(skipped, u, reason, key[1])
        stats: dict[str, Any] = {}
        if sums:
            names = sorted(sums)
            flat = self.dist.all_reduce_sum_(torch.stack([sums[n] for n in names]))
            stats = {n: float(flat[i, 0] / flat[i, 1].clamp(min=1)) for i, n in enumerate(names)}
        stats["grad_norm_policy"] = float(norms[0]) / applied if applied else float("nan")
        stats["grad_norm_flow"] = float(norms[1]) / applied if applied else float("nan")
        return stats

    def _skip_update(self, skipped: list[str], update: int, reason: str, iteration: int) -> None:
        """No optimizer step for this update; the learning-rate schedule still advances (so a run's schedule
        stays tied to its iterations). Raises :class:`DivergedError` at the ``max_skipped_updates``-th skip in a
        row."""
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_in_a_row += 1
        skipped.append(f"update {update + 1}: {reason}")
        if self.skipped_in_a_row >= self.max_skipped_updates:
            raise DivergedError(
                f"{self.skipped_in_a_row} consecutive updates skipped (train.max_skipped_updates="
                f"{self.max_skipped_updates}); the last at iteration {iteration}, {skipped[-1]}"
            )
        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
            warnings.simplefilter("ignore", UserWarning)
            self.lr_scheduler.step()

    def _count_over_ranks(self, flags: torch.Tensor) -> int:
        """The number of true ``flags`` summed over every process (one collective under several processes)."""
        count = flags.reshape(-1).sum().to(device="cpu", dtype=torch.float64).reshape(1)
        return int(self.dist.all_reduce_sum_(count)[0]) if self.dist.enabled else int(count[0])

    # ------------------------------------------------------------------ Algorithm 1
    def sample(self, iteration: int) -> Trajectories:
        """This process's share of iteration ``iteration``'s batch, from the current policy."""
        return sample_keyed(
            self.task, seed=self.seed, iteration=iteration, global_batch=self.batch_size,
            chunk_size=self.sample_batch_size, rank=self.dist.rank, world_size=self.dist.world_size,
            storage_dtype=self.storage_dtype, record_images=self.record_images,
            condition_repeats=self.condition_repeats,
        )

    def _moments(self, values: torch.Tensor) -> tuple[float, float]:
        """Mean and (unbiased) std of ``values`` over every process's share."""
        r = values.detach().double().cpu()
        s = self.dist.all_reduce_sum_(torch.stack([r.sum(), (r * r).sum(), torch.tensor(float(r.numel()))]))
        n = float(s[2])
        mean = float(s[0]) / n
        var = (float(s[1]) - n * mean * mean) / max(n - 1, 1)
        return mean, max(var, 0.0) ** 0.5

    def _reward_stats(self, traj: Trajectories, terms: dict[str, list[torch.Tensor]]) -> dict[str, Any]:
        """``reward_mean`` / ``reward_std`` of the sampled batch's ``log R`` and, for a weighted sum of rewards, of
        each term's ``log R`` (``reward_terms``: ``{label: {"mean", "std"}}``)."""
        mean, std = self._moments(traj.log_reward)
        out: dict[str, Any] = {"reward_mean": mean, "reward_std": std}
        if terms:
            out["reward_terms"] = {}
            for label, values in concat_terms(terms).items():
                m, s = self._moments(values)
                out["reward_terms"][label] = {"mean": m, "std": s}
        return out

    def step(self) -> dict[str, float]:
        """Sample ``D_curr``, train on ``D_prev``, then ``D_prev <- D_curr`` (Algorithm 1, l. 5-9); with
        ``replay_batches = k`` ``D_prev`` keeps the ``k`` most recent batches.

        On-policy objectives train on ``D_curr`` itself and keep no ``D_prev``."""
        iteration = self.iteration + 1
        t0 = time.perf_counter()
        with self.timer.phase("sample"), record_terms(getattr(self.task, "reward", None)) as terms:
            current = self.sample(iteration)
        t1 = time.perf_counter()
        stats: dict[str, float] = {}
        data = current if self.objective.on_policy else self.replayed()
        if data is not None:
            with self.timer.phase("train"):
                stats = self.train_on(data, iteration, 1 if self.objective.on_policy else len(self.history))
        t2 = time.perf_counter()
        self.history = [] if self.objective.on_policy else [current, *self.history][: self.replay_batches]
        self.iteration = iteration
        stats.update(
            iteration=iteration,
            **self._reward_stats(current, terms),
            time_sample=t1 - t0,
            time_train=t2 - t1,
            trajectories_per_s=self.batch_size / max(t1 - t0, 1e-9),
        )
        return stats

    def fit(self, iterations: int, on_step: Callable[[dict[str, float]], None] | None = None) -> None:
        """Run until ``iterations`` steps are done (the first only fills ``D_prev``), calling ``on_step``."""
        while self.iteration < iterations:
            stats = self.step()
            if on_step is not None:
                on_step(stats)

    def handed_out_policy(self) -> contextlib.AbstractContextManager:
        """The policy a run evaluates and exports: within the block the policy parameters hold their
        Polyak average when ``policy_ema_decay > 0`` (the live weights are restored on exit), else the live
        weights."""
        return self.policy_average.swapped_in() if self.policy_average is not None else contextlib.nullcontext()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (this process's share of ``D_prev`` included: ``previous``, and the older
        batches kept for replay in ``replay``)."""
        rng = {"torch": torch.get_rng_state(), "numpy": _numpy_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "format": CHECKPOINT_FORMAT,
            "iteration": self.iteration,
            "skipped_in_a_row": self.skipped_in_a_row,
            "batch_size": self.batch_size,
            "world_size": self.dist.world_size,
            "rank": self.dist.rank,
            "task": trainable_state(self.task),
            "objective": None if self.objective.module is None else self.objective.module.state_dict(),
            "objective_state": self.objective.state(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "previous": None if self.previous is None else self.previous.state_dict(),
            "replay": [h.state_dict() for h in self.history[1:]],
            "policy_average": None if self.policy_average is None else self.policy_average.state(),
            "rng": rng,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"unsupported checkpoint format {state.get('format')!r} (this fastnabla reads format "
                             f"{CHECKPOINT_FORMAT})")
        if state["world_size"] != self.dist.world_size or state["batch_size"] != self.batch_size:
            raise ValueError(
                f"checkpoint was written by {state['world_size']} process(es) with batch {state['batch_size']}; "
                f"this run has {self.dist.world_size} and {self.batch_size}: resume with the same layout"
            )
        load_trainable_state(self.task, state["task"])
        if self.objective.module is not None:
            if state.get("objective") is None:
                raise ValueError(f"the checkpoint holds no weights for the {self.objective.name} objective's network")
            self.objective.module.load_state_dict(state["objective"])
        self.objective.load_state(state.get("objective_state", {}))
        averaged = state.get("policy_average")
        if (averaged is None) != (self.policy_average is None):
            raise ValueError("the checkpoint was written with a different train.policy_ema_decay setting (averaged "
                             "policy: " + ("yes" if averaged is not None else "no") + "); resume with the setting it "
                             "was trained with")
        if self.policy_average is not None:
            self.policy_average.load_state(averaged)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        stored = [] if state["previous"] is None else [state["previous"], *state.get("replay", [])]
        # checkpoints are loaded on the CPU; the stored batches go back to where this run samples
        self.history = [Trajectories.from_state_dict(h).to(self.dist.device) for h in stored][: self.replay_batches]
        self.iteration = int(state["iteration"])
        self.skipped_in_a_row = int(state.get("skipped_in_a_row", 0))
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        _set_numpy_rng_state(rng["numpy"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
