"""The cost levers of docs/cost.md on the digits yardstick: one row per configuration with its digits quality (the
end-of-run evaluation), its training wall time relative to the unaccelerated run measured side by side, and the FLOP
tool's sd15 ratio for the same overrides (``python -m fastnabla.flops --preset sd15-aesthetic --json OVERRIDES``),
then a quality-versus-FLOPs figure.

    python -m fastnabla.tasks.digits.cost_study --runs RUNS --out docs/cost [--seeds 0]

``RUNS/<name>/seed-S`` are ``python -m fastnabla.train --preset digits DIGITS_BASE OVERRIDES`` runs, one per
:data:`LEVERS` row (``digits`` itself is the unaccelerated configuration; :data:`DIGITS_BASE` the adapter the study
was measured with). ``RUNS/<name>@<iterations>/seed-S``, the same with
``train.iterations=<iterations>`` for the :data:`CURVES` rows, give quality against the run's sd15 compute (a second
table and figure: what "better quality per FLOP" means, at equal compute instead of equal iterations). A row's sd15
overrides differ from its digits ones where the layouts differ (the trajectories per iteration) and start from
:data:`SD15_BASE`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from fastnabla.tasks.digits.compare import mean_std

# the sd15 layout every row starts from: the sd15 presets before this study adopted anything (exact decoder, 64
# trajectories x 6 trained transitions, each trained once, the live flow, a constant rate), so a row's FLOPs do not
# move when a preset does
SD15_BASE = ["method.fl_decoder=exact", "train.batch_size=64", "train.transition_fraction=0.1",
             "train.replay_batches=1", "method.forward_trains_flow=true", "method.flow_ema_decay=0",
             "optim.lr_schedule=constant"]
# the digits layout every row starts from: the adapter, sampler and flow the study was measured with, the digits
# preset's before it took the wider adapter (docs/digits.md, "Where the adapter sits") and 50 steps with the averaged
# flow ("How the number of sampling steps moves the tilt"), so the rows stay reproducible
DIGITS_BASE = ["sd.lora.target_modules=[to_q,to_k,to_v,to_out.0]", "sd.num_steps=20", "method.flow_ema_decay=0"]
SURROGATE = ["method.fl_decoder=surrogate", "sd.fl_surrogate_decoder=digits"]
SD15_SURROGATE = ["method.fl_decoder=surrogate", "sd.fl_surrogate_decoder=madebyollin/taesd"]
# equal trained transitions per iteration from 4x fewer sampled trajectories: digits 16 x 5 -> 8 x 10 (k = 9 chunks +
# the terminal transition), sd15 64 x 6 -> 16 x 24 (k = 23 + 1)
TRAJ8 = ["train.batch_size=8", "train.transition_fraction=0.45"]
SD15_TRAJ16 = ["train.batch_size=16", "train.transition_fraction=0.46"]
# a third of the sampled trajectories, each trained in 3 consecutive passes: digits 6 x 3 replayed batches (18
# trajectories x 5 transitions per pass, as 16 x 5), sd15 22 x 3 (66 x 6, as 64 x 6)
REPLAY3 = ["train.batch_size=6", "train.replay_batches=3"]
SD15_REPLAY3 = ["train.batch_size=22", "train.replay_batches=3"]
# half the sampled trajectories: digits 8 x 13 transitions / 8 x 2 passes x 7, sd15 32 x 16 / 32 x 2 x 8
HALF = ["train.batch_size=8", "train.transition_fraction=0.6"]
SD15_HALF = ["train.batch_size=32", "train.transition_fraction=0.3"]
HALF_REPLAY2 = ["train.batch_size=8", "train.replay_batches=2", "train.transition_fraction=0.3"]
SD15_HALF_REPLAY2 = ["train.batch_size=32", "train.replay_batches=2", "train.transition_fraction=0.14"]
# the Polyak-averaged flow (method.flow_ema_decay, the analytic presets' default since a later stop): the levers again
# with it, against the unaccelerated configuration with it; on sd15 it needs the flow trained by its own target only
AVERAGED = ["method.flow_ema_decay=0.95"]
SD15_AVERAGED = ["method.forward_trains_flow=false", "method.flow_ema_decay=0.95"]

# name -> (overrides of the digits preset, of sd15-aesthetic (after SD15_BASE), description)
LEVERS: dict[str, tuple[list[str], list[str], str]] = {
    "digits": ([], [], "unaccelerated (forward-looking term at every state, 16 trajectories x 5 transitions)"),
    "cost-terminal": (["method.forward_looking=terminal"], ["method.forward_looking=terminal"],
                      "forward-looking term only at the terminal state"),
    "cost-tf05": (["train.transition_fraction=0.5"], ["train.transition_fraction=0.5"],
                  "10 of 20 transitions per sampled trajectory (same trajectories: more transitions per iteration)"),
    "cost-both": (["method.forward_looking=terminal", "train.transition_fraction=0.5"],
                  ["method.forward_looking=terminal", "train.transition_fraction=0.5"], "the two rows above"),
    "cost-surrogate": (SURROGATE, SD15_SURROGATE,
                       "forward-looking term through a surrogate decoder at non-terminal states (digits: distilled, "
                       "sd15: TAESD), the exact decoder at x_T"),
    "cost-traj8x10": (TRAJ8, SD15_TRAJ16, "4x fewer sampled trajectories, 4x more transitions each (digits 8 x 10, "
                                          "sd15 16 x 24): equal trained transitions per iteration"),
    "cost-surrogate-traj8x10": ([*SURROGATE, *TRAJ8], [*SD15_SURROGATE, *SD15_TRAJ16],
                                "both rows above: sd15-fast-aesthetic's settings"),
    "cost-surrogate-traj8x13": ([*SURROGATE, *HALF], [*SD15_SURROGATE, *SD15_HALF],
                                "half the sampled trajectories, more transitions each (digits 8 x 13, sd15 32 x 16), "
                                "with the surrogate"),
    "cost-replay3": (REPLAY3, SD15_REPLAY3, "replayed batches: a third of the sampled trajectories, each trained in 3 "
                                            "consecutive passes on fresh subsamples (digits 6 x 3, sd15 22 x 3)"),
    "cost-surrogate-replay3": ([*SURROGATE, *REPLAY3], [*SD15_SURROGATE, *SD15_REPLAY3],
                               "replayed batches with the surrogate"),
    "cost-surrogate-replay2": ([*SURROGATE, *HALF_REPLAY2], [*SD15_SURROGATE, *SD15_HALF_REPLAY2],
                               "half the sampled trajectories, each trained in 2 passes (digits 8 x 2 x 7, sd15 32 x 2 "
                               "x 8), with the surrogate"),
    "cost-replay3-kept": ([*REPLAY3, "train.replay_subsample=kept"],
                          [*SD15_REPLAY3, "train.replay_subsample=kept", "method.fl_model=pretrained"],
                          "replayed batches with kept subsamples: the frozen network's constants once per batch (x_hat "
                          "from the pretrained model, as in every digits run)"),
    "cost-averaged": (AVERAGED, SD15_AVERAGED,
                      "unaccelerated with the Polyak-averaged flow (method.flow_ema_decay=0.95)"),
    "cost-averaged-replay3": ([*AVERAGED, *REPLAY3], [*SD15_AVERAGED, *SD15_REPLAY3],
                              "replayed batches with the averaged flow"),
    "cost-averaged-surrogate-replay3": ([*AVERAGED, *SURROGATE, *REPLAY3],
                                        [*SD15_AVERAGED, *SD15_SURROGATE, *SD15_REPLAY3],
                                        "replayed batches and the surrogate, with the averaged flow"),
    "cost-averaged-surrogate-traj8x10": ([*AVERAGED, *SURROGATE, *TRAJ8],
                                         [*SD15_AVERAGED, *SD15_SURROGATE, *SD15_TRAJ16],
                                         "sd15-fast-aesthetic's settings with the averaged flow"),
    "cost-averaged-replay3-kept": ([*AVERAGED, *REPLAY3, "train.replay_subsample=kept"],
                                   [*SD15_AVERAGED, *SD15_REPLAY3, "train.replay_subsample=kept",
                                    "method.fl_model=pretrained"],
                                   "replayed batches with kept subsamples, with the averaged flow"),
}


# quality against sd15 compute: each configuration run for several lengths, RUNS/<name>@<iterations>/seed-S (the digits
# preset's learning rate is constant, so a shorter run is the start of a longer one)
CURVES: dict[str, list[int]] = {"digits": [10, 20, 30, 60], "cost-surrogate-replay3": [20, 30, 40, 57, 114]}


def sd15_flops(overrides: list[str]) -> dict[str, float]:
    """TFLOP per trained transition including amortised sampling, ours and the release's, and ours per iteration
    (sampled trajectories x TFLOP per trajectory), from the FLOP tool (run as a command: the tool sits above this
    layer)."""
    args = [*SD15_BASE, *overrides]
    out = subprocess.run([sys.executable, "-m", "fastnabla.flops", "--preset", "sd15-aesthetic", "--json", *args],
                         check=True, capture_output=True, text=True).stdout
    d = json.loads(out)
    key = "tflops_per_trained_transition_incl_sampling"
    batch = int([a for a in args if a.startswith("train.batch_size=")][-1].split("=", 1)[1])  # SD15_BASE sets it
    return {"ours": d[key], "release": d["release"][key], "per_iteration": d["tflops_per_trajectory"] * batch}


def collect(runs: Path, seeds: list[int]) -> dict[str, Any]:
    """Every configuration's FLOP counts and its finished runs (none: its digits columns say "not run")."""
    rows: dict[str, Any] = {}
    for name, (overrides, sd15_overrides, text) in LEVERS.items():
        per_seed = []
        for seed in seeds:
            path = runs / name / f"seed-{seed}" / "metrics.json"
            if path.is_file():
                m = json.loads(path.read_text())
                per_seed.append({"seed": seed, "train_seconds": m["train_seconds"], **m["digits"]["policy"],
                                 "seconds_train_per_iteration": _median_train_seconds(path.parent),
                                 "seconds_per_iteration": _median_train_seconds(path.parent, sampling=True)})
        rows[name] = {"overrides": [*DIGITS_BASE, *overrides], "sd15_overrides": [*SD15_BASE, *sd15_overrides],
                      "text": text, "runs": per_seed, "flops": sd15_flops(sd15_overrides)}
    if not rows["digits"]["runs"]:
        raise FileNotFoundError(f"no finished unaccelerated run in {runs / 'digits'}")
    return rows


