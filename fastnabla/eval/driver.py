"""Evaluate run directories and the pretrained model they start from, writing JSON as it goes.

For each run (in order): build its task from ``config.yaml`` (the pipeline, LoRA layout and reward it trained with),
evaluate the pretrained model once per distinct base model (:func:`pretrained_key`), then load each selected
checkpoint's LoRA weights and evaluate the policy (an entry of :func:`fastnabla.eval.runs.open_model`: a LoRA file
loaded at build by ``sd.lora.init``, or a model alone, which only has its pretrained evaluation); the Frechet
distance compares each checkpoint's images of a prompt with the pretrained model's images of that prompt.
``OUT/runs/<name>.json`` is written (atomically) when a run is done; ``OUT/results.json`` -- everything,
``"complete": true`` -- is written last by the caller, so a directory without it is an unfinished evaluation.
"""

from __future__ import annotations

import gc
import json
import re
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fastnabla.config.loader import to_dict
from fastnabla.eval.image_sets import EvalPlan, ImageSet, MetricExtractors, collect_image_set, summarize_image_set
from fastnabla.eval.runs import Checkpoint, RunInfo, load_lora_weights, read_lora_state
from fastnabla.run.driver import check_task_reward
from fastnabla.training.model_card import reward_description
from fastnabla.utils.io import write_json

RESULTS_FORMAT = 1
# SD config entries that do not change what the pretrained model (adapters off) samples or how it is scored
_NOT_PRETRAINED = ("lora", "flow", "trajectory_dtype", "tiny_cache_dir", "prompts")


def pretrained_key(run: RunInfo) -> str:
    """Identifies the pretrained sampler and reward of a run: runs with equal keys share one pretrained evaluation."""
    sd = {k: v for k, v in to_dict(run.cfg.sd).items() if k not in _NOT_PRETRAINED}
    return json.dumps(sd, sort_keys=True)


def select_checkpoints(run: RunInfo, which: str) -> list[Checkpoint]:
    """``final``: the newest complete checkpoint; ``all``: every kept one (curves over training)."""
    if which == "final":
        return [run.final]
    if which == "all":
        return list(run.checkpoints)
    raise ValueError(f"--checkpoints must be 'final' or 'all', got {which!r}")


def safe_name(name: str) -> str:
    """A file-name-safe version of a run name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "run"


def evaluate_runs(
    runs: list[RunInfo],
    plan: EvalPlan,
    extractors: MetricExtractors,
    out_dir: Path,
    device: torch.device,
    checkpoints: str = "final",
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``runs`` (module docstring) and return the results dict (not yet written as ``results.json``)."""
    from fastnabla.tasks.sd.build import build_sd_task

    selected = {run.name: select_checkpoints(run, checkpoints) if run.kind == "run" else list(run.checkpoints)
                for run in runs}
    keys = {run.name: pretrained_key(run) for run in runs}
    distinct = list(dict.fromkeys(keys.values()))
    total = plan.images_per_prompt * len(plan.prompts) * (len(distinct) + sum(len(c) for c in selected.values()))
    bar = tqdm(total=total, desc="evaluating", unit="img", dynamic_ncols=True, disable=not progress)
    references: dict[str, ImageSet] = {}
    pretrained: list[dict[str, Any]] = []
    results_runs: list[dict[str, Any]] = []
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    try:
        for run in runs:
            torch.manual_seed(run.cfg.seed)
            try:
                task = build_sd_task(run.cfg.sd, device, seed=run.cfg.seed)
            except (OSError, ValueError) as err:
                kind = FileNotFoundError if isinstance(err, OSError) else ValueError
                raise kind(f"run {run.path}: {err} (paths on this machine: --set sd.model=PATH, "
                           "--set sd.reward.options.OPTION=PATH)") from err
            check_task_reward(task, "evaluation")  # shape, dtype, finite; no gradient needed here
            key = keys[run.name]
            pretrained_id = f"pretrained-{distinct.index(key)}"
            if key not in references:
                bar.set_description(f"pretrained ({run.cfg.sd.model})")
                references[key] = collect_image_set(task, plan, extractors, use_pretrained=True, progress=bar)
                pretrained.append({"id": pretrained_id, "model": run.cfg.sd.model,
                                   "reward": reward_description(run.cfg.sd.reward),
                                   "runs": [], "metrics": summarize_image_set(references[key], references[key],
                                                                              extractors)})
            entry = next(p for p in pretrained if p["id"] == pretrained_id)
            if run.kind == "model":  # the model alone: its pretrained evaluation is all there is
                del task
                continue
            entry["runs"].append(run.name)
            record: dict[str, Any] = {"name": run.name, "path": str(run.path), "kind": run.kind,
                                      "method": run.method if run.kind == "run" else None,
                                      "finished": run.finished, "reward": reward_description(run.cfg.sd.reward),
                                      "pretrained": pretrained_id, "checkpoints": []}
            for checkpoint in selected[run.name]:
                bar.set_description(f"{run.name} step {checkpoint.step}")
                if run.kind == "run":  # a LoRA file entry was loaded when the task was built (sd.lora.init)
                    load_lora_weights(task, read_lora_state(checkpoint), str(checkpoint.path / "rank0.pt"))
                images = collect_image_set(task, plan, extractors, progress=bar)
                record["checkpoints"].append({
                    "step": checkpoint.step, "final": checkpoint.step == run.final.step, "path": str(checkpoint.path),
                    "metrics": summarize_image_set(images, references[key], extractors),
                })
            del task  # free the pipeline before the next run builds its own
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            results_runs.append(record)
            write_json(out_dir / "runs" / f"{safe_name(run.name)}.json",
                       {"complete": True, "settings": plan.to_dict(), "metrics": extractors.describe(),
                        "pretrained": entry, "run": record})
    finally:
        bar.close()
    return {
        "format": RESULTS_FORMAT,
        "complete": True,
        "settings": {**plan.to_dict(), "device": str(device), "checkpoints": checkpoints},
        "metrics": extractors.describe(),
        "pretrained": pretrained,
        "runs": results_runs,
    }
