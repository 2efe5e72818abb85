"""The one run driver shared by every task: build, check, train, log, checkpoint, evaluate, write the outputs.

Order, so that bad input loses nothing and leaves nothing behind:

1. build the task (models, reward, prompts) and the trainer -- every error about the config, a model, a reward or
   a prompt file is raised here, before any output exists;
2. create the output directory (:func:`fastnabla.utils.io.plan_run_dir`: finished runs get a numbered sibling,
   an unfinished run is never discarded) or, on resume, load the latest checkpoint;
3. write ``config.yaml``, then train with a progress bar, ``metrics.jsonl`` (one line per iteration, flushed),
   TensorBoard scalars, checkpoints every ``train.checkpoint_every`` iterations and on SIGTERM/SIGINT;
4. write ``metrics.json`` last (a directory without it is an unfinished run).

Task-specific parts -- evaluation, extra outputs, the printed summary -- come from the task's run class
(:class:`fastnabla.tasks.gmm.run.GMMRun`, :class:`fastnabla.tasks.sd.run.SDRun`), which implements :class:`TaskRun`.

Exit statuses (:class:`RunOutcome`): 0 finished, 3 diverged (too many consecutive skipped updates, or a finished run
whose final metrics are not finite), 130 stopped by a signal (resumable). Bad input raises (``ConfigError``,
``ValueError``, ``FileNotFoundError``) before anything is written; ``python -m fastnabla.train`` turns it into
exit status 2.
"""

from __future__ import annotations

import contextlib
import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from fastnabla.config.fields import ConfigError
from fastnabla.config.loader import to_dict, to_yaml
from fastnabla.methods import build_objective
from fastnabla.methods.config import NEEDS_STOCHASTIC_STEPS
from fastnabla.rewards.validate import check_reward
from fastnabla.run.config import RunConfig
from fastnabla.training.checkpoint import CheckpointManager
from fastnabla.training.distributed import DistContext, init_distributed
from fastnabla.training.interface import DiffusionTask
from fastnabla.training.model_card import (
    HubError,
    ModelCard,
    check_hub,
    push_to_hub,
    reward_description,
    write_model_card,
)
from fastnabla.training.session import run_steps
from fastnabla.training.trackers import LoggedImages, Trackers, check_report_to
from fastnabla.training.trainer import DivergedError, Trainer, TrainObserver
from fastnabla.utils.dtypes import torch_dtype
from fastnabla.utils.io import (
    CONFIG_FILE,
    CONFIG_HEADER,
    JsonlLogger,
    atomic_write,
    create_run_dir,
    plan_run_dir,
    read_jsonl,
    write_json,
)
from fastnabla.utils.profiling import PhaseTimer

EXIT_OK, EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_STOPPED = 0, 2, 3, 130
# methods that differentiate the reward w.r.t. the image (the forward-looking term, backprop through sampling); the
# others (ddpo, residual-db, dag-db) use reward values only
NEEDS_REWARD_GRADIENT = ("nabla-gfn", "refl", "draft-k", "draft-lv")


class InputError(ValueError):
    """A model, reward or data file could not be loaded while building the run (before anything is written)."""


class TaskRun(Protocol):
    """What a task adds to a run (implemented by ``fastnabla.tasks.<task>.run``); called on rank 0 except
    ``observers`` and ``close``."""

    task: DiffusionTask
    observers: list[TrainObserver]
    images: list[LoggedImages | tuple[str, torch.Tensor]]  # image batches to log; drained after each step

    def start(self, out_dir: Path, resume: bool, records: list[dict[str, Any]], trainer: Trainer) -> None:
        """Before training: baselines to compare against (``records``: the log so far, on resume)."""

    def on_step(self, record: dict[str, Any]) -> dict[str, str]:
        """After each iteration: periodic evaluation into ``record``; returns progress-bar fields."""

    def finish(self, out_dir: Path, records: list[dict[str, Any]], train_seconds: float) -> dict[str, Any]:
        """After the last iteration: the final evaluation, extra outputs, the task's metrics."""

    def summary(self, metrics: dict[str, Any], out_dir: Path) -> str:
        """What to print at the end."""

    def close(self) -> None:
        """Release hooks."""


