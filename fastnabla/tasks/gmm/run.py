"""What a training run of the analytic task adds to the shared driver (:mod:`fastnabla.run.driver`):
evaluation against the closed-form target and the task's outputs.

Outputs besides the driver's (``config.yaml``, ``metrics.jsonl``, ``checkpoints/``, ``metrics.json``):
``samples.npy`` (final samples ``N x d``) and ``figure.png`` (pretrained and fine-tuned samples, target density,
TV over iterations). ``metrics.json`` holds ``tv_to_target``, ``tv_prior_to_target``, ``mean_log_reward``, energy
distances, mode weights, the TV curve and timings.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fastnabla.tasks.gmm.build import build_gmm_task
from fastnabla.tasks.gmm.evaluate import evaluate_sampler, target_reference
from fastnabla.tasks.gmm.metrics import total_variation
from fastnabla.utils.io import write_npy

if TYPE_CHECKING:
    from fastnabla.run.config import RunConfig
    from fastnabla.training.distributed import DistContext

EVAL_SEED_OFFSET = 1_000_003  # common random numbers for every evaluation of a run
TARGET_SEED_OFFSET = 7


def _table(rows: list[tuple[str, str, str, str]]) -> str:
    header = ("metric", "pretrained", "fine-tuned", "target")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    line = "  ".join("-" * w for w in widths)
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), line, *(fmt.format(*r) for r in rows)])


def _fmt_weights(w: torch.Tensor) -> str:
    return "[" + ", ".join(f"{float(v):.3f}" for v in w) + "]"


class GMMRun:
    """The analytic task of ``cfg`` and its evaluation against the closed-form target ``p# R^beta``."""

    def __init__(self, cfg: RunConfig, dist: DistContext):
        self.cfg = cfg
        self.task = build_gmm_task(cfg)
        self.observers: list = []
        self.images: list = []  # nothing to log as images
        self.eval_seed = cfg.seed + EVAL_SEED_OFFSET
        self.curve: list[tuple[int, float]] = []
        self.curve_seconds: list[float] = []

    def start(self, out_dir: Path, resume: bool, records: list[dict[str, Any]], trainer) -> None:
        """The exact target's samples and the pretrained sampler's scores (recomputed on resume: deterministic)."""
        ev = self.cfg.eval
        self.target_samples, self.target_log_reward = target_reference(
            self.task, ev.energy_samples, self.cfg.seed + TARGET_SEED_OFFSET)
        self.prior = evaluate_sampler(self.task, ev.final_num_samples, self.eval_seed, use_reference=True,
                                      target_samples=self.target_samples)
        self.curve, self.curve_seconds = [(0, self.prior.tv_to_target)], [0.0]
        for rec in records:  # the TV curve so far, after a resume
            if "tv_to_target" in rec:
                self.curve.append((rec["iteration"], rec["tv_to_target"]))
                self.curve_seconds.append(rec["elapsed_s"])

    def on_step(self, record: dict[str, Any]) -> dict[str, str]:
        """TV to the target every ``eval.every`` iterations (not at the last: the final evaluation does it)."""
        it, ev = record["iteration"], self.cfg.eval
        if not (ev.every and it % ev.every == 0 and it < self.cfg.train.iterations):
            return {}
        periodic = evaluate_sampler(self.task, ev.num_samples, self.eval_seed)
        record["tv_to_target"] = periodic.tv_to_target
        record["eval_mean_log_reward"] = periodic.mean_log_reward
        self.curve.append((it, periodic.tv_to_target))
        self.curve_seconds.append(record["elapsed_s"])
        return {"tv": f"{periodic.tv_to_target:.3f}", "logR": f"{periodic.mean_log_reward:.3f}"}

    def finish(self, out_dir: Path, records: list[dict[str, Any]], train_seconds: float) -> dict[str, Any]:
        """The final evaluation: ``samples.npy``, ``figure.png`` and the metrics."""
        ev, iterations = self.cfg.eval, self.cfg.train.iterations
        final = evaluate_sampler(self.task, ev.final_num_samples, self.eval_seed, target_samples=self.target_samples)
        self.curve.append((iterations, final.tv_to_target))
        self.curve_seconds.append(train_seconds)
        task, prior = self.task, self.prior
        self.final = final
        metrics: dict[str, Any] = {
            "tv_to_target": final.tv_to_target,
            "tv_prior_to_target": prior.tv_to_target,
            "tv_prior_weights_to_target_exact": total_variation(task.prior.weights, task.target.weights),
            "mean_log_reward": final.mean_log_reward,
            "mean_log_reward_prior": prior.mean_log_reward,
            "mean_log_reward_target": self.target_log_reward,
            "energy_distance": final.energy_distance,
            "energy_distance_prior": prior.energy_distance,
            "mode_weights": final.mode_weights,
            "mode_weights_prior": prior.mode_weights,
            "mode_weights_target": task.target.weights,
            "tv_curve": self.curve,
            "tv_curve_seconds": self.curve_seconds,
            "iterations": iterations,
            "num_eval_samples": ev.final_num_samples,
        }
        write_npy(out_dir / "samples.npy", final.samples.float().numpy())
        metrics["diverged"] = not bool(torch.isfinite(final.samples).all())
        if self.cfg.output.figure and not metrics["diverged"]:  # a diverged run has no axis limits to plot
            from fastnabla.tasks.gmm.plot import plot_run  # matplotlib only when plotting

            plot_run(out_dir / "figure.png", task.target, prior.samples, final.samples, self.curve,
                     prior.tv_to_target, title=f"{self.cfg.name}: TV {prior.tv_to_target:.3f} -> "
                                               f"{final.tv_to_target:.3f}")
        return metrics

    def summary(self, metrics: dict[str, Any], out_dir: Path) -> str:
        prior, final = self.prior, self.final
        ed = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        table = _table([
            ("mode-weight TV to target", f"{prior.tv_to_target:.4f}", f"{final.tv_to_target:.4f}", "0"),
            ("mean log R", f"{prior.mean_log_reward:.4f}", f"{final.mean_log_reward:.4f}",
             f"{self.target_log_reward:.4f}"),
            ("energy distance to target", ed(prior.energy_distance), ed(final.energy_distance), "0"),
            ("mode weights", _fmt_weights(prior.mode_weights), _fmt_weights(final.mode_weights),
             _fmt_weights(self.task.target.weights)),
        ])
        return (f"{table}\ntrained {metrics['iterations']} iterations in {metrics['train_seconds']:.1f} s; "
                f"outputs in {out_dir}")

    def close(self) -> None:
        """Nothing to release (the SD run removes its pass-counting hooks here)."""
