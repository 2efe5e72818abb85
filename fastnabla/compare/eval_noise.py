"""Evaluation noise against training swings: is a wobbly metric curve the estimator or the sampler?

    python -m fastnabla.compare.eval_noise RUN_DIR [RUN_DIR ...] [--repeats 10] [--out FILE.md]

For each finished analytic run (its ``config.yaml``, final checkpoint and ``metrics.json``):

* **estimator noise at the periodic evaluation's size** (``eval.num_samples`` samples, the energy distance against
  ``eval.energy_samples`` target draws): the std of each metric over ``--repeats`` evaluations of the *trained*
  sampler with different evaluation noise, and the same for exact target draws (the floor);
* **training swings**: the std of the run's own curve over the last fifth of training, and the range (min–max) of its
  TV from iteration 100 on.

A curve whose spread is many times the estimator noise moves because the sampler moves.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fastnabla.config.loader import build_config, load_yaml
from fastnabla.run.config import RunConfig
from fastnabla.utils.io import CONFIG_FILE, FINISHED_MARKER, atomic_write

METRICS = (("tv_to_target", "TV", 3), ("mean_error", "mean error", 3), ("energy_distance", "energy", 4))


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def measure(run_dir: Path, repeats: int) -> dict[str, Any]:
    """Estimator noise of the trained sampler and of exact target draws, and the run's swings (module docstring)."""
    import json

    from fastnabla.tasks.gmm.build import build_gmm_task
    from fastnabla.tasks.gmm.evaluate import evaluate_mixture, evaluate_sampler, target_reference
    from fastnabla.tasks.gmm.run import TARGET_SEED_OFFSET
    from fastnabla.training.checkpoint import CheckpointManager, load_state_file
    from fastnabla.training.trainer import load_trainable_state

    raw = load_yaml(run_dir / CONFIG_FILE)
    cfg = build_config(RunConfig, raw)
    metrics = json.loads((run_dir / FINISHED_MARKER).read_text())
    task = build_gmm_task(cfg)
    latest = CheckpointManager(run_dir / "checkpoints").latest()
    if latest is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint to evaluate")
    load_trainable_state(task, load_state_file(latest / "rank0.pt")["task"])
    ev = cfg.eval
    target_samples, _ = target_reference(task, ev.energy_samples, cfg.seed + TARGET_SEED_OFFSET)
    trained = [evaluate_sampler(task, ev.num_samples, 5_000_000 + r, target_samples=target_samples).scalars()
               for r in range(repeats)]
    exact = [evaluate_mixture(task, task.target, ev.num_samples, 6_000_000 + r, target_samples).scalars()
             for r in range(repeats)]
    tail = metrics.get("last_fifth", {})
    tvs = [p["tv_to_target"] for p in metrics.get("eval_curve", []) if p["iteration"] >= 100]
    return {
        "run": str(run_dir),
        "num_samples": ev.num_samples,
        "noise_trained": {m: _std([e[m] for e in trained]) for m, _, _ in METRICS},
        "mean_trained": {m: statistics.mean(e[m] for e in trained) for m, _, _ in METRICS},
        "noise_exact": {m: _std([e[m] for e in exact]) for m, _, _ in METRICS},
        "mean_exact": {m: statistics.mean(e[m] for e in exact) for m, _, _ in METRICS},
        "last_fifth_std": {m: tail[m]["std"] for m, _, _ in METRICS if m in tail},
        "last_fifth": tail,
        "end": {m: metrics[m] for m, _, _ in METRICS},
        "tv_range_from_100": (min(tvs), max(tvs)) if tvs else None,
    }


def table(results: list[dict[str, Any]]) -> str:
    """One row per run: TV at the end, over the last fifth (mean ± std) and its range from iteration 100; for each
    metric the std over the last fifth beside the estimator's std (trained sampler / exact target draws)."""
    head = ["run", "TV end", "TV last fifth", "TV range from it. 100"]
    for _, title, _ in METRICS:
        head += [f"{title}: std over the last fifth", f"{title}: estimator std (trained / exact)"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        rng = r["tv_range_from_100"]
        tail = r["last_fifth"].get("tv_to_target")
        cells = [Path(r["run"]).parent.parent.name + "/" + Path(r["run"]).name, f"{r['end']['tv_to_target']:.3f}",
                 "—" if tail is None else f"{tail['mean']:.3f} ± {tail['std']:.3f}",
                 "—" if rng is None else f"{rng[0]:.3f}–{rng[1]:.3f}"]
        for m, _, d in METRICS:
            cells.append(f"{r['last_fifth_std'][m]:.{d}f}" if m in r["last_fifth_std"] else "—")
            cells.append(f"{r['noise_trained'][m]:.{d}f} / {r['noise_exact'][m]:.{d}f}")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastnabla.compare.eval_noise", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="finished analytic run directories")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = p.parse_args(argv)
    bad = [r for r in args.runs if not (r / FINISHED_MARKER).is_file() or not (r / CONFIG_FILE).is_file()]
    if bad or args.repeats < 2:
        print(f"error: {'not finished runs: ' + ', '.join(map(str, bad)) if bad else '--repeats must be >= 2'}",
              file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    text = table([measure(r, args.repeats) for r in args.runs])
    if args.out:
        atomic_write(args.out, lambda f: f.write(text.encode()))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
