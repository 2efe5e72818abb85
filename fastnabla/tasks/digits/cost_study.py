"""The cost levers of docs/cost.md on the digits yardstick: one row per configuration with its digits quality (the
end-of-run evaluation), its training wall time relative to the unaccelerated run measured side by side, and the FLOP
tool's sd15 ratio for the same overrides (``python -m fastnabla.flops --preset sd15-aesthetic --json OVERRIDES``),
then a quality-versus-FLOPs figure.

    python -m fastnabla.tasks.digits.cost_study --runs RUNS --out docs/cost [--seeds 0]

``RUNS/<name>/seed-S`` are ``python -m fastnabla.train --preset digits OVERRIDES`` runs, one per :data:`LEVERS` row
(``digits`` itself is the unaccelerated configuration).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from fastnabla.tasks.digits.compare import mean_std

# name -> (overrides of the digits preset and of sd15-aesthetic, description)
LEVERS: dict[str, tuple[list[str], str]] = {
    "digits": ([], "unaccelerated (forward-looking term at every state, 4 of 20 transitions)"),
    "cost-terminal": (["method.forward_looking=terminal"], "forward-looking term only at the terminal state"),
    "cost-tf05": (["train.transition_fraction=0.5"], "10 of 20 transitions per sampled trajectory"),
    "cost-both": (["method.forward_looking=terminal", "train.transition_fraction=0.5"], "both levers"),
}


def sd15_flops(overrides: list[str]) -> dict[str, float]:
    """TFLOP per trained transition including amortised sampling, ours and the release's, from the FLOP tool."""
    out = subprocess.run([sys.executable, "-m", "fastnabla.flops", "--preset", "sd15-aesthetic", "--json",
                          *overrides], check=True, capture_output=True, text=True).stdout
    d = json.loads(out)
    key = "tflops_per_trained_transition_incl_sampling"
    return {"ours": d[key], "release": d["release"][key]}


def collect(runs: Path, seeds: list[int]) -> dict[str, Any]:
    """Every configuration's FLOP counts and its finished runs (none: its digits columns say "not run")."""
    rows: dict[str, Any] = {}
    for name, (overrides, text) in LEVERS.items():
        per_seed = []
        for seed in seeds:
            path = runs / name / f"seed-{seed}" / "metrics.json"
            if path.is_file():
                m = json.loads(path.read_text())
                per_seed.append({"seed": seed, "train_seconds": m["train_seconds"], **m["digits"]["policy"],
                                 "seconds_train_per_iteration": _median_train_seconds(path.parent)})
        rows[name] = {"overrides": overrides, "text": text, "runs": per_seed, "flops": sd15_flops(overrides)}
    if not rows["digits"]["runs"]:
        raise FileNotFoundError(f"no finished unaccelerated run in {runs / 'digits'}")
    return rows


def _median_train_seconds(run: Path) -> float:
    """Median wall seconds of the training phase per iteration (sampling excluded), from metrics.jsonl."""
    values = sorted(json.loads(line)["time_train"] for line in (run / "metrics.jsonl").read_text().splitlines()
                    if line.strip() and json.loads(line).get("time_train"))
    return values[len(values) // 2]


def table(rows: dict[str, Any]) -> str:
    base_wall = mean_std([r["seconds_train_per_iteration"] for r in rows["digits"]["runs"]])[0]
    base_flops = rows["digits"]["flops"]["ours"]
    head = "| configuration | mean log R | class TV | diversity / target | Fréchet | digits training s/iteration / " \
           "unaccelerated (median) | sd15 TFLOP per trained transition incl. sampling (× release) |"
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
        lines.append(f"| `{name}`: {row['text']} | " + " | ".join(cells) + f" | {wall:.2f} | {flops} |")
    return "\n".join(lines) + "\n"


def figure(rows: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, row in rows.items():
        if not row["runs"]:
            continue
        x = row["flops"]["ours"] / row["flops"]["release"]
        for ax, key in zip(axes, ("mean_log_reward", "class_tv"), strict=True):
            mean, std = mean_std([r[key] for r in row["runs"]])
            ax.errorbar([x], [mean], yerr=[std], fmt="o", capsize=3, label=name)
    axes[0].set_ylabel("digits: mean log R (policy)")
    axes[1].set_ylabel("digits: class TV to the target")
    for ax in axes:
        ax.set_xlabel("sd15 FLOPs per trained transition incl. sampling / release")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = p.parse_args(argv)
    rows = collect(args.runs, args.seeds)
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(rows)
    (args.out / "table.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    figure(rows, args.out / "quality_vs_flops.png")
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
