"""Tables and figures of the analytic comparison over cases: every metric at the end of training and averaged over
its last fifth, the reference samplers beside the methods, and the acceptance check against the oracle floor.

The reference rows are recomputed here for each case and seed (:func:`fastnabla.tasks.gmm.run.reference_evaluations`,
the same draws as a run's ``metrics.json``; a few seconds), so runs written before the shape metrics existed get them
too:

* **reweight-only**: the target's mode weights on the pretrained model's untilted components (TV 0 by
  construction; any TV it shows is the responsibility estimator seeing the wrong shapes);
* **pretrained**: the untuned sampler;
* **exact target**: exact target draws scored as a sampler: the sampling floor of each metric at the evaluation's
  sample sizes (for the energy distance, two independent exact sets of the sizes compared).
"""

from __future__ import annotations

import io
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastnabla.utils.io import atomic_write

# (metrics key, column title, digits)
COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("tv_to_target", "TV", 3),
    ("mean_error", "mean error (avg)", 2),
    ("mean_error_max", "mean error (max)", 2),
    ("std_ratio_mean", "std ratio (geo. mean)", 2),
    ("std_ratio_worst", "worst std factor", 2),
    ("energy_distance", "energy distance", 3),
    ("mean_log_reward", "mean log R", 3),
)
REFERENCES = ("reweight_only", "pretrained", "exact_target")
REFERENCE_NAMES = {"reweight_only": "reweight-only (target weights, prior components)",
                   "pretrained": "pretrained sampler", "exact_target": "exact target draws (sampling floor)"}
# acceptance: nabla-gfn may exceed its oracle floor by at most these (issue: +0.03 TV, +0.25 std mean error,
# +0.01 energy distance)
TOLERANCES = {"tv_to_target": 0.03, "mean_error": 0.25, "energy_distance": 0.01}


def mean_std(values: Sequence[float | None], digits: int = 3) -> str:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return "—"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return statistics.mean(vals) if vals else None


def end_value(run: dict[str, Any], key: str) -> float | None:
    return run.get(key)


def tail_value(run: dict[str, Any], key: str) -> float | None:
    """The metric averaged over the evaluations of the last fifth of training (None for runs without it)."""
    tail = run.get("last_fifth", {}).get(key)
    return None if tail is None else tail["mean"]


def case_table(runs: dict[str, list[dict]], refs: dict[str, list[dict]], target_log_r: float, *, tail: bool) -> str:
    """One row per method (mean ± std over seeds) and, for the end-of-training table, one per reference sampler."""
    pick = tail_value if tail else end_value
    head = [title if key != "mean_log_reward" else f"{title} (target {target_log_r:.3f})" for key, title, _ in COLUMNS]
    rows = ["| sampler | seeds | " + " | ".join(head) + (" |" if tail else " | train s/run |"),
            "|---|---|" + "---|" * len(COLUMNS) + ("" if tail else "---|")]
    for method, seeds in runs.items():
        cells = [mean_std([pick(r, key) for r in seeds], digits) for key, _, digits in COLUMNS]
        secs = "" if tail else f" {statistics.mean(r['train_seconds'] for r in seeds):.0f} |"
        rows.append(f"| {method} | {len(seeds)} | " + " | ".join(cells) + " |" + secs)
    if not tail:
        for name in REFERENCES:
            cells = [mean_std([r[key] for r in refs[name]], digits) for key, _, digits in COLUMNS]
            rows.append(f"| {REFERENCE_NAMES[name]} | {len(refs[name])} | " + " | ".join(cells) + " | — |")
    return "\n".join(rows) + "\n"


def acceptance(runs: dict[str, list[dict]], refs: dict[str, list[dict]]) -> list[dict[str, Any]]:
    """nabla-gfn minus its oracle floor (means over seeds, at the end and over the last fifth) for each toleranced
    metric, and whether it is within tolerance; the reweight-only reference's excess over the same floor."""
    if "nabla-gfn" not in runs or "oracle" not in runs:
        return []
    out = []
    for key, tol in TOLERANCES.items():
        for when, pick in (("end", end_value), ("last fifth", tail_value)):
            ours = _mean([pick(r, key) for r in runs["nabla-gfn"]])
            floor = _mean([pick(r, key) for r in runs["oracle"]])
            if ours is None or floor is None:
                continue
            rw = _mean([r[key] for r in refs["reweight_only"]]) if key != "tv_to_target" else 0.0
            out.append({"metric": key, "when": when, "nabla_gfn": ours, "oracle": floor, "excess": ours - floor,
                        "tolerance": tol, "within": ours - floor <= tol, "reweight_only_excess": rw - floor})
    return out


