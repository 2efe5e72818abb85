"""One Stable Diffusion training run: train, log, evaluate on fixed prompts and seeds, export the LoRA.

The first iteration only samples (Algorithm 1 trains on the previous batch), so ``train.iterations=3``
is two training epochs.

Outputs in the run directory (rank 0): ``config.yaml``; ``metrics.jsonl`` (one line per iteration:
reward mean/std, loss terms, grad norms, seconds per phase, trajectories/s, peak memory, UNet/VAE/
reward/flow passes per trained transition -- per trained trajectory for ReFL / DRaFT);
``tensorboard/`` (when TensorBoard is installed); ``samples/pretrained.png`` and
``samples/iter-XXXXXXX.png`` (evaluation grids: one column per prompt, one row per seed);
``checkpoints/``; ``lora/`` (the trained LoRA in diffusers format) and, written last,
``metrics.json``. A directory without ``metrics.json`` is an unfinished run.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fastnabla.config.loader import to_yaml
from fastnabla.config.schema import RunConfig
from fastnabla.tasks.sd.build import build_sd_task
from fastnabla.tasks.sd.config import torch_dtype
from fastnabla.tasks.sd.counters import count_task_passes
from fastnabla.tasks.sd.image_grid import save_image_grid
from fastnabla.tasks.sd.sampling import evaluation_grid_inputs, sample_images
from fastnabla.training.checkpoint import CheckpointManager
from fastnabla.training.distributed import DistContext, init_distributed
from fastnabla.training.session import run_steps
from fastnabla.training.trainer import NablaGFNTrainer
from fastnabla.utils.io import JsonlLogger, atomic_write, read_jsonl, write_json
from fastnabla.utils.profiling import PhaseTimer

RELEASE_PASSES = {"unet_forward": 3, "unet_backward": 5, "vae_decoder_backward": 2, "reward_backward": 2}


def peak_memory_bytes(device: torch.device) -> int:
    """Peak CUDA memory allocated since the last reset, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def build_sd_trainer(task, cfg: RunConfig, dist: DistContext, timer: PhaseTimer) -> NablaGFNTrainer:
    from fastnabla.methods import build_objective

    t = cfg.train
    objective = build_objective(cfg.method, task, cfg.seed)
    return NablaGFNTrainer(
        task, objective, cfg.optim, t.batch_size, t.transition_fraction, t.updates_per_batch, cfg.seed, t.iterations,
        sample_batch_size=t.sample_batch_size or None, micro_batch_size=t.micro_batch_size or None,
        fl_batch_size=t.fl_batch_size, storage_dtype=torch_dtype(cfg.sd.trajectory_dtype, "sd.trajectory_dtype"),
        dist=dist, timer=timer,
    )