@dataclass
class RunOutcome:
    exit_code: int
    out_dir: Path | None
    metrics: dict[str, Any] | None  # metrics.json's content (rank 0), None when stopped early


def build_task_run(cfg: RunConfig, dist: DistContext) -> TaskRun:
    """The task of ``cfg`` with its run hooks (models and reward loaded: errors name the field or file)."""
    if cfg.task == "gmm":
        from fastnabla.tasks.gmm.run import GMMRun

        run: TaskRun = GMMRun(cfg, dist)
    elif cfg.task == "flow":  # SD3 / SD3.5, FLUX.1 (docs/flow-matching.md)
        from fastnabla.tasks.flow.run import FlowRun

        run = FlowRun(cfg, dist)
    else:
        from fastnabla.tasks.digits.run import DigitsRun, is_digits_model
        from fastnabla.tasks.sd.run import SDRun

        run = DigitsRun(cfg, dist) if is_digits_model(cfg.sd.model) else SDRun(cfg, dist)  # docs/digits.md
    check_sampler(run.task, cfg)
    if cfg.task in ("sd", "flow"):
        check_task_reward(run.task, cfg.method.name)
    return run


def check_task_reward(task: Any, method: str) -> None:
    """The reward's contract on a probe batch at the task's image size (:func:`fastnabla.rewards.check_reward`):
    shape ``[B]``, float, finite, and differentiable w.r.t. the image for the methods that need its gradient."""
    size = getattr(task, "image_size", None) or task.resolution
    check_reward(task.reward, tuple(size) if not isinstance(size, int) else size,
                 needs_gradient=method in NEEDS_REWARD_GRADIENT, device=task.device)


def check_sampler(task: DiffusionTask, cfg: RunConfig) -> None:
    """Methods that divide by ``sigma_t^2`` need every sampler step stochastic; say which settings work."""
    stochastic = task.mdp.stochastic
    if cfg.method.name not in NEEDS_STOCHASTIC_STEPS or bool(stochastic.all()):
        return
    steps = [i for i, s in enumerate(stochastic.tolist()) if not s]
    where = {"sd": "sd.sampler / sd.eta", "flow": "flow.noise_level"}.get(cfg.task, "sampler")
    raise ConfigError(
        f"{where}: step(s) {steps} of {len(stochastic)} have sigma = 0, and method.name={cfg.method.name!r} divides "
        "by sigma^2 (transition scores and log-densities), so training would turn to NaN. Settings that work: DDIM "
        "with eta > 0 (the paper's eta = 1) and the scheduler's set_alpha_to_one=false (Stable Diffusion's "
        "schedulers have it), or DDPM with variance_type=fixed_large (DDPM's fixed_small and DDIM with eta = 0 have a "
        f"deterministic step); or a method that needs no densities ({', '.join(('refl', 'draft-k', 'draft-lv'))})."
    )


def build_trainer(
    task: DiffusionTask,
    cfg: RunConfig,
    dist: DistContext | None = None,
    timer: PhaseTimer | None = None,
    observers: list[TrainObserver] | None = None,
) -> Trainer:
    """The trainer of ``cfg`` (``train``, ``method`` and ``optim`` sections; the trajectory storage dtype of the
    sd task) for ``task``."""
    t = cfg.train
    sd = cfg.task in ("sd", "flow")
    section = cfg.flow if cfg.task == "flow" else cfg.sd
    storage = torch_dtype(section.trajectory_dtype, f"{cfg.task}.trajectory_dtype") if sd else None
    return Trainer(
        task, build_objective(cfg.method, task, cfg.seed), cfg.optim, t.batch_size, t.transition_fraction,
        t.updates_per_batch, cfg.seed, t.iterations, sample_batch_size=t.sample_batch_size or None,
        micro_batch_size=t.micro_batch_size or None, fl_batch_size=t.fl_batch_size, storage_dtype=storage,
        max_skipped_updates=t.max_skipped_updates, condition_repeats=section.prompts.repeats if sd else 1,
        replay_batches=t.replay_batches, replay_subsample=t.replay_subsample, policy_ema_decay=t.policy_ema_decay,
        dist=dist,
        timer=timer, observers=observers,
    )


