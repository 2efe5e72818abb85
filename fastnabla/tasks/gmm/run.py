"""One training run on the analytic task: train, evaluate against the closed form, write the outputs.

Outputs in the run directory: ``config.yaml`` (resolved config), ``metrics.jsonl`` (one line per
iteration, written as it goes), ``samples.npy`` (final samples ``N x d``), ``figure.png`` and, last,
``metrics.json`` (final metrics) — a directory without ``metrics.json`` is an unfinished run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fastnabla.config.loader import to_yaml
from fastnabla.config.schema import RunConfig
from fastnabla.tasks.gmm.build import build_gmm_task
from fastnabla.tasks.gmm.evaluate import evaluate_sampler, target_reference
from fastnabla.tasks.gmm.metrics import total_variation
from fastnabla.tasks.gmm.plot import plot_run
from fastnabla.training.checkpoint import CheckpointManager
from fastnabla.training.distributed import DistContext, init_distributed
from fastnabla.training.session import run_steps
from fastnabla.training.trainer import NablaGFNTrainer
from fastnabla.utils.io import JsonlLogger, atomic_write, write_json, write_npy


def _table(rows: list[tuple[str, str, str, str]]) -> str:
    header = ("metric", "pretrained", "fine-tuned", "target")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    line = "  ".join("-" * w for w in widths)
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), line, *(fmt.format(*r) for r in rows)])


def _fmt_weights(w: torch.Tensor) -> str:
    return "[" + ", ".join(f"{float(v):.3f}" for v in w) + "]"


def build_trainer(task, cfg: RunConfig, dist: DistContext | None = None, timer=None) -> NablaGFNTrainer:
    """The trainer of ``cfg`` (``train``, ``method`` and ``optim`` sections) for ``task``."""
    from fastnabla.methods import build_objective

    t = cfg.train
    objective = build_objective(cfg.method, task, cfg.seed)
    return NablaGFNTrainer(
        task, objective, cfg.optim, t.batch_size, t.transition_fraction, t.updates_per_batch, cfg.seed, t.iterations,
        sample_batch_size=t.sample_batch_size or None, micro_batch_size=t.micro_batch_size or None,
        fl_batch_size=t.fl_batch_size, dist=dist, timer=timer,
    )


def run_gmm(
    cfg: RunConfig,
    out_dir: Path,
    name: str = "gmm",
    verbose: bool = True,
    resume: bool = False,
    dist: DistContext | None = None,
) -> dict[str, Any] | None:
    """Train on the analytic task described by ``cfg`` and write the outputs into ``out_dir``.

    Returns the final metrics, or None on processes other than rank 0 and when a SIGTERM/SIGINT
    stopped the run early (a checkpoint is then in ``out_dir/checkpoints``; ``resume=True`` continues
    from it and ends with the same parameters as an uninterrupted run).
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    dist = dist or init_distributed("cpu")  # the analytic task's tensors are tiny: CPU only
    main = dist.is_main
    task = build_gmm_task(cfg)
    trainer = build_trainer(task, cfg, dist)
    checkpoints = CheckpointManager(out_dir / "checkpoints", cfg.train.keep_checkpoints, dist)
    if resume:
        checkpoints.load(trainer)
    elif main:
        config_text = to_yaml(cfg)
        atomic_write(out_dir / "config.yaml", lambda f: f.write(config_text.encode()))

    ev = cfg.eval
    eval_seed = cfg.seed + 1_000_003  # common random numbers for every evaluation of this run
    prior = target_samples = target_log_reward = None
    if main:
        target_samples, target_log_reward = target_reference(task, ev.energy_samples, cfg.seed + 7)
        prior = evaluate_sampler(
            task, ev.final_num_samples, eval_seed, use_reference=True, target_samples=target_samples
        )
    iterations = cfg.train.iterations
    log = JsonlLogger(out_dir / "metrics.jsonl", resume_after=trainer.iteration if resume else None) if main else None
    # TV curve and training wall-clock at each curve point (continued from the log after a resume)
    curve: list[tuple[int, float]] = [(0, prior.tv_to_target)] if main else []
    curve_seconds: list[float] = [0.0]
    clock_offset = 0.0
    for rec in log.records() if (main and resume) else []:
        clock_offset = rec.get("elapsed_s", clock_offset)
        if "tv_to_target" in rec:
            curve.append((rec["iteration"], rec["tv_to_target"]))
            curve_seconds.append(rec["elapsed_s"])

    t_train = time.perf_counter()
    bar = tqdm(
        total=iterations, initial=trainer.iteration, desc=f"{name}: training", dynamic_ncols=True, mininterval=0.5,
        disable=not (cfg.output.progress and verbose and main),
    )

    def on_step(record: dict[str, Any]) -> None:
        if not main:
            return
        it = record["iteration"]
        record["elapsed_s"] = clock_offset + time.perf_counter() - t_train
        if ev.every and it % ev.every == 0 and it < iterations:
            periodic = evaluate_sampler(task, ev.num_samples, eval_seed)
            record["tv_to_target"] = periodic.tv_to_target
            record["eval_mean_log_reward"] = periodic.mean_log_reward
            curve.append((it, periodic.tv_to_target))
            curve_seconds.append(record["elapsed_s"])
            bar.set_postfix(tv=f"{periodic.tv_to_target:.3f}", logR=f"{periodic.mean_log_reward:.3f}")
        log.log(record)
        bar.update(1)

    try:
        result = run_steps(trainer, iterations, on_step=on_step, checkpoints=checkpoints,
                           checkpoint_every=cfg.train.checkpoint_every, resume_hint=out_dir if verbose else None)
    finally:
        bar.close()
        if log is not None:
            log.close()
    if not result.finished or not main:
        return None
    train_seconds = clock_offset + time.perf_counter() - t_train

    final = evaluate_sampler(task, ev.final_num_samples, eval_seed, target_samples=target_samples)
    curve.append((iterations, final.tv_to_target))
    curve_seconds.append(train_seconds)
    exact_prior_weights = task.prior.weights
    metrics: dict[str, Any] = {
        "name": name,
        "tv_to_target": final.tv_to_target,
        "tv_prior_to_target": prior.tv_to_target,
        "tv_prior_weights_to_target_exact": total_variation(exact_prior_weights, task.target.weights),
        "mean_log_reward": final.mean_log_reward,
        "mean_log_reward_prior": prior.mean_log_reward,
        "mean_log_reward_target": target_log_reward,
        "energy_distance": final.energy_distance,
        "energy_distance_prior": prior.energy_distance,
        "mode_weights": final.mode_weights,
        "mode_weights_prior": prior.mode_weights,
        "mode_weights_target": task.target.weights,
        "tv_curve": curve,
        "tv_curve_seconds": curve_seconds,
        "iterations": iterations,
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - t_start,
        "num_eval_samples": ev.final_num_samples,
    }
    write_npy(out_dir / "samples.npy", final.samples.float().numpy())
    metrics["diverged"] = not bool(torch.isfinite(final.samples).all())
    if cfg.output.figure and not metrics["diverged"]:  # a diverged run has no axis limits to plot
        plot_run(
            out_dir / "figure.png", task.target, prior.samples, final.samples, curve, prior.tv_to_target,
            title=f"{name}: TV {prior.tv_to_target:.3f} -> {final.tv_to_target:.3f}",
        )
    metrics["total_seconds"] = time.perf_counter() - t_start
    write_json(out_dir / "metrics.json", metrics)

    if verbose:
        ed = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        print(
            _table(
                [
                    ("mode-weight TV to target", f"{prior.tv_to_target:.4f}", f"{final.tv_to_target:.4f}", "0"),
                    ("mean log R", f"{prior.mean_log_reward:.4f}", f"{final.mean_log_reward:.4f}",
                     f"{target_log_reward:.4f}"),
                    ("energy distance to target", ed(prior.energy_distance), ed(final.energy_distance), "0"),
                    ("mode weights", _fmt_weights(prior.mode_weights), _fmt_weights(final.mode_weights),
                     _fmt_weights(task.target.weights)),
                ]
            )
        )
        print(f"trained {iterations} iterations in {train_seconds:.1f} s; outputs in {out_dir}")
    return metrics