class _TensorBoard:
    """Scalars and image grids to ``OUT/tensorboard`` when TensorBoard is installed (silently off otherwise)."""

    def __init__(self, directory: Path, enabled: bool):
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                return
            self.writer = SummaryWriter(str(directory))

    def scalars(self, record: dict[str, Any], step: int) -> None:
        if self.writer is None:
            return
        for k, v in record.items():
            if isinstance(v, (int, float)) and k != "iteration":
                self.writer.add_scalar(k, v, step)
            elif isinstance(v, dict):
                self.scalars({f"{k}/{kk}": vv for kk, vv in v.items()}, step)

    def image(self, tag: str, grid: torch.Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, grid, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class _Evaluator:
    """Image grids of fixed prompts and seeds, and their mean log R."""

    def __init__(self, task, cfg: RunConfig, out_dir: Path, tb: _TensorBoard):
        p = cfg.sd.prompts
        self.task, self.tb = task, tb
        self.prompts = list(p.eval_prompts) or task.prompts[:4]
        self.seeds = list(p.eval_seeds)
        self.dir = out_dir / "samples"
        self.write = cfg.output.figure

    def __call__(self, iteration: int, use_reference: bool = False) -> float:
        prompts, seeds = evaluation_grid_inputs(self.prompts, self.seeds)
        images = sample_images(self.task, prompts, seeds, use_reference=use_reference)
        log_r = float(self.task.log_reward(images, {"prompts": prompts}).mean())
        if self.write:
            self.dir.mkdir(exist_ok=True)
            name = "pretrained.png" if use_reference else f"iter-{iteration:07d}.png"
            save_image_grid(images.cpu(), self.dir / name, nrow=len(self.prompts))
        self.tb.image("samples", images[0].cpu(), iteration)
        return log_r


def run_sd(
    cfg: RunConfig,
    out_dir: Path,
    name: str = "sd",
    verbose: bool = True,
    resume: bool = False,
    dist: DistContext | None = None,
) -> dict[str, Any] | None:
    """Train Stable Diffusion as ``cfg`` says and write the outputs into ``out_dir``.

    Returns the final metrics on rank 0 of a finished run; None on other ranks and when SIGTERM/SIGINT
    stopped the run (a checkpoint is then in ``out_dir/checkpoints``: ``resume=True`` continues it).
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    dist = dist or init_distributed(cfg.train.device)
    main = dist.is_main
    torch.manual_seed(cfg.seed)  # anything drawn from the global RNG while building (LoRA init) follows the seed
    task = build_sd_task(cfg.sd, dist.device, seed=cfg.seed)
    timer = PhaseTimer()
    trainer = build_sd_trainer(task, cfg, dist, timer)
    checkpoints = CheckpointManager(out_dir / "checkpoints", cfg.train.keep_checkpoints, dist)
    if resume:
        checkpoints.load(trainer)
    elif main:
        text = to_yaml(cfg)
        atomic_write(out_dir / "config.yaml", lambda f: f.write(text.encode()))

    tb = _TensorBoard(out_dir / "tensorboard", cfg.output.tensorboard and main)
    evaluate = _Evaluator(task, cfg, out_dir, tb) if main else None
    summary: dict[str, Any] = {"name": name}
    if main and not resume:
        summary["eval_log_reward_pretrained"] = evaluate(0, use_reference=True)
    log = JsonlLogger(out_dir / "metrics.jsonl", resume_after=trainer.iteration if resume else None) if main else None
    iterations, every = cfg.train.iterations, cfg.eval.every
    bar = tqdm(total=iterations, initial=trainer.iteration, desc=f"{name}: training", dynamic_ncols=True,
               disable=not (cfg.output.progress and verbose and main))

    counter_ctx = count_task_passes(task)
    counter = counter_ctx.__enter__()
    passes: dict[str, Any] = {}
    train_on = trainer.train_on

    def counted_train_on(traj, iteration=None):  # count training passes only, not sampling
        counter.reset()
        stats = train_on(traj, iteration)
        # passes per trained transition, counted in samples: a CFG pair call on B latents is B UNet passes
        # (as in the release's count), a K-draw smoothed FL decode is K decoder passes
        per = counter.per(max(int(stats["transitions"] // dist.world_size), 1))
        pair = 2 if task.guidance_scale != 1.0 else 1
        for net, v in per.items():
            for kind in ("forward", "backward"):
                passes[f"{net}_{kind}"] = v[f"{kind}_samples"] / (pair if net == "unet" else 1)
        return stats

    trainer.train_on = counted_train_on
    last_totals = dict(timer.total)

    def on_step(stats: dict[str, Any]) -> None:
        nonlocal last_totals
        record: dict[str, Any] = dict(stats)
        record["seconds"] = {k: v - last_totals.get(k, 0.0) for k, v in timer.total.items()}
        last_totals = dict(timer.total)
        record["peak_memory_bytes"] = peak_memory_bytes(dist.device)
        if dist.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dist.device)
        if "transitions" in stats:
            record["passes_per_transition"] = dict(passes)
        if not main:
            return
        it = record["iteration"]
        if every and it % every == 0 and it < iterations:
            record["eval_log_reward"] = evaluate(it)
        log.log(record)
        tb.scalars(record, it)
        bar.set_postfix(logR=f"{record['reward_mean']:.3f}")
        bar.update(1)

    try:
        result = run_steps(trainer, iterations, on_step=on_step, checkpoints=checkpoints,
                           checkpoint_every=cfg.train.checkpoint_every, resume_hint=out_dir if verbose else None)
    finally:
        counter_ctx.__exit__(None, None, None)
        trainer.train_on = train_on
        bar.close()
        if log is not None:
            log.close()
    if not result.finished:
        tb.close()
        return None
    if not main:
        return None

    records = read_jsonl(out_dir / "metrics.jsonl")
    trained = [r for r in records if "transitions" in r]
    phases = sorted({k for r in records for k in r.get("seconds", {})})
    summary.update(
        iterations=iterations,
        reward_mean=records[-1]["reward_mean"],
        reward_std=records[-1]["reward_std"],
        reward_mean_first=records[0]["reward_mean"],
        eval_log_reward=evaluate(iterations),
        seconds_per_iteration={p: sum(r["seconds"].get(p, 0.0) for r in records) / len(records) for p in phases},
        trajectories_per_s=sum(r["trajectories_per_s"] for r in records) / len(records),
        passes_per_transition=trained[-1]["passes_per_transition"] if trained else {},
        passes_unit="trajectory" if trainer.per_trajectory else "transition",  # what one planned item is
        release_passes_per_transition=RELEASE_PASSES,
        peak_memory_bytes=max(r["peak_memory_bytes"] for r in records),
        world_size=dist.world_size,
    )
    if cfg.output.export_lora:
        summary["lora_dir"] = str(task.export_lora(out_dir / "lora"))
    tb.close()
    summary["total_seconds"] = time.perf_counter() - t_start
    write_json(out_dir / "metrics.json", summary)
    if verbose:
        _print_summary(summary, out_dir)
    return summary


def _print_summary(s: dict[str, Any], out_dir: Path) -> None:
    print(f"log R of sampled batches: {s['reward_mean_first']:.4f} (first iteration) -> {s['reward_mean']:.4f} (last)")
    if "eval_log_reward_pretrained" in s:
        print(f"log R on the evaluation grid: {s['eval_log_reward_pretrained']:.4f} (pretrained) -> "
              f"{s['eval_log_reward']:.4f} (fine-tuned)")
    print("seconds per iteration: " + ", ".join(f"{k} {v:.2f}" for k, v in s["seconds_per_iteration"].items()))
    if s["passes_per_transition"]:
        p, unit = s["passes_per_transition"], s["passes_unit"]
        release = " (nabla-GFlowNet release: 3 + 5 per transition)" if unit == "transition" else ""
        print(f"UNet passes per trained {unit}: {p.get('unet_forward', 0):.2f} forward + "
              f"{p.get('unet_backward', 0):.2f} backward{release}")
    print(f"outputs in {out_dir}")
