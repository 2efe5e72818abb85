"""Methods compared on the digits yardstick: presets x seeds, one training run each, a Markdown table of the end-of-run
evaluation (mean ± std over seeds) and a PNG sample grid per preset.

    python -m fastnabla.tasks.digits compare --presets digits digits-refl digits-draft-k digits-ddpo \\
        --seeds 0 1 2 --out docs/digits/compare [--runs runs/digits-compare] [--model DIR] [-- overrides...]

Each run is ``python -m fastnabla.train --preset P seed=S --out RUNS/P/seed-S [overrides]`` in a subprocess (the
evaluation is :class:`fastnabla.tasks.digits.run.DigitsRun`'s, written to ``metrics.json["digits"]``); a run whose
``metrics.json`` exists is reused, so an interrupted comparison continues. ``OUT`` receives ``table.md``,
``results.json`` (every run's numbers) and ``<preset>.png`` (the first 32 evaluation samples of its first seed, 4x
enlarged): small files meant for the docs; the run directories stay in ``RUNS``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# (column, key in metrics.json["digits"]["policy"], format)
COLUMNS = (
    ("mean log R", "mean_log_reward", "{:.2f}"),
    ("class TV", "class_tv", "{:.3f}"),
    ("diversity / target", "diversity_ratio", "{:.3f}"),
    ("Fréchet", "frechet", "{:.0f}"),
)
GRID_SAMPLES = 32


def run_dir(runs: Path, preset: str, seed: int) -> Path:
    return runs / preset / f"seed-{seed}"


def train_one(preset: str, seed: int, runs: Path, model: str | None, overrides: Sequence[str]) -> Path:
    """Train ``preset`` with ``seed`` unless its ``metrics.json`` exists; the run directory."""
    out = run_dir(runs, preset, seed)
    if (out / "metrics.json").is_file():
        return out
    cmd = [sys.executable, "-m", "fastnabla.train", "--preset", preset, "--out", str(out), f"seed={seed}",
           "output.overwrite=true", *(["--model", model] if model else []), *overrides]
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, env=os.environ.copy())
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var)


def collect(runs: Path, presets: Sequence[str], seeds: Sequence[int], available: bool = False) -> dict[str, Any]:
    """Every run's ``digits`` evaluation, its training seconds, and the pretrained sampler's and target's numbers
    (``available``: skip seeds without a finished run instead of failing; a preset needs one)."""
    out: dict[str, Any] = {"presets": {}}
    for preset in presets:
        rows = []
        for seed in seeds:
            path = run_dir(runs, preset, seed) / "metrics.json"
            if available and not path.is_file():
                continue
            m = json.loads(path.read_text())
            d = m.get("digits", {})
            if not d.get("evaluated"):
                why = d.get("why", "metrics.json lacks it")
                raise ValueError(f"{preset} seed {seed}: no digits evaluation ({why})")
            rows.append({"seed": seed, "policy": d["policy"], "pretrained": d["pretrained"],
                         "train_seconds": m.get("train_seconds"), "diverged": bool(m.get("diverged"))})
            out.setdefault("target", d["target"])
        if not rows:
            raise FileNotFoundError(f"{preset}: no finished run for seeds {list(seeds)} in {runs / preset}")
        out["presets"][preset] = rows
    return out


def _cell(values: Sequence[float], fmt: str) -> str:
    mean, std = mean_std(values)
    return f"{fmt.format(mean)} ± {fmt.format(std)}" if len(values) > 1 else fmt.format(mean)


def markdown_table(results: dict[str, Any]) -> str:
    """One row per preset (mean ± std over seeds), then the pretrained sampler (first preset's runs) and the target."""
    head = ["preset", "seeds", *(c[0] for c in COLUMNS), "train s (median)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    presets = results["presets"]
    for preset, rows in presets.items():
        cells = [_cell([r["policy"][key] for r in rows], fmt) for _, key, fmt in COLUMNS]
        secs = sorted(r["train_seconds"] or float("nan") for r in rows)
        diverged = sum(r["diverged"] for r in rows)
        name = f"`{preset}`" + (f" ({diverged} diverged)" if diverged else "")
        lines.append(f"| {name} | {len(rows)} | " + " | ".join(cells) + f" | {secs[len(secs) // 2]:.0f} |")
    first = next(iter(presets.values()))
    pre = [_cell([first[0]["pretrained"][key]], fmt) for _, key, fmt in COLUMNS]
    lines.append("| pretrained sampler | | " + " | ".join(pre) + " | 0 |")
    t = results["target"]
    f = t.get("class_tv_floor")  # what an exact sampler scores with the runs' evaluation sample count
    tv = f"0 (exact sampler, {f['n']} samples: {f['mean']:.3f})" if f else "0"
    lines.append(f"| target (ESS {t['ess']:.0f} of {t['num_samples']}) | | {t['mean_log_reward']:.2f} | {tv} | 1 | 0 "
                 "| |")
    return "\n".join(lines) + "\n"


def sample_grid(runs: Path, preset: str, seed: int, path: Path) -> Path:
    """The first :data:`GRID_SAMPLES` evaluation images of one run as a PNG (4x nearest-neighbour enlarged)."""
    import torch
    from safetensors.torch import load_file

    from fastnabla.tasks.digits.run import SAMPLES_FILE
    from fastnabla.tasks.sd.image_grid import save_image_grid

    images = load_file(str(run_dir(runs, preset, seed) / SAMPLES_FILE))["images"][:GRID_SAMPLES].float()
    zoomed = torch.nn.functional.interpolate(images, scale_factor=4, mode="nearest")
    return save_image_grid(zoomed, path, nrow=8)


def compare(presets: Sequence[str], seeds: Sequence[int], out: Path, runs: Path, model: str | None = None,
            overrides: Sequence[str] = (), train: bool = True, available: bool = False) -> str:
    """Train (unless ``train`` is false) and tabulate; writes ``out/table.md``, ``out/results.json`` and the grids
    (``available``: tabulate the finished seeds of each preset; the table says how many)."""
    if not presets or not seeds:
        raise ValueError("compare needs at least one preset and one seed")
    if train:
        for preset in presets:
            for seed in seeds:
                train_one(preset, seed, runs, model, overrides)
    results = collect(runs, presets, seeds, available)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results)
    (out / "table.md").write_text(table)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    for preset in presets:
        sample_grid(runs, preset, results["presets"][preset][0]["seed"], out / f"{preset}.png")
    return table