def _median_train_seconds(run: Path, sampling: bool = False) -> float:
    """Median wall seconds of the training phase per iteration (with ``sampling``: plus the sampling phase), from
    metrics.jsonl; iterations that trained only."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    values = sorted(r["time_train"] + (r.get("time_sample", 0.0) if sampling else 0.0) for r in rows
                    if r.get("time_train", 0.0) > 1e-3)
    return values[len(values) // 2]


def table(rows: dict[str, Any]) -> str:
    base_wall = mean_std([r["seconds_train_per_iteration"] for r in rows["digits"]["runs"]])[0]
    base_total = mean_std([r["seconds_per_iteration"] for r in rows["digits"]["runs"]])[0]
    base_flops = rows["digits"]["flops"]["ours"]
    head = "| configuration | mean log R | class TV | diversity / target | Fréchet | digits s/iteration / " \
           "unaccelerated: training (sampling + training), medians | sd15 TFLOP per trained transition incl. " \
           "sampling (× release) |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        f = row["flops"]
        flops = f"{f['ours']:.1f} ({f['ours'] / f['release']:.3f}×; {f['ours'] / base_flops:.2f}× unaccelerated)"
        if not row["runs"]:
            lines.append(f"| `{name}`: {row['text']} | not run | | | | | {flops} |")
            continue
        cells = []
        for key, fmt in (("mean_log_reward", "{:.2f}"), ("class_tv", "{:.3f}"), ("diversity_ratio", "{:.3f}"),
                         ("frechet", "{:.0f}")):
            mean, std = mean_std([r[key] for r in row["runs"]])
            cells.append(fmt.format(mean) + (f" ± {fmt.format(std)}" if len(row["runs"]) > 1 else ""))
        wall = mean_std([r["seconds_train_per_iteration"] for r in row["runs"]])[0] / base_wall
        total = mean_std([r["seconds_per_iteration"] for r in row["runs"]])[0] / base_total
        lines.append(f"| `{name}`: {row['text']} | " + " | ".join(cells) + f" | {wall:.2f} ({total:.2f}) | {flops} |")
    return "\n".join(lines) + "\n"


def _quality_panels(series: list[tuple[str, list[float], list[list[dict]], dict]], xlabel: str, path: Path,
                    figsize: tuple[float, float], legend: dict) -> None:
    """Mean log R and class TV (mean ± std over seeds) against ``xlabel``: one ``(name, xs, runs per x, style)``
    series each, saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=figsize)
    for name, xs, runs, style in series:
        for ax, key in zip(axes, ("mean_log_reward", "class_tv"), strict=True):
            stats = [mean_std([r[key] for r in group]) for group in runs]
            ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], capsize=3, label=name, **style)
    axes[0].set_ylabel("digits: mean log R (policy)")
    axes[1].set_ylabel("digits: class TV to the target")
    for ax in axes:
        ax.set_xlabel(xlabel)
    axes[1].legend(fontsize=7, **legend)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def figure(rows: dict[str, Any], path: Path) -> None:
    """Every row with runs at its sd15 FLOPs per trained transition (the equal-iterations view)."""
    from matplotlib import colormaps

    colours, markers = colormaps["tab20"].colors, "os^Dv<>pP*Xh"
    series = [(name, [row["flops"]["ours"] / row["flops"]["release"]], [row["runs"]],
               {"fmt": markers[i % len(markers)], "color": colours[i % len(colours)]})
              for i, (name, row) in enumerate(rows.items()) if row["runs"]]
    _quality_panels(series, "sd15 FLOPs per trained transition incl. sampling / release", path, (12, 3.6),
                    {"loc": "center left", "bbox_to_anchor": (1.02, 0.5)})


