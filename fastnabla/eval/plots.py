"""Plots of evaluation results (``results.json``): metrics over training and reward trade-offs across runs.

* ``reward_over_training.png``, ``diversity_over_training.png``, ``prior_distance_over_training.png``: one line per
  run (metric of each evaluated checkpoint against its training step; the reward with a +-1 std band over images),
  the pretrained model's value as a dashed line;
* ``tradeoff_reward_diversity.png``, ``tradeoff_reward_prior_distance.png``: every evaluated checkpoint of every run
  as a point (reward, metric), one colour per run, the final checkpoint circled, the pretrained model as a star
  (the paper's Figure 7).

Axis labels come from the metric kinds in the results (:mod:`fastnabla.eval.labels`): a fallback is named as what it
is. Files are written atomically.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from fastnabla.eval.labels import DIVERSITY_LABELS, FID_LABELS
from fastnabla.utils.io import atomic_write

METRIC_FILES = {"reward_mean": "reward", "diversity_pairwise_distance": "diversity",
                "frechet_distance": "prior_distance"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))
    return path


def metric_labels(results: dict[str, Any]) -> dict[str, str]:
    """Axis label of every plotted metric key present in ``results``."""
    labels = {"reward_mean": "reward (mean over images, each with its own prompt)"}
    described = results.get("metrics", {})
    if described.get("diversity"):
        labels["diversity_pairwise_distance"] = DIVERSITY_LABELS[described["diversity"]["kind"]]
    if described.get("prior"):
        labels["frechet_distance"] = FID_LABELS[described["prior"]["kind"]]
    return labels


def _run_label(run: dict[str, Any]) -> str:
    return f"{run['name']} ({run['method']})"


def _wrap(text: str, width: int = 60) -> str:
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + len(w) + 1 > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return "\n".join([*lines, line])


def plot_over_training(results: dict[str, Any], key: str, label: str, path: Path) -> Path:
    """``key`` of every evaluated checkpoint against its step, one line per run; pretrained values dashed."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(results["runs"]):
        points = [(c["step"], c["metrics"]) for c in run["checkpoints"] if c["metrics"].get(key) is not None]
        if not points:
            continue
        steps, values = [s for s, _ in points], [m[key] for _, m in points]
        color = colors[i % len(colors)]
        ax.plot(steps, values, marker="o", color=color, label=_run_label(run))
        if key == "reward_mean":
            stds = [m.get("reward_std") or 0.0 for _, m in points]
            ax.fill_between(steps, [v - s for v, s in zip(values, stds, strict=True)],
                            [v + s for v, s in zip(values, stds, strict=True)], color=color, alpha=0.15)
    for j, entry in enumerate(results["pretrained"]):
        value = entry["metrics"].get(key)
        if value is not None:
            name = "pretrained" if len(results["pretrained"]) == 1 else f"pretrained ({entry['model']})"
            ax.axhline(value, color="black", linestyle="--", linewidth=1, alpha=0.7 - 0.2 * (j % 3), label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("training iteration (checkpoint)")
    ax.set_ylabel(_wrap(label, 45))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_tradeoff(results: dict[str, Any], key: str, label: str, path: Path) -> Path:
    """(reward, ``key``) of every evaluated checkpoint of every run; final checkpoints circled; pretrained stars."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(results["runs"]):
        color = colors[i % len(colors)]
        points = [c for c in run["checkpoints"] if c["metrics"].get(key) is not None]
        if not points:
            continue
        ax.scatter([c["metrics"]["reward_mean"] for c in points], [c["metrics"][key] for c in points], color=color,
                   s=22, alpha=0.8, label=_run_label(run))
        final = [c for c in points if c["final"]]
        ax.scatter([c["metrics"]["reward_mean"] for c in final], [c["metrics"][key] for c in final],
                   facecolors="none", edgecolors=color, s=110, linewidths=1.5)
    for entry in results["pretrained"]:
        m = entry["metrics"]
        if m.get(key) is not None:
            ax.scatter([m["reward_mean"]], [m[key]], marker="*", color="black", s=160, label="pretrained")
    ax.set_xlabel("reward (mean over images)")
    ax.set_ylabel(_wrap(label, 45))
    ax.set_title("circled: final checkpoint", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def write_plots(results: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Every plot the metrics in ``results`` allow, into ``out_dir``; returns the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = metric_labels(results)
    written = []
    for key, label in labels.items():
        written.append(plot_over_training(results, key, label, out_dir / f"{METRIC_FILES[key]}_over_training.png"))
        if key != "reward_mean":
            written.append(plot_tradeoff(results, key, label, out_dir / f"tradeoff_reward_{METRIC_FILES[key]}.png"))
    return written


def merge_results(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One results dict from several evaluations with the same metric kinds (plots across evaluations).

    Raises:
        ValueError: an input is incomplete, or the inputs measured diversity / prior-following differently.
    """
    if not results:
        raise ValueError("no results to merge")
    for i, r in enumerate(results):
        if not r.get("complete"):
            raise ValueError(f"results #{i + 1} is not a complete evaluation (no \"complete\": true)")
    kinds = [{k: (v or {}).get("kind") for k, v in r.get("metrics", {}).items()} for r in results]
    if any(k != kinds[0] for k in kinds[1:]):
        raise ValueError(f"the results measure diversity / prior-following with different kinds {kinds}: plotting "
                         "them together would compare different metrics")
    merged = {**results[0], "pretrained": [], "runs": []}
    for i, r in enumerate(results):
        rename = {p["id"]: f"{p['id']}@{i}" if len(results) > 1 else p["id"] for p in r["pretrained"]}
        merged["pretrained"] += [{**p, "id": rename[p["id"]]} for p in r["pretrained"]]
        merged["runs"] += [{**run, "pretrained": rename.get(run["pretrained"], run["pretrained"])} for run in r["runs"]]
    return merged
