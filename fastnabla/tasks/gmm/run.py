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


def run_gmm(cfg: RunConfig, out_dir: Path, name: str = "gmm", verbose: bool = True) -> dict[str, Any]:
    """Train on the analytic task described by ``cfg`` and write the outputs into ``out_dir``."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    task = build_gmm_task(cfg)
    trainer = NablaGFNTrainer(
        task, cfg.method, cfg.optim, cfg.train.batch_size, cfg.train.transition_fraction,
        cfg.train.updates_per_batch, cfg.seed, cfg.train.iterations,
    )
    config_text = to_yaml(cfg)
    atomic_write(out_dir / "config.yaml", lambda f: f.write(config_text.encode()))

    ev = cfg.eval
    eval_seed = cfg.seed + 1_000_003  # common random numbers for every evaluation of this run
    target_samples, target_log_reward = target_reference(task, ev.energy_samples, cfg.seed + 7)
    prior = evaluate_sampler(task, ev.final_num_samples, eval_seed, use_reference=True, target_samples=target_samples)
    curve: list[tuple[int, float]] = [(0, prior.tv_to_target)]
    curve_seconds: list[float] = [0.0]  # training wall-clock at each curve point

    t_train = time.perf_counter()
    iterations = cfg.train.iterations
    with JsonlLogger(out_dir / "metrics.jsonl") as log, tqdm(
        total=iterations, desc=f"{name}: training", disable=not (cfg.output.progress and verbose), dynamic_ncols=True,
        mininterval=0.5
    ) as bar:
        for it in range(1, iterations + 1):
            record: dict[str, Any] = trainer.step()
            record["elapsed_s"] = time.perf_counter() - t_train
            if ev.every and it % ev.every == 0 and it < iterations:
                periodic = evaluate_sampler(task, ev.num_samples, eval_seed)
                record["tv_to_target"] = periodic.tv_to_target
                record["eval_mean_log_reward"] = periodic.mean_log_reward
                curve.append((it, periodic.tv_to_target))
                curve_seconds.append(record["elapsed_s"])
                bar.set_postfix(tv=f"{periodic.tv_to_target:.3f}", logR=f"{periodic.mean_log_reward:.3f}")
            log.log(record)
            bar.update(1)
    train_seconds = time.perf_counter() - t_train

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
    if cfg.output.figure:
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
