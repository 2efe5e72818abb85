"""Every training method on the analytic benchmark, over seeds and cases: markdown tables and figures.

    python -m fastnabla.compare.methods --seeds 0 1 2 --out docs/analytic/methods [key.path=value ...]
    python -m fastnabla.compare.methods --cases shift-narrow beta3 loglinear-shift 8d --methods nabla-gfn oracle \\
        --seeds 0 1 2 --out docs/analytic/shape

Each method runs its preset on each case (:func:`fastnabla.run.presets.analytic_preset`: ``nabla-gfn`` the case's
tuned preset, ``oracle`` its oracle-flow floor, a baseline ``NAME`` the paper's section 4.3 settings of ``gmm-NAME``
on the case's task) with the same sampler, batch and number of iterations, through
:func:`fastnabla.compare.presets.run_preset_seed` (runs in ``CASE_DIR/runs/PRESET-sSEED``; finished runs are reused,
so an interrupted comparison resumes). ``CASE_DIR`` is ``OUT`` without ``--cases`` (the default case only) and
``OUT/CASE`` with it. ``--baseline-seeds`` and ``--baseline-cases`` run the baselines (every method but ``nabla-gfn``
and ``oracle``) on fewer seeds and cases. Outputs per case:

* ``results.md``: per method and reference sampler (:mod:`fastnabla.compare.shape`: reweight-only, pretrained,
  exact target draws = the sampling floor), mean ± std over seeds of the mode-weight TV, the per-mode mean error
  and std ratio, the energy distance and the mean log-reward at the end of training; the same metrics averaged
  over the last fifth of training; the mode coverage and the energy distance to ``R^β`` alone;
* ``samples.png``: each method's final samples (first seed, first two dimensions) over the target density, next to
  the pretrained sampler and exact target draws; ``curves.png``: TV, mean error and energy distance against
  iterations (every seed) with the reference levels; ``tv_curves.png`` (TV against iterations and wall-clock);
* ``summary.json``: every run's metrics, the reference samplers' and the acceptance check.

With ``--cases``, ``OUT/results.md`` collects every case's tables and the acceptance check (nabla-gfn against its
oracle floor: +0.03 TV, +0.25 mean error, +0.01 energy distance; needs ``nabla-gfn`` and ``oracle``).

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
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastnabla.compare.presets import plot_curves, run_preset_seed
from fastnabla.compare.shape import (
    ACCEPTANCE_HEADER,
    REFERENCE_NAMES,
    acceptance,
    acceptance_table,
    case_table,
    mean_std,
    plot_case_curves,
)
from fastnabla.config.loader import ConfigError, build_config
from fastnabla.methods.config import METHODS
from fastnabla.run.config import RunConfig
from fastnabla.run.presets import ANALYTIC_CASES, analytic_preset
from fastnabla.utils.io import atomic_write, write_json

COMPARED = (*METHODS, "oracle")  # "oracle": nabla-gfn with the exact flow, the floor diagnostic


def method_preset(method: str, case: str = "default") -> str:
    """The preset (run name) a method runs in the comparison."""
    return analytic_preset(case, method)[0]


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


def summarize(results: dict[str, list[dict]], fraction: float) -> str:
    """Markdown table: one row per method (mean ± std over seeds) and the pretrained sampler; mode coverage and the
    energy distance to ``R^β`` alone."""
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
            f"| {method} | {len(runs)} | {mean_std([r['tv_to_target'] for r in runs])} "
            f"| {mean_std([r['mean_log_reward'] for r in runs])} | {mean_std([float(c) for c in cover], 1)} "
            f"| {mean_std([r['energy_distance'] for r in runs])} | {mean_std(alone) if alone else '—'} "
            f"| {sum(r['train_seconds'] for r in runs) / len(runs):.0f} |"
        )
    prior_cover = mode_coverage(first["mode_weights_prior"], first["mode_weights_target"], fraction)
    prior_alone = first.get("energy_distance_reward_only_prior")
    rows.append(
        f"| pretrained sampler | — | {first['tv_prior_to_target']:.3f} | {first['mean_log_reward_prior']:.3f} "
        f"| {prior_cover} | {first['energy_distance_prior']:.3f} "
        f"| {'—' if prior_alone is None else f'{prior_alone:.3f}'} | — |"
    )
    return "\n".join(rows) + "\n"


def _case_config(case: str, method: str, overrides: Sequence[str], seed: int) -> RunConfig:
    return build_config(RunConfig, analytic_preset(case, method)[1], None, [*overrides, f"seed={seed}"])


def reference_scalars(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """The reference samplers of a run of ``cfg`` (reweight-only, pretrained, exact target), scored as in the run."""
    from fastnabla.tasks.gmm.build import build_gmm_task
    from fastnabla.tasks.gmm.evaluate import target_reference
    from fastnabla.tasks.gmm.run import TARGET_SEED_OFFSET, reference_evaluations

    task = build_gmm_task(cfg)
    target_samples, _ = target_reference(task, cfg.eval.energy_samples, cfg.seed + TARGET_SEED_OFFSET)
    refs = reference_evaluations(task, cfg.eval.final_num_samples, cfg.seed, target_samples)
    return {name: {**ev.scalars(), "mode_weights": ev.mode_weights.tolist(), "seed": cfg.seed}
            for name, ev in refs.items()}


def _pretrained_and_target(cfg: RunConfig, num: int) -> tuple[torch.Tensor, torch.Tensor, object]:
    from fastnabla.tasks.gmm.build import build_gmm_task
    from fastnabla.tasks.gmm.evaluate import evaluate_sampler, target_reference

    task = build_gmm_task(cfg)
    prior = evaluate_sampler(task, num, cfg.seed + 1_000_003, use_pretrained=True)
    target, _ = target_reference(task, num, cfg.seed + 7)
    return prior.samples, target, task.target


def plot_samples(results: dict[str, list[dict]], run_dirs: dict[str, Path], cfg: RunConfig, path: Path,
                 max_points: int = 3000) -> None:
    """One panel per method (first seed's final samples) over the target density; pretrained and target first.
    ``run_dirs``: each method's first-seed run directory. Dimensions beyond the first two are marginalised."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prior, target, mixture = _pretrained_and_target(cfg, max_points)
    panels: list[tuple[str, np.ndarray]] = [("pretrained", prior.numpy()), ("target (exact draws)", target.numpy())]
    for method, runs in results.items():
        panels.append((f"{method} (TV {runs[0]['tv_to_target']:.3f})",
                       np.load(run_dirs[method] / "samples.npy")[:max_points]))
    if panels[0][1].shape[1] == 1:  # 1-D: nothing to draw as a plane
        return
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
    dims = "" if mixture.dim == 2 else f" (first 2 of {mixture.dim} dimensions)"
    fig.suptitle(f"final samples over the target density p#·R^β (grey){dims}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def case_report(case: str, results: dict[str, list[dict]], refs: dict[str, list[dict]], fraction: float) -> str:
    """The case's markdown: end-of-training table with the reference samplers, last-fifth table, coverage table."""
    first = next(iter(results.values()))[0]
    target_log_r = first.get("mean_log_reward_target_exact", first["mean_log_reward_target"])
    parts = [
        f"**{case}** ({ANALYTIC_CASES[case][0]}); exact prior → target mode-weight TV "
        f"{first['tv_prior_weights_to_target_exact']:.3f}\n",
        "End of training (mean ± std over seeds):\n",
        case_table(results, refs, target_log_r, tail=False),
    ]
    if any("last_fifth" in r for runs in results.values() for r in runs):
        parts += ["Averaged over the last fifth of training (each run's mean over its evaluations at iteration ≥ "
                  "0.8 × iterations; mean ± std over seeds):\n", case_table(results, refs, target_log_r, tail=True)]
    parts += ["Mode coverage and the energy distance to R^β alone:\n", summarize(results, fraction)]
    return "\n".join(parts)


def run_case(case: str, methods: Sequence[str], seeds: Sequence[int], baseline_seeds: Sequence[int], case_dir: Path,
             overrides: Sequence[str], fraction: float) -> dict[str, Any]:
    """Run (or read back) every method of ``case`` and write its outputs into ``case_dir``."""
    case_dir.mkdir(parents=True, exist_ok=True)
    task_cfg = _case_config(case, methods[0], overrides, seeds[0])
    prior_samples, _, _ = _pretrained_and_target(task_cfg, 2000)
    results: dict[str, list[dict]] = {}
    run_dirs: dict[str, Path] = {}
    stopped: list[dict[str, Any]] = []
    for m in methods:
        name, config = analytic_preset(case, m)
        results[m] = []
        for seed in (seeds if m in ("nabla-gfn", "oracle") else baseline_seeds):
            metrics = run_preset_seed(name, seed, case_dir, overrides, config)
            run_dir = case_dir / "runs" / f"{name}-s{seed}"
            if "tv_to_target" not in metrics:  # diverged and stopped: no final evaluation, no samples
                stopped.append({"method": m, "seed": seed, "iteration": metrics.get("stopped_at_iteration"),
                                "why": metrics.get("stopped_because", "diverged")})
                continue
            run_dirs.setdefault(m, run_dir)
            samples = np.load(run_dir / "samples.npy")
            results[m].append({
                **metrics, "seed": seed,
                "energy_distance_reward_only": reward_only_energy_distance(samples, task_cfg),
                "energy_distance_reward_only_prior": reward_only_energy_distance(prior_samples.numpy(), task_cfg),
            })
    results = {m: runs for m, runs in results.items() if runs}
    if not results:
        raise RuntimeError(f"{case}: every run diverged: {stopped}")
    per_seed = [reference_scalars(_case_config(case, methods[0], overrides, s)) for s in seeds]
    refs = {name: [r[name] for r in per_seed] for name in REFERENCE_NAMES}
    checks = acceptance(results, refs)
    report = case_report(case, results, refs, fraction)
    if stopped:
        report += "\nDiverged and stopped (left out of the tables): " + "; ".join(
            f"{s['method']} seed {s['seed']} at iteration {s['iteration']} ({s['why']})" for s in stopped) + "\n"
    atomic_write(case_dir / "results.md", lambda f: f.write(report.encode()))
    write_json(case_dir / "summary.json", {"case": case, "runs": results, "references": refs, "acceptance": checks,
                                           "diverged": stopped})
    plot_curves(results, case_dir / "tv_curves.png")
    plot_case_curves(case, results, refs, case_dir / "curves.png")
    plot_samples(results, run_dirs, task_cfg, case_dir / "samples.png")
    return {"report": report, "acceptance": checks}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fastnabla.compare.methods", description=__doc__.split("\n")[0]
    )
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="overrides applied to every run")
    p.add_argument("--cases", nargs="+", choices=list(ANALYTIC_CASES), default=None,
                   help="analytic cases, each into OUT/CASE (default: the default case, into OUT)")
    p.add_argument("--methods", nargs="+", default=None, choices=COMPARED,
                   help="methods; 'oracle' is nabla-gfn's oracle-flow floor (default: every method without --cases, "
                        "nabla-gfn and oracle with it)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--baseline-seeds", nargs="+", type=int, default=None,
                   help="seeds of the methods other than nabla-gfn and oracle (default: --seeds)")
    p.add_argument("--baseline-cases", nargs="+", choices=list(ANALYTIC_CASES), default=None,
                   help="cases the methods other than nabla-gfn and oracle run on (default: every case)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--coverage-fraction", type=float, default=0.5, help="mode coverage threshold (of target weight)")
    args = p.parse_intermixed_args(argv)
    cases = args.cases or ["default"]
    methods = args.methods or (list(METHODS) if args.cases is None else ["nabla-gfn", "oracle"])
    try:
        for case in cases:
            for m in methods:
                build_config(RunConfig, analytic_preset(case, m)[1], None, args.overrides)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    reports, checks = [], []
    for case in cases:
        case_dir = args.out if args.cases is None else args.out / case
        ours = [m for m in methods if m in ("nabla-gfn", "oracle")]
        here = methods if args.baseline_cases is None or case in args.baseline_cases else ours
        if not here:
            continue
        done = run_case(case, here, args.seeds, args.baseline_seeds or args.seeds, case_dir, args.overrides,
                        args.coverage_fraction)
        reports.append(done["report"])
        if done["acceptance"]:
            checks.append(acceptance_table(case, done["acceptance"]))
    if args.cases is not None:
        text = "\n\n".join(reports)
        if checks:
            text += ("\n\nAcceptance: nabla-gfn minus its oracle floor (means over seeds); the reweight-only sampler's "
                     "excess over the same floor for comparison:\n\n" + ACCEPTANCE_HEADER + "\n" + "\n".join(checks)
                     + "\n")
        atomic_write(args.out / "results.md", lambda f: f.write(text.encode()))
        print(text)
    else:
        print(reports[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