def peak_memory_bytes(device: torch.device) -> int:
    """Peak CUDA memory allocated since the last reset, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def config_text(cfg: RunConfig) -> str:
    """``config.yaml``: the resolved config, marked as a fastnabla run (:func:`fastnabla.utils.io.is_run_dir`)."""
    return f"{CONFIG_HEADER} (python -m fastnabla.train; --resume DIR continues it)\n{to_yaml(cfg)}"


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, torch.Tensor):
        return value.is_floating_point() and not bool(torch.isfinite(value).all())
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_non_finite(v) for v in value)
    return False


def run_training(
    cfg: RunConfig,
    *,
    resume_dir: Path | None = None,
    verbose: bool = True,
    dist: DistContext | None = None,
    command: str | None = None,
    before_start: Callable[[RunConfig, DistContext], None] | None = None,
) -> RunOutcome:
    """Train as ``cfg`` says: a new run in ``cfg.output_dir()``, or continue the unfinished run in ``resume_dir``.

    ``command``: how the run was started, for the LoRA's model card (default: this process's ``sys.argv``).
    ``before_start``: called on rank 0 once the config is checked, before the task is built (the command line's
    memory estimate: :func:`fastnabla.train.print_memory_estimate`, a higher layer).

    Raises:
        ConfigError, ValueError, FileNotFoundError: bad input, before anything is written.
    """
    if not cfg.name:
        raise ConfigError("name: the run needs a name (the CLI sets it from the preset)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    device = "cpu" if cfg.task == "gmm" else cfg.train.device  # the analytic task's tensors are tiny
    dist = dist or init_distributed(device)
    main = dist.is_main
    planned = None if resume_dir is not None else plan_run_dir(cfg.output_dir(), cfg.output.overwrite)
    if before_start is not None and main:
        before_start(cfg, dist)
    if main:
        try:
            check_report_to(cfg.output.report_to)
            if cfg.output.push_to_hub and cfg.task in ("sd", "flow"):
                check_hub(cfg.output.push_to_hub)
        except (ImportError, HubError) as err:
            raise InputError(str(err)) from err
    try:
        run = build_task_run(cfg, dist)
    except FileNotFoundError:
        raise
    except OSError as err:  # e.g. a hub download that failed: input, not a crash
        raise InputError(str(err)) from err
    try:
        timer = PhaseTimer()
        trainer = build_trainer(run.task, cfg, dist, timer, run.observers)
        checkpoints = CheckpointManager(Path(resume_dir or planned[0]) / "checkpoints", cfg.train.keep_checkpoints,
                                        dist)
        if resume_dir is not None:
            out_dir = Path(resume_dir)
            latest = checkpoints.latest()
            try:
                checkpoints.load(trainer)
            except (KeyError, RuntimeError) as err:
                raise ValueError(f"cannot resume {out_dir}: its checkpoint does not fit this config ({err})") from err
            if verbose and main:
                print(f"resuming {cfg.name} in {out_dir} from {latest.name} (iteration {trainer.iteration} of "
                      f"{cfg.train.iterations})", file=sys.stderr)
        else:
            out_dir = create_run_dir(*planned) if main else None
            out_dir = Path(dist.broadcast_object(str(out_dir)))
            if main:
                atomic_write(out_dir / CONFIG_FILE, lambda f: f.write(config_text(cfg).encode()))
        command = command or " ".join(["python -m fastnabla.train", *sys.argv[1:]])
        return _train(cfg, run, trainer, checkpoints, out_dir, resume_dir is not None, verbose, dist, t_start,
                      command)
    finally:
        run.close()


def _train(cfg, run: TaskRun, trainer: Trainer, checkpoints: CheckpointManager, out_dir: Path, resume: bool,
           verbose: bool, dist: DistContext, t_start: float, command: str) -> RunOutcome:
    main, iterations = dist.is_main, cfg.train.iterations
    log = JsonlLogger(out_dir / "metrics.jsonl", resume_after=trainer.iteration if resume else None) if main else None
    records = log.records() if (log is not None and resume) else []
    clock_offset = records[-1].get("elapsed_s", 0.0) if records else 0.0
    trackers = Trackers(cfg.output.report_to, out_dir, cfg.name, config=to_dict(cfg),
                        wandb_project=cfg.output.wandb_project, resume=resume, enabled=main)
    if main:
        run.start(out_dir, resume, records, trainer)
    bar = tqdm(total=iterations, initial=trainer.iteration, desc=f"{cfg.name}: training", dynamic_ncols=True,
               mininterval=0.5, disable=not (cfg.output.progress and verbose and main))
    t_train = time.perf_counter()
    last_totals = dict(trainer.timer.total)

    def on_step(stats: dict[str, Any]) -> None:
        nonlocal last_totals
        record: dict[str, Any] = dict(stats)
        record["elapsed_s"] = clock_offset + time.perf_counter() - t_train
        record["seconds"] = {k: v - last_totals.get(k, 0.0) for k, v in trainer.timer.total.items()}
        last_totals = dict(trainer.timer.total)
        record["peak_memory_bytes"] = peak_memory_bytes(dist.device)
        if dist.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dist.device)
        if not main:
            return
        for reason in record.get("skip_reasons", []):
            bar.write(f"{cfg.name}: iteration {record['iteration']}: skipped {reason}", file=sys.stderr)
        evaluates = bool(cfg.eval.every) and record["iteration"] % cfg.eval.every == 0  # every task's periodic rule
        with trainer.handed_out_policy() if evaluates else contextlib.nullcontext():
            postfix = run.on_step(record)
        log.log(record)
        trackers.scalars(record, record["iteration"])
        while run.images:
            trackers.images(run.images.pop(0), record["iteration"])
        if postfix:
            bar.set_postfix(**postfix)
        bar.update(1)

    diverged: str | None = None
    try:
        result = run_steps(trainer, iterations, on_step=on_step, checkpoints=checkpoints,
                           checkpoint_every=cfg.train.checkpoint_every, resume_hint=out_dir if verbose else None)
    except DivergedError as err:
        diverged, result = str(err), None
    except BaseException:
        trackers.close()
        raise
    finally:
        bar.close()
        if log is not None:
            log.close()
    if diverged is not None or not result.finished or not main:
        trackers.close()
        if diverged is not None:
            return _diverged(cfg, out_dir, trainer, checkpoints, diverged, dist, t_start)
        return RunOutcome(EXIT_STOPPED if not result.finished else EXIT_OK, out_dir, None)
    try:
        with trainer.handed_out_policy():
            return _finish(cfg, run, out_dir, dist, t_start, clock_offset + time.perf_counter() - t_train, command,
                           trackers, verbose)
    finally:
        trackers.close()


def _finish(cfg, run: TaskRun, out_dir: Path, dist: DistContext, t_start: float, train_seconds: float, command: str,
            trackers: Trackers, verbose: bool) -> RunOutcome:
    """Rank 0 after the last iteration: the task's final evaluation and outputs (its images to the trackers), the
    LoRA's model card and hub upload, ``metrics.json`` last."""
    records = read_jsonl(out_dir / "metrics.jsonl")
    metrics: dict[str, Any] = {"name": cfg.name}
    metrics.update(run.finish(out_dir, records, train_seconds))
    while run.images:
        trackers.images(run.images.pop(0), cfg.train.iterations)
    metrics.update(train_seconds=train_seconds, world_size=dist.world_size,
                   skipped_updates=sum(r.get("skipped_updates", 0) for r in records))
    if _non_finite({k: v for k, v in metrics.items() if k != "diverged"}):
        metrics["diverged"] = True
        metrics["stopped_because"] = "the final metrics are not finite"
    if metrics.get("lora_dir"):
        _lora_card_and_push(cfg, metrics, command)
    metrics["total_seconds"] = time.perf_counter() - t_start
    write_json(out_dir / "metrics.json", metrics)
    if verbose:
        print(run.summary(metrics, out_dir))
    if metrics.get("diverged"):
        print(f"error: {cfg.name} diverged: {metrics.get('stopped_because', 'non-finite samples')}", file=sys.stderr)
        return RunOutcome(EXIT_DIVERGED, out_dir, metrics)
    return RunOutcome(EXIT_OK, out_dir, metrics)


