"""Side-by-side runs of presets over seeds: a markdown table and a TV-curve figure.

    python -m fastnabla.compare.presets --presets gmm-default gmm-paper gmm-oracle --seeds 0 1 2 \\
        --out docs/analytic [key.path=value ...]

Each (preset, seed) runs :func:`~fastnabla.run.driver.run_training` into ``OUT/runs/PRESET-sSEED``
(finished runs are reused and unfinished ones resumed, so an interrupted comparison continues); the summary goes to
``OUT/results.md``, ``OUT/summary.json`` (every run's final metrics and TV curve) and
``OUT/tv_curves.png`` (TV against iterations and against training wall-clock).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from fastnabla.config.loader import ConfigError, build_config
from fastnabla.run.config import RunConfig
from fastnabla.run.presets import get_preset
from fastnabla.utils.io import FINISHED_MARKER, atomic_write, write_json


def _elapsed_at(run_dir: Path, iterations: Sequence[int]) -> list[float]:
    """Training wall-clock (s) at the given iterations, from the run's ``metrics.jsonl``."""
    elapsed = {0: 0.0}
    with (run_dir / "metrics.jsonl").open() as f:
        for line in f:
            rec = json.loads(line)
            elapsed[int(rec["iteration"])] = float(rec["elapsed_s"])
    return [elapsed[i] for i in iterations]


def run_preset_seed(preset: str, seed: int, out: Path, overrides: Sequence[str], config: dict | None = None) -> dict:
    """Metrics of ``preset`` at ``seed`` (run in ``OUT/runs/PRESET-sSEED``, or read back when finished). A run that
    diverged and stopped returns its ``metrics.json`` as written (``diverged``, ``stopped_because``, no evaluation).

    ``config``: the partial config to run under the name ``preset`` (default: the registered preset's)."""
    run_dir = out / "runs" / f"{preset}-s{seed}"
    done = run_dir / FINISHED_MARKER
    if done.exists():
        metrics = json.loads(done.read_text())
    else:
        from fastnabla.run.driver import run_training

        resume = (run_dir / "checkpoints" / "latest").is_file()
        settings = [*overrides, f"seed={seed}", "output.progress=false", f"name={preset}-s{seed}",
                    f"output.dir={run_dir}", "output.overwrite=true"]
        cfg = build_config(RunConfig, get_preset(preset) if config is None else config, None, settings)
        print(f"{'resuming' if resume else 'running'} {preset} seed {seed} -> {run_dir}", flush=True)
        outcome = run_training(cfg, resume_dir=run_dir if resume else None, verbose=False)
        if outcome.metrics is None:
            raise RuntimeError(f"{run_dir}: the run stopped before finishing (exit status {outcome.exit_code})")
        metrics = outcome.metrics
    if "tv_curve" in metrics and "tv_curve_seconds" not in metrics:  # runs written before metrics.json carried it
        metrics["tv_curve_seconds"] = _elapsed_at(run_dir, [it for it, _ in metrics["tv_curve"]])
    return metrics


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def summarize(results: dict[str, list[dict]]) -> str:
    """Markdown table: one row per preset, mean ± std over seeds."""
    rows = [
        "| preset | seeds | TV to target | TV pretrained | mean log R (target) | energy distance | train s/run |",
        "|---|---|---|---|---|---|---|",
    ]
    for preset, runs in results.items():
        rows.append(
            "| {} | {} | {} | {:.3f} | {} ({:.3f}) | {} | {:.0f} |".format(
                preset,
                len(runs),
                _mean_std([r["tv_to_target"] for r in runs]),
                runs[0]["tv_prior_to_target"],
                _mean_std([r["mean_log_reward"] for r in runs]),
                runs[0]["mean_log_reward_target"],
                _mean_std([r["energy_distance"] for r in runs]),
                statistics.mean(r["train_seconds"] for r in runs),
            )
        )
    return "\n".join(rows) + "\n"


def plot_curves(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    first = next(iter(results.values()))[0]
    for ax, xkey, xlabel in ((axes[0], "iterations", "iteration"), (axes[1], "seconds", "training wall-clock (s)")):
        for preset, runs in results.items():
            for i, r in enumerate(runs):
                its, tvs = zip(*r["tv_curve"], strict=True)
                xs = its if xkey == "iterations" else r["tv_curve_seconds"]
                ax.plot(xs, tvs, color=f"C{list(results).index(preset)}", alpha=0.8, lw=1.2,
                        label=preset if i == 0 else None)
        ax.axhline(first["tv_prior_to_target"], color="0.5", ls="--", label="pretrained")
        ax.set_xlabel(xlabel)
        ax.set_ylim(bottom=0)
    axes[0].set_ylabel("mode-weight TV to target")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastnabla.compare.presets", description=__doc__.split("\n")[0])
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="overrides applied to every run")
    p.add_argument("--presets", nargs="+", required=True)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_intermixed_args(argv)
    try:
        for preset in args.presets:
            build_config(RunConfig, get_preset(preset), None, args.overrides)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    results = {pr: [run_preset_seed(pr, s, args.out, args.overrides) for s in args.seeds] for pr in args.presets}
    stopped = [f"{pr} seed {s}" for pr, runs in results.items() for s, r in zip(args.seeds, runs, strict=True)
               if "tv_to_target" not in r]
    results = {pr: [r for r in runs if "tv_to_target" in r] for pr, runs in results.items()}
    results = {pr: runs for pr, runs in results.items() if runs}
    if stopped:
        print(f"diverged and stopped (left out): {', '.join(stopped)}", file=sys.stderr)
    if not results:
        return 3
    table = summarize(results)
    atomic_write(args.out / "results.md", lambda f: f.write(table.encode()))
    write_json(args.out / "summary.json", results)
    plot_curves(results, args.out / "tv_curves.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
