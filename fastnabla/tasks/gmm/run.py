"""What a training run of the analytic task adds to the shared driver (:mod:`fastnabla.run.driver`):
evaluation against the closed-form target and the task's outputs.

Outputs besides the driver's (``config.yaml``, ``metrics.jsonl``, ``checkpoints/``, ``metrics.json``):
``samples.npy`` (final samples ``N x d``) and ``figure.png`` (pretrained and fine-tuned samples, target density,
TV over iterations). ``metrics.json`` holds ``tv_to_target``, ``tv_prior_to_target``, ``mean_log_reward``, energy
distances, mode weights, the TV curve and timings, and for the shape of the modes (:mod:`.metrics`):
``mean_error``, ``mean_error_max``, ``std_ratio_mean``, ``std_ratio_worst`` (with ``_prior`` twins);
``reference``: the same metrics for the pretrained sampler, the *reweight-only* sampler (target weights, pretrained
components) and exact target samples (the sampling floor of each metric at these sample sizes);
``eval_curve``: every metric at every evaluation; ``last_fifth``: each metric averaged over the evaluations in the
last fifth of training (iteration >= 0.8 x iterations, the final one included) with its spread there.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fastnabla.tasks.gmm.build import build_gmm_task
from fastnabla.tasks.gmm.evaluate import (
    SHAPE_METRICS,
    SamplerEvaluation,
    evaluate_mixture,
    evaluate_sampler,
    reweight_only_mixture,
    target_reference,
)
from fastnabla.tasks.gmm.metrics import MIN_MODE_WEIGHT, total_variation
from fastnabla.utils.io import write_npy

if TYPE_CHECKING:
    from fastnabla.run.config import RunConfig
    from fastnabla.training.distributed import DistContext

EVAL_SEED_OFFSET = 1_000_003  # common random numbers for every evaluation of a run
TARGET_SEED_OFFSET = 7
REWEIGHT_SEED_OFFSET = 11  # the reweight-only reference's draws
FLOOR_SEED_OFFSET = 13  # exact target draws scored like a sampler (independent of the energy reference set)
CURVE_METRICS = ("tv_to_target", "mean_log_reward", "energy_distance", *SHAPE_METRICS)
# metrics.jsonl keys of the periodic evaluation (tv_to_target and eval_mean_log_reward as before)
RECORD_KEYS = {m: ("tv_to_target" if m == "tv_to_target" else f"eval_{m}") for m in CURVE_METRICS}


def last_fifth(curve: list[dict[str, Any]], iterations: int) -> dict[str, dict[str, float]]:
    """Mean, std, min and max of each metric over the evaluations at iteration >= iterations - iterations // 5
    (the last fifth of training; the pretrained point at iteration 0 never counts)."""
    start = iterations - iterations // 5
    points = [p for p in curve if p["iteration"] >= start and p["iteration"] > 0]
    out: dict[str, dict[str, float]] = {}
    for m in CURVE_METRICS:
        vals = [float(p[m]) for p in points if p.get(m) is not None]
        if not vals:
            continue
        t = torch.tensor(vals, dtype=torch.float64)
        out[m] = {"mean": float(t.mean()), "std": float(t.std()) if len(vals) > 1 else 0.0,
                  "min": float(t.min()), "max": float(t.max()), "count": len(vals)}
    return out


def reference_evaluations(task, num_samples: int, seed: int, target_samples: torch.Tensor
                          ) -> dict[str, SamplerEvaluation]:
    """The reference samplers of a run with seed ``seed``, scored like the fine-tuned one: ``pretrained`` (the
    run's evaluation noise), ``reweight_only`` (target weights, pretrained components) and ``exact_target`` (exact
    target draws: the sampling floor of every metric at ``num_samples`` samples and ``len(target_samples)`` energy
    samples). Deterministic in ``seed``."""
    return {
        "pretrained": evaluate_sampler(task, num_samples, seed + EVAL_SEED_OFFSET, use_pretrained=True,
                                       target_samples=target_samples),
        "reweight_only": evaluate_mixture(task, reweight_only_mixture(task), num_samples, seed + REWEIGHT_SEED_OFFSET,
                                          target_samples),
        "exact_target": evaluate_mixture(task, task.target, num_samples, seed + FLOOR_SEED_OFFSET, target_samples),
    }


def _point(iteration: int, ev: SamplerEvaluation) -> dict[str, Any]:
    return {"iteration": iteration, **ev.scalars()}


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
        refs = reference_evaluations(self.task, ev.final_num_samples, self.cfg.seed, self.target_samples)
        self.prior, self.reweight_only, self.exact = refs["pretrained"], refs["reweight_only"], refs["exact_target"]
        self.curve, self.curve_seconds = [(0, self.prior.tv_to_target)], [0.0]
        self.eval_curve = [_point(0, self.prior)]
        for rec in records:  # the curves so far, after a resume
            if "tv_to_target" in rec:
                self.curve.append((rec["iteration"], rec["tv_to_target"]))
                self.curve_seconds.append(rec["elapsed_s"])
                self.eval_curve.append({"iteration": rec["iteration"],
                                        **{m: rec.get(k) for m, k in RECORD_KEYS.items()}})

    def on_step(self, record: dict[str, Any]) -> dict[str, str]:
        """TV to the target every ``eval.every`` iterations (not at the last: the final evaluation does it)."""
        it, ev = record["iteration"], self.cfg.eval
        if not (ev.every and it % ev.every == 0 and it < self.cfg.train.iterations):
            return {}
        periodic = evaluate_sampler(self.task, ev.num_samples, self.eval_seed, target_samples=self.target_samples)
        for m, key in RECORD_KEYS.items():
            record[key] = periodic.scalars()[m]
        self.curve.append((it, periodic.tv_to_target))
        self.curve_seconds.append(record["elapsed_s"])
        self.eval_curve.append(_point(it, periodic))
        return {"tv": f"{periodic.tv_to_target:.3f}", "logR": f"{periodic.mean_log_reward:.3f}"}

    def finish(self, out_dir: Path, records: list[dict[str, Any]], train_seconds: float) -> dict[str, Any]:
        """The final evaluation: ``samples.npy``, ``figure.png`` and the metrics."""
        ev, iterations = self.cfg.eval, self.cfg.train.iterations
        final = evaluate_sampler(self.task, ev.final_num_samples, self.eval_seed, target_samples=self.target_samples)
        self.curve.append((iterations, final.tv_to_target))
        self.curve_seconds.append(train_seconds)
        self.eval_curve.append(_point(iterations, final))
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
            "mean_log_reward_target_exact": task.reward.expected_log_reward(task.target),
            **final.shape,
            **{f"{k}_prior": v for k, v in prior.shape.items()},
            "mean_error_per_mode": final.mean_error_per_mode,
            "std_ratio_per_mode": final.std_ratio_per_mode,
            "shape_modes": [k for k in range(task.target.num_components)
                            if float(task.target.weights[k]) >= MIN_MODE_WEIGHT],
            "reference": {name: {**e.scalars(), "mean_error_per_mode": e.mean_error_per_mode,
                                 "std_ratio_per_mode": e.std_ratio_per_mode}
                          for name, e in (("pretrained", prior), ("reweight_only", self.reweight_only),
                                          ("exact_target", self.exact))},
            "energy_distance_floor": self.exact.energy_distance,
            "eval_curve": self.eval_curve,
            "last_fifth": last_fifth(self.eval_curve, iterations),
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
        exact, rw = self.exact, self.reweight_only
        table = _table([
            ("mode-weight TV to target", f"{prior.tv_to_target:.4f}", f"{final.tv_to_target:.4f}", "0"),
            ("mean log R", f"{prior.mean_log_reward:.4f}", f"{final.mean_log_reward:.4f}",
             f"{self.target_log_reward:.4f}"),
            ("energy distance to target", ed(prior.energy_distance), ed(final.energy_distance),
             f"0 (floor {ed(exact.energy_distance)})"),
            ("mode weights", _fmt_weights(prior.mode_weights), _fmt_weights(final.mode_weights),
             _fmt_weights(self.task.target.weights)),
            ("mode mean error (stds)", f"{prior.shape['mean_error']:.4f}", f"{final.shape['mean_error']:.4f}",
             f"0 (floor {exact.shape['mean_error']:.4f})"),
            ("worst std factor", f"{prior.shape['std_ratio_worst']:.4f}", f"{final.shape['std_ratio_worst']:.4f}",
             f"1 (floor {exact.shape['std_ratio_worst']:.4f})"),
        ])
        tail = metrics["last_fifth"]
        stab = ", ".join(f"{name} {tail[m]['mean']:.4f}" for name, m in (
            ("TV", "tv_to_target"), ("mean error", "mean_error"), ("energy", "energy_distance")) if m in tail)
        return (f"{table}\nreweight-only reference (target weights, pretrained components): TV 0 by construction, "
                f"mode mean error {rw.shape['mean_error']:.4f}, worst std factor {rw.shape['std_ratio_worst']:.4f}, "
                f"energy distance {ed(rw.energy_distance)}\n"
                + (f"averaged over the last fifth of training: {stab}\n" if stab else "")
                + f"trained {metrics['iterations']} iterations in {metrics['train_seconds']:.1f} s; "
                f"outputs in {out_dir}")

    def close(self) -> None:
        """Nothing to release (the SD run removes its pass-counting hooks here)."""