def collect_curves(runs: Path, seeds: list[int], flops: dict[str, dict[str, float]]) -> dict[str, list[dict]]:
    """Per :data:`CURVES` configuration, one point per run length with finished runs: iterations, sd15 PFLOP
    (iterations x TFLOP per iteration / 1000), and the runs' digits metrics."""
    out: dict[str, list[dict]] = {}
    for name, lengths in CURVES.items():
        points = []
        for n in lengths:
            found = [json.loads(p.read_text())["digits"]["policy"] for p in
                     (runs / f"{name}@{n}" / f"seed-{s}" / "metrics.json" for s in seeds) if p.is_file()]
            if found:
                points.append({"iterations": n, "sd15_pflop": n * flops[name]["per_iteration"] / 1000,
                               "runs": found})
        out[name] = points
    return out


def curve_table(curves: dict[str, list[dict]]) -> str:
    lines = ["| configuration | iterations | sd15 PFLOP (run) | seeds | mean log R | class TV | diversity / target | "
             "Fréchet |", "|---|---|---|---|---|---|---|---|"]
    for name, points in curves.items():
        for p in points:
            cells = []
            for key, fmt in (("mean_log_reward", "{:.2f}"), ("class_tv", "{:.3f}"), ("diversity_ratio", "{:.3f}"),
                             ("frechet", "{:.0f}")):
                mean, std = mean_std([r[key] for r in p["runs"]])
                cells.append(fmt.format(mean) + (f" ± {fmt.format(std)}" if len(p["runs"]) > 1 else ""))
            lines.append(f"| `{name}` | {p['iterations']} | {p['sd15_pflop']:.0f} | {len(p['runs'])} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def curve_figure(curves: dict[str, list[dict]], path: Path) -> None:
    """Each :data:`CURVES` configuration against the sd15 compute of its runs (the equal-compute view)."""
    series = [(name, [p["sd15_pflop"] for p in points], [p["runs"] for p in points], {"fmt": "o-"})
              for name, points in curves.items() if points]
    _quality_panels(series, "sd15 PFLOP of the run (iterations x TFLOP per iteration)", path, (9, 3.4), {})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="the seeds of the per-lever table")
    p.add_argument("--curve-seeds", type=int, nargs="+", default=None,
                   help="the seeds of the equal-compute curves (default: --seeds); a point averages the seeds it has")
    args = p.parse_args(argv)
    rows = collect(args.runs, args.seeds)
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(rows)
    (args.out / "table.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    figure(rows, args.out / "quality_vs_flops.png")
    curve_seeds = args.seeds if args.curve_seeds is None else args.curve_seeds
    curves = collect_curves(args.runs, curve_seeds, {name: rows[name]["flops"] for name in CURVES})
    if any(curves.values()):
        curve_text = curve_table(curves)
        (args.out / "curves.md").write_text(curve_text)
        (args.out / "curves.json").write_text(json.dumps(curves, indent=1) + "\n")
        curve_figure(curves, args.out / "quality_vs_compute.png")
        text += "\n" + curve_text
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
