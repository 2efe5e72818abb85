"""Every training method on the analytic benchmark, over seeds: a markdown table and figures.

    python -m fastnabla.compare.methods --seeds 0 1 2 --out docs/analytic/methods [key.path=value ...]

Each method runs its preset (``nabla-gfn``: ``gmm-default``; a baseline ``NAME``: ``gmm-NAME``, the paper's
section 4.3 settings) with the same sampler, task, batch and number of iterations, through
:func:`fastnabla.compare.presets.run_preset_seed` (runs in ``OUT/runs/PRESET-sSEED``; finished runs are reused, so an
interrupted comparison resumes). Outputs:

* ``OUT/results.md``: per method, mean ± std over seeds of the mode-weight TV to the closed-form target, the
  mean log-reward, the mode coverage, the energy distance to exact target samples and the training wall-clock;
* ``OUT/samples.png``: each method's final samples (first seed) over the target density, next to the
  pretrained sampler and exact target draws;
* ``OUT/tv_curves.png`` (TV against iterations and wall-clock) and ``OUT/summary.json`` (every run's metrics).

**Mode coverage**: the number of target modes whose weight under the fine-tuned sampler is at least
``--coverage-fraction`` (default 0.5) of their target weight, out of ``K``; a sampler that collapses onto the
reward peak loses the modes away from it.

**Energy distance to R^β alone** (bump rewards): to draws of the normalised ``R^β = N(center, width²/β I)``, the
distribution DAG-DB targets (no pretrained prior); it tells a method that converges to the wrong target from one
that is slow.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fastnabla.compare.presets import plot_curves, run_preset_seed
from fastnabla.config.loader import ConfigError, build_config
from fastnabla.methods.config import METHODS
from fastnabla.run.config import RunConfig
from fastnabla.run.presets import get_preset
from fastnabla.utils.io import atomic_write, write_json


def method_preset(method: str) -> str:
    """The preset a method runs in the comparison."""
    return "gmm-default" if method == "nabla-gfn" else f"gmm-{method}"


def mode_coverage(weights: Sequence[float], target: Sequence[float], fraction: float = 0.5) -> int:
    """Number of modes ``k`` with ``weights[k] >= fraction * target[k]``."""
    return sum(int(w >= fraction * t) for w, t in zip(weights, target, strict=True))


def reward_only_energy_distance(samples: np.ndarray, cfg: RunConfig, num: int = 2000) -> float | None:
    """Energy distance from ``samples`` to draws of ``R^β`` normalised (bump rewards; None otherwise)."""
    from fastnabla.tasks.gmm.metrics import energy_distance

    r = cfg.gmm.reward
    if r.kind != "bump":
        return None
    g = torch.Generator().manual_seed(cfg.seed + 11)
    center = torch.tensor(r.center, dtype=torch.float64)
    draws = center + (r.width / cfg.method.beta**0.5) * torch.randn(num, center.numel(), generator=g,
                                                                     dtype=torch.float64)
    return energy_distance(torch.from_numpy(samples[:num]).double(), draws)


def _mean_std(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summarize(results: dict[str, list[dict]], fraction: float) -> str:
    """Markdown table: one row per method (mean ± std over seeds) and the pretrained sampler."""
    first = next(iter(results.values()))[0]
    k = len(first["mode_weights_target"])
    rows = [
        f"| method | seeds | TV to target | mean log R (target {first['mean_log_reward_target']:.3f}) "
        f"| mode coverage (of {k}) | energy distance | energy distance to R^β alone | train s/run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, runs in results.items():
        cover = [mode_coverage(r["mode_weights"], r["mode_weights_target"], fraction) for r in runs]
        alone = [r["energy_distance_reward_only"] for r in runs if r.get("energy_distance_reward_only") is not None]
        rows.append(
            f"| {method} | {len(runs)} | {_mean_std([r['tv_to_target'] for r in runs])} "
            f"| {_mean_std([r['mean_log_reward'] for r in runs])} | {_mean_std([float(c) for c in cover], 1)} "
            f"| {_mean_std([r['energy_distance'] for r in runs])} | {_mean_std(alone) if alone else '—'} "
            f"| {statistics.mean(r['train_seconds'] for r in runs):.0f} |"
        )
    prior_cover = mode_coverage(first["mode_weights_prior"], first["mode_weights_target"], fraction)
    prior_alone = first.get("energy_distance_reward_only_prior")
    rows.append(
        f"| pretrained sampler | — | {first['tv_prior_to_target']:.3f} | {first['mean_log_reward_prior']:.3f} "
        f"| {prior_cover} | {first['energy_distance_prior']:.3f} "
        f"| {'—' if prior_alone is None else f'{prior_alone:.3f}'} | — |"
    )
    return "\n".join(rows) + "\n"


def _pretrained_and_target(cfg: RunConfig, num: int) -> tuple[torch.Tensor, torch.Tensor, object]:
    from fastnabla.tasks.gmm.build import build_gmm_task
    from fastnabla.tasks.gmm.evaluate import evaluate_sampler, target_reference

    task = build_gmm_task(cfg)
    prior = evaluate_sampler(task, num, cfg.seed + 1_000_003, use_reference=True)
    target, _ = target_reference(task, num, cfg.seed + 7)
    return prior.samples, target, task.target


def plot_samples(results: dict[str, list[dict]], out: Path, cfg: RunConfig, path: Path, max_points: int = 3000) -> None:
    """One panel per method (first seed's final samples) over the target density; pretrained and target first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prior, target, mixture = _pretrained_and_target(cfg, max_points)
    panels: list[tuple[str, np.ndarray]] = [("pretrained", prior.numpy()), ("target (exact draws)", target.numpy())]
    for method, runs in results.items():
        run_dir = out / "runs" / f"{method_preset(method)}-s{runs[0]['seed']}"
        panels.append((f"{method} (TV {runs[0]['tv_to_target']:.3f})", np.load(run_dir / "samples.npy")[:max_points]))
    lo = np.quantile(np.concatenate([p[:, :2] for _, p in panels]), 0.002, axis=0) - 0.5
    hi = np.quantile(np.concatenate([p[:, :2] for _, p in panels]), 0.998, axis=0) + 0.5
    gx, gy = np.linspace(lo[0], hi[0], 160), np.linspace(lo[1], hi[1], 160)
    xx, yy = np.meshgrid(gx, gy)
    grid = torch.from_numpy(np.stack([xx.ravel(), yy.ravel()], -1))
    means, stds = mixture.means[:, :2], mixture.stds[:, :2]
    marginal = type(mixture)(means, stds, mixture.weights)
    dens = marginal.log_prob(grid).exp().reshape(xx.shape).numpy()
    cols = 3
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.0 * rows), squeeze=False)
    for ax, (title, pts) in zip(axes.flat, panels, strict=False):
        ax.contourf(xx, yy, dens, levels=20, cmap="Greys", alpha=0.6)
        ax.scatter(pts[:, 0], pts[:, 1], s=1.5, alpha=0.3, color="C0" if "target" not in title else "C2")
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_aspect("equal", adjustable="box")
        ax.set_title(title, fontsize=9)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("final samples over the target density p#·R^β (grey)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fastnabla.compare.methods", description=__doc__.split("\n")[0]
    )
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="overrides applied to every run")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--coverage-fraction", type=float, default=0.5, help="mode coverage threshold (of target weight)")
    args = p.parse_intermixed_args(argv)
    try:
        for m in args.methods:
            build_config(RunConfig, get_preset(method_preset(m)), None, args.overrides)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    task_cfg = build_config(RunConfig, get_preset(method_preset(args.methods[0])), None,
                            [*args.overrides, f"seed={args.seeds[0]}"])
    prior_samples, _, _ = _pretrained_and_target(task_cfg, 2000)
    results: dict[str, list[dict]] = {}
    for m in args.methods:
        results[m] = []
        for seed in args.seeds:
            metrics = run_preset_seed(method_preset(m), seed, args.out, args.overrides)
            samples = np.load(args.out / "runs" / f"{method_preset(m)}-s{seed}" / "samples.npy")
            results[m].append({
                **metrics, "seed": seed,
                "energy_distance_reward_only": reward_only_energy_distance(samples, task_cfg),
                "energy_distance_reward_only_prior": reward_only_energy_distance(prior_samples.numpy(), task_cfg),
            })
    table = summarize(results, args.coverage_fraction)
    atomic_write(args.out / "results.md", lambda f: f.write(table.encode()))
    write_json(args.out / "summary.json", results)
    plot_curves(results, args.out / "tv_curves.png")
    plot_samples(results, args.out, task_cfg, args.out / "samples.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