def _lora_card_and_push(cfg: RunConfig, metrics: dict[str, Any], command: str) -> None:
    """The model card beside the exported LoRA (``OUT/lora/README.md``) and, with ``output.push_to_hub``, the
    upload; a failed upload is reported (``hub_push_error`` in ``metrics.json``) without failing the finished run."""
    sd, method = (cfg.flow if cfg.task == "flow" else cfg.sd), cfg.method
    if cfg.task == "flow":
        sampler = (f"Flow-GRPO's SDE, noise level {sd.noise_level:g}, {sd.num_steps} steps, "
                   f"{'CFG' if sd.family == 'sd3' else 'guidance embedding'} {sd.guidance_scale:g}")
    else:
        sampler = f"{sd.sampler.upper()} eta {sd.eta:g}, {sd.num_steps} steps, CFG {sd.guidance_scale:g}"
    lora = f"rank {sd.lora.rank}, alpha {sd.lora.alpha:g}, on {', '.join(sd.lora.target_modules)}"
    if sd.lora.init:
        lora += f"; started from {sd.lora.init}"
    rows = [("sampler", sampler), ("LoRA", lora),
            ("batch", f"{cfg.train.batch_size} trajectories x {cfg.train.updates_per_batch} updates, "
                      f"{cfg.train.transition_fraction:g} of transitions"),
            ("optimizer", f"{cfg.optim.optimizer}, lr {cfg.optim.lr_policy:g}"),
            ("prompts", sd.prompts.source + (f" ({sd.prompts.repeats} samples per prompt)"
                                             if sd.prompts.repeats > 1 else "")),
            ("seed", str(cfg.seed))]
    if cfg.train.policy_ema_decay:
        rows.append(("weights", f"the Polyak average of the trained weights (decay {cfg.train.policy_ema_decay:g} "
                                "per optimizer step)"))
    card = ModelCard(
        name=cfg.name, base_model=sd.model, method=method.name, rewards=reward_description(sd.reward),
        beta=method.beta, iterations=cfg.train.iterations, command=command,
        reward_before=metrics.get("eval_log_reward_pretrained"), reward_after=metrics.get("eval_log_reward"),
        reward_note=f"{len(sd.prompts.eval_seeds)} seeds per evaluation prompt", rows=rows)
    lora_dir = Path(metrics["lora_dir"])
    metrics["model_card"] = str(write_model_card(lora_dir, card))
    if cfg.output.push_to_hub:
        try:
            metrics["hub_url"] = push_to_hub(lora_dir, cfg.output.push_to_hub, cfg.output.hub_private,
                                             f"{cfg.name}: {method.name} on {card.rewards}")
        except HubError as err:
            metrics["hub_push_error"] = str(err)
            print(f"error: {err}", file=sys.stderr)


def _diverged(cfg, out_dir: Path, trainer: Trainer, checkpoints: CheckpointManager, why: str, dist: DistContext,
              t_start: float) -> RunOutcome:
    """Stop a diverged run: keep its last good checkpoint, say why in ``metrics.json``, exit status 3."""
    if not dist.is_main:
        return RunOutcome(EXIT_DIVERGED, out_dir, None)
    latest = checkpoints.latest()
    metrics = {
        "name": cfg.name,
        "diverged": True,
        "stopped_because": why,
        "stopped_at_iteration": trainer.iteration + 1,
        "last_good_checkpoint": None if latest is None else str(latest),
        "total_seconds": time.perf_counter() - t_start,
    }
    write_json(out_dir / "metrics.json", metrics)
    kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was written before"
    print(f"error: {cfg.name} diverged and stopped: {why}; {kept}; see {out_dir / 'metrics.json'}", file=sys.stderr)
    return RunOutcome(EXIT_DIVERGED, out_dir, metrics)