def acceptance_table(case: str, checks: list[dict[str, Any]]) -> str:
    rows = []
    for c in checks:
        rw = "" if c["metric"] == "tv_to_target" else f"{c['reweight_only_excess']:+.3f}"
        rows.append(f"| {case} | {c['metric']} | {c['when']} | {c['nabla_gfn']:.4f} | {c['oracle']:.4f} | "
                    f"{c['excess']:+.4f} | +{c['tolerance']} | {'yes' if c['within'] else '**no**'} | {rw} |")
    return "\n".join(rows)


ACCEPTANCE_HEADER = ("| case | metric | when | nabla-gfn | oracle floor | excess | tolerance | within | reweight-only "
                     "excess |\n|---|---|---|---|---|---|---|---|---|")


def plot_case_curves(case: str, runs: dict[str, list[dict]], refs: dict[str, list[dict]], path: Path) -> None:
    """TV, mean error and energy distance against iterations, every seed of every method; the reweight-only and
    exact-target (floor) values as horizontal lines (first seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("tv_to_target", "mode-weight TV"), ("mean_error", "mode mean error (target stds)"),
              ("energy_distance", "energy distance"))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for i, (method, seeds) in enumerate(runs.items()):
            for j, r in enumerate(seeds):
                curve = [(p["iteration"], p[key]) for p in r.get("eval_curve", []) if p.get(key) is not None]
                if not curve:
                    continue
                its, vals = zip(*curve, strict=True)
                ax.plot(its, vals, color=f"C{i}", alpha=0.75, lw=1.1, label=method if j == 0 else None)
        for name, style in (("reweight_only", "--"), ("exact_target", ":")):
            ax.axhline(refs[name][0][key], color="0.3", ls=style, lw=1, label=REFERENCE_NAMES[name].split(" (")[0])
        first = next(iter(runs.values()))[0]
        ax.axvline(first["iterations"] * 0.8, color="0.8", lw=0.8)
        ax.set_xlabel("iteration")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{case}: every seed; grey vertical line: start of the last fifth")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def references_table(cases: Sequence[str], seeds: Sequence[int]) -> str:
    """The reference samplers of every case (no training): exact prior → target TV, then the reweight-only,
    pretrained and exact-target rows, mean ± std over ``seeds``."""
    from fastnabla.compare.methods import _case_config, reference_scalars

    rows = ["| case | prior → target TV (exact) | sampler | " + " | ".join(t for _, t, _ in COLUMNS)
            + " | target mean log R (exact) |", "|---|---|---|" + "---|" * (len(COLUMNS) + 1)]
    for case in cases:
        from fastnabla.tasks.gmm.build import build_gmm_task
        from fastnabla.tasks.gmm.metrics import total_variation

        cfg = _case_config(case, "nabla-gfn", (), seeds[0])
        task = build_gmm_task(cfg)
        tv = total_variation(task.prior.weights, task.target.weights)
        target_log_r = task.reward.expected_log_reward(task.target)
        per_seed = [reference_scalars(_case_config(case, "nabla-gfn", (), s)) for s in seeds]
        for name in REFERENCES:
            cells = [mean_std([r[name][key] for r in per_seed], digits) for key, _, digits in COLUMNS]
            rows.append(f"| {case} | {tv:.3f} | {REFERENCE_NAMES[name]} | " + " | ".join(cells)
                        + f" | {target_log_r:.3f} |")
    return "\n".join(rows) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fastnabla.compare.shape --cases ... --seeds ...``: the reference samplers' table."""
    import argparse

    from fastnabla.run.presets import ANALYTIC_CASES

    p = argparse.ArgumentParser(prog="python -m fastnabla.compare.shape",
                                description="the reference samplers (reweight-only, pretrained, exact target draws) "
                                            "of analytic cases, scored as a run scores its sampler")
    p.add_argument("--cases", nargs="+", choices=list(ANALYTIC_CASES), default=list(ANALYTIC_CASES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = p.parse_args(argv)
    text = references_table(args.cases, args.seeds)
    if args.out:
        atomic_write(args.out, lambda f: f.write(text.encode()))
    print(text)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
