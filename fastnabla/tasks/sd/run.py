"""What a Stable Diffusion training run adds to the shared driver (:mod:`fastnabla.run.driver`): evaluation grids
of fixed prompts and seeds, network-pass counters, the LoRA export and the run summary.

The first iteration only samples (Algorithm 1 trains on the previous batch), so ``train.iterations=3`` is two
training epochs. Outputs besides the driver's (``config.yaml``, ``metrics.jsonl``, ``tensorboard/``,
``checkpoints/``, ``metrics.json``): ``samples/pretrained.png`` and ``samples/iter-XXXXXXX.png`` (evaluation
grids: one column per prompt, one row per seed), ``eval_pretrained.json`` (the pretrained grid's mean log R, kept
for a resumed run) and ``lora/`` (the trained LoRA in diffusers format). ``metrics.jsonl`` gains UNet/VAE/reward/
flow passes per trained transition (per trained trajectory for ReFL / DRaFT).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fastnabla.tasks.sd.build import build_sd_task
from fastnabla.tasks.sd.counters import PassCounter, count_task_passes
from fastnabla.tasks.sd.image_grid import save_image_grid
from fastnabla.tasks.sd.sampling import evaluation_grid_inputs, sample_images
from fastnabla.training.trackers import LoggedImages
from fastnabla.utils.io import write_json

if TYPE_CHECKING:
    from fastnabla.run.config import RunConfig
    from fastnabla.training.distributed import DistContext

RELEASE_PASSES = {"unet_forward": 3, "unet_backward": 5, "vae_decoder_backward": 2, "reward_backward": 2}
PRETRAINED_FILE = "eval_pretrained.json"


class TrainingPassCounter:
    """Counts network passes during training passes only (not sampling): a trainer observer.

    Per trained transition, counted in samples: a CFG pair call on ``B`` latents is ``B`` UNet passes (as in the
    release's count), a ``K``-draw smoothed FL decode is ``K`` decoder passes.
    """

    def __init__(self, task, world_size: int):
        self.task, self.world_size = task, world_size
        self._context = count_task_passes(task)
        self.counter: PassCounter = self._context.__enter__()
        self.passes: dict[str, float] = {}

    def before_train(self) -> None:
        self.counter.reset()

    def after_train(self, stats: dict[str, Any]) -> None:
        per = self.counter.per(max(int(stats["transitions"] // self.world_size), 1))
        pair = 2 if self.task.guidance_scale != 1.0 else 1
        for net, v in per.items():
            for kind in ("forward", "backward"):
                self.passes[f"{net}_{kind}"] = v[f"{kind}_samples"] / (pair if net == "unet" else 1)
        stats["passes_per_transition"] = dict(self.passes)

    def close(self) -> None:
        self._context.__exit__(None, None, None)


class SDRun:
    """The Stable Diffusion task of ``cfg`` with its evaluation grids and LoRA export."""

    def __init__(self, cfg: RunConfig, dist: DistContext):
        self.cfg = cfg
        torch.manual_seed(cfg.seed)  # anything drawn from the global RNG while building (LoRA init) follows the seed
        # the surrogate decoder is loaded only where the forward-looking term uses it
        sd = cfg.sd if cfg.method.fl_decoder == "surrogate" else dataclasses.replace(cfg.sd, fl_surrogate_decoder="")
        self.task = build_sd_task(sd, dist.device, seed=cfg.seed)
        self.counter = TrainingPassCounter(self.task, dist.world_size)
        self.observers = [self.counter]
        self.eval_prompts = self.task.default_eval_prompts
        self.eval_seeds = list(cfg.sd.prompts.eval_seeds)
        self.images: list[LoggedImages] = []  # grids to log (output.report_to), drained by the driver
        self.pretrained: dict[str, float] = {}

    def evaluate(self, out_dir: Path, iteration: int, use_pretrained: bool = False) -> float:
        """Mean log R of the evaluation grid (fixed prompts and seeds); writes its PNG."""
        prompts, seeds = evaluation_grid_inputs(self.eval_prompts, self.eval_seeds)
        images = sample_images(self.task, prompts, seeds, use_pretrained=use_pretrained)
        with torch.no_grad():
            each = self.task.log_reward(images, {"prompts": prompts})
        log_r = float(each.mean())
        if self.cfg.output.figure:
            (out_dir / "samples").mkdir(exist_ok=True)
            name = "pretrained.png" if use_pretrained else f"iter-{iteration:07d}.png"
            save_image_grid(images.cpu(), out_dir / "samples" / name, nrow=len(self.eval_prompts))
        tag = "samples_pretrained" if use_pretrained else "samples"
        self.images.append(LoggedImages(tag, images.cpu(), [f"{p} (seed {s}): log R = {v:.4f}" for p, s, v in
                                                             zip(prompts, seeds, each.tolist(), strict=True)]))
        return log_r

    def start(self, out_dir: Path, resume: bool, records: list[dict[str, Any]], trainer) -> None:
        """The pretrained model's grid (read back on resume, so a resumed run reports it too)."""
        self.out_dir = out_dir
        self.per_trajectory = trainer.objective.per_trajectory
        file = out_dir / PRETRAINED_FILE
        if resume and file.is_file():
            self.pretrained = json.loads(file.read_text())
            return
        self.pretrained = {"eval_log_reward_pretrained": self.evaluate(out_dir, 0, use_pretrained=True)}
        write_json(file, self.pretrained)

    def on_step(self, record: dict[str, Any]) -> dict[str, str]:
        it, every = record["iteration"], self.cfg.eval.every
        if every and it % every == 0 and it < self.cfg.train.iterations:
            record["eval_log_reward"] = self.evaluate(self.out_dir, it)
        return {"logR": f"{record['reward_mean']:.3f}"}

    def finish(self, out_dir: Path, records: list[dict[str, Any]], train_seconds: float) -> dict[str, Any]:
        trained = [r for r in records if "transitions" in r]
        phases = sorted({k for r in records for k in r.get("seconds", {})})
        summary: dict[str, Any] = dict(self.pretrained)
        summary.update(
            iterations=self.cfg.train.iterations,
            reward_mean=records[-1]["reward_mean"],
            reward_std=records[-1]["reward_std"],
            reward_mean_first=records[0]["reward_mean"],
            eval_log_reward=self.evaluate(out_dir, self.cfg.train.iterations),
            seconds_per_iteration={p: sum(r["seconds"].get(p, 0.0) for r in records) / len(records) for p in phases},
            trajectories_per_s=sum(r["trajectories_per_s"] for r in records) / len(records),
            passes_per_transition=trained[-1]["passes_per_transition"] if trained else {},
            passes_unit="trajectory" if self.per_trajectory else "transition",  # what one planned item is
            release_passes_per_transition=RELEASE_PASSES,
            peak_memory_bytes=max(r["peak_memory_bytes"] for r in records),
        )
        if self.cfg.output.export_lora:
            summary["lora_dir"] = str(self.task.export_lora(out_dir / "lora"))
        return summary

    def summary(self, s: dict[str, Any], out_dir: Path) -> str:
        lines = [f"log R of sampled batches: {s['reward_mean_first']:.4f} (first iteration) -> "
                 f"{s['reward_mean']:.4f} (last)"]
        if "eval_log_reward_pretrained" in s:
            lines.append(f"log R on the evaluation grid: {s['eval_log_reward_pretrained']:.4f} (pretrained) -> "
                         f"{s['eval_log_reward']:.4f} (fine-tuned)")
        seconds = s["seconds_per_iteration"]
        lines.append("seconds per iteration: " + ", ".join(f"{k} {v:.2f}" for k, v in seconds.items()))
        if s["passes_per_transition"]:
            p, unit = s["passes_per_transition"], s["passes_unit"]
            release = " (nabla-GFlowNet release: 3 + 5 per transition)" if unit == "transition" else ""
            lines.append(f"UNet passes per trained {unit}: {p.get('unet_forward', 0):.2f} forward + "
                         f"{p.get('unet_backward', 0):.2f} backward{release}")
        lines.append(f"outputs in {out_dir}")
        return "\n".join(lines)

    def close(self) -> None:
        self.counter.close()
