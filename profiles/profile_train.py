"""Profile training iterations of any preset (default: the analytic gmm-default task).

    python profiles/profile_train.py [--preset gmm-default] [key.path=value ...] [--iterations 5] [--warmup 2]
                                     [--out profiles/out] [--tool auto|torch|nsys] [--threads N] [--batch-size N]
    python profiles/profile_train.py --preset tiny-sd --iterations 2        # Stable Diffusion (tiny, CPU)
    python profiles/profile_train.py --preset sd15-aesthetic sd.model=/models/sd15 --tool nsys   # on a GPU

The trainer is built exactly as ``python -m fastnabla.train`` builds it for that preset and overrides.

``--tool auto`` (default) records with Nsight Systems when ``nsys`` is on PATH: the script runs
itself again under ``nsys profile -t cuda,nvtx,osrt`` (on CUDA only the iterations after the
warm-up are captured, through ``cudaProfilerStart/Stop``), then writes ``nsys stats`` tables.
Otherwise it uses ``torch.profiler`` (CPU activities, plus CUDA when available).

Outputs in ``--out``: ``trace.json`` (chrome trace: chrome://tracing or https://ui.perfetto.dev),
``top_ops.txt`` (``key_averages`` sorted by self CPU time, and by self CUDA time on a GPU),
``summary.md`` (machine, seconds per iteration, top ops, annotated ranges); with nsys:
``train.nsys-rep`` (open in the Nsight Systems GUI) and ``nsys_stats*.csv``.

The first ``trainer.step()`` only samples (it trains on the previous batch), so keep
``--warmup >= 2`` for the recorded iterations to be full ones.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from fastnabla.utils.profiling import PhaseTimer, machine_info, nvtx_range

INNER_ENV = "FASTNABLA_PROFILE_UNDER_NSYS"


def build_trainer(preset: str, overrides: list[str], iterations: int):
    """The trainer ``python -m fastnabla.train --preset PRESET OVERRIDES`` would run (same builders)."""
    from fastnabla.config.loader import build_config
    from fastnabla.run.config import RunConfig
    from fastnabla.run.driver import build_task_run
    from fastnabla.run.driver import build_trainer as build_run_trainer
    from fastnabla.run.presets import get_preset
    from fastnabla.training.distributed import init_distributed

    cfg = build_config(RunConfig, get_preset(preset), None, [*overrides, f"train.iterations={iterations}"])
    dist = init_distributed("cpu" if cfg.task == "gmm" else cfg.train.device)
    run = build_task_run(cfg, dist)
    return build_run_trainer(run.task, cfg, dist, PhaseTimer()), cfg


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed_steps(trainer, count: int, timer: PhaseTimer, label: str, wrap) -> list[float]:
    seconds = []
    for i in range(count):
        start = time.perf_counter()
        with wrap(f"iteration {i}" if label == "trainer.step" else f"{label} {i}"), timer.phase(label):
            trainer.step()
            _sync()
        seconds.append(time.perf_counter() - start)
    return seconds


def _ops_markdown(events, key: str, limit: int = 15) -> list[str]:
    total = sum(getattr(e, key) for e in events) or 1.0
    top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:limit]
    lines = ["| op | calls | self (ms) | self % | total (ms) |", "|---|---:|---:|---:|---:|"]
    for e in top:
        total_key = "cpu_time_total" if "cpu" in key else "device_time_total"
        lines.append(
            f"| `{e.key}` | {e.count} | {getattr(e, key) / 1e3:.1f} | {100 * getattr(e, key) / total:.1f} | "
            f"{getattr(e, total_key) / 1e3:.1f} |"
        )
    return lines


def _header(args, seconds: list[float], tool: str) -> list[str]:
    info = machine_info()
    mean = statistics.mean(seconds)
    t = args.cfg.train
    steps = args.cfg.sampler.num_steps if args.cfg.task == "gmm" else args.cfg.sd.num_steps
    return [
        f"# Profile of {args.iterations} training iterations (preset {args.preset}, {tool})",
        "",
        f"- machine: {info['cpu']}, {info['cpu_cores']} cores, torch threads {torch.get_num_threads()}, "
        f"GPU: {info['gpu']}; torch {info['torch']}",
        f"- batch {t.batch_size} trajectories x {steps} steps, {100 * t.transition_fraction:.0f}% of transitions "
        f"trained, warm-up {args.warmup}; overrides: {' '.join(args.overrides) or 'none'}",
        f"- seconds per iteration: mean {mean:.3f}, median {statistics.median(seconds):.3f}, "
        f"min {min(seconds):.3f}, max {max(seconds):.3f}",
        "",
    ]


def run_torch(args, trainer) -> None:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    timer = PhaseTimer()
    _timed_steps(trainer, args.warmup, timer, "warmup step", record_function)
    with profile(activities=activities, record_shapes=args.shapes) as prof:
        seconds = _timed_steps(trainer, args.iterations, timer, "trainer.step", record_function)
    prof.export_chrome_trace(str(args.out / "trace.json"))
    events = list(prof.key_averages())
    tables = [prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)]
    if torch.cuda.is_available():
        tables.append(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30))
    (args.out / "top_ops.txt").write_text("\n\n".join(tables))

    ops = [e for e in events if "::" in e.key]
    skip = r"Backward\d*$|^ProfilerStep|^iteration \d+$"  # autograd nodes, per-iteration rows
    ranges = [e for e in events if "::" not in e.key and not re.search(skip, e.key)]
    lines = _header(args, seconds, "torch.profiler")
    lines += ["## Top ops by self CPU time", "", *_ops_markdown(ops, "self_cpu_time_total"), ""]
    if torch.cuda.is_available():
        lines += ["## Top ops by self CUDA time", "", *_ops_markdown(ops, "self_device_time_total"), ""]
    lines += ["## Annotated ranges (record_function / nvtx_range) by total CPU time", ""]
    lines += ["| range | calls | total (ms) |", "|---|---:|---:|"]
    for e in sorted(ranges, key=lambda e: e.cpu_time_total, reverse=True)[:15]:
        lines.append(f"| `{e.key}` | {e.count} | {e.cpu_time_total / 1e3:.1f} |")
    lines += ["", "## Wall time per phase (perf_counter)", "", timer.table(), ""]
    (args.out / "summary.md").write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {args.out / 'trace.json'}, {args.out / 'top_ops.txt'}, {args.out / 'summary.md'}")


def run_under_nsys(args, trainer) -> None:
    """Inner run (already under nsys): NVTX ranges; on CUDA, capture only the measured iterations."""
    timer = PhaseTimer()
    _timed_steps(trainer, args.warmup, timer, "warmup step", nvtx_range)
    if torch.cuda.is_available():
        torch.cuda.profiler.start()
    seconds = _timed_steps(trainer, args.iterations, timer, "trainer.step", nvtx_range)
    if torch.cuda.is_available():
        torch.cuda.profiler.stop()
    lines = _header(args, seconds, "Nsight Systems") + ["## Wall time per phase", "", timer.table(), ""]
    (args.out / "summary.md").write_text("\n".join(lines))
    print("\n".join(lines))


def launch_nsys(args, argv: list[str]) -> int:
    """Run this script again under ``nsys profile``, then export summary tables with ``nsys stats``."""
    report = args.out / "train"
    cmd = ["nsys", "profile", "-t", "cuda,nvtx,osrt", "-o", str(report), "--force-overwrite=true"]
    if torch.cuda.is_available():
        cmd += ["--capture-range=cudaProfilerApi", "--capture-range-end=stop"]
    cmd += [sys.executable, str(Path(__file__).resolve()), *argv]
    print("+", " ".join(cmd), flush=True)
    rc = subprocess.run(cmd, env={**os.environ, INNER_ENV: "1"}).returncode
    rep = report.with_suffix(".nsys-rep")
    if rc == 0 and rep.exists():
        reports = "nvtx_sum,osrt_sum" + (",cuda_gpu_kern_sum,cuda_api_sum" if torch.cuda.is_available() else "")
        stats = ["nsys", "stats", "-r", reports, "-f", "csv", "-o", str(args.out / "nsys_stats"), str(rep)]
        print("+", " ".join(stats), flush=True)
        subprocess.run(stats)
        print(f"open {rep} in the Nsight Systems GUI")
    return rc


def parse_args(argv: list[str]):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=5, help="recorded iterations")
    p.add_argument("--warmup", type=int, default=2, help="unrecorded iterations first (>= 2: see docstring)")
    p.add_argument("--preset", default="gmm-default", help="preset to profile (as python -m fastnabla.train)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    p.add_argument("--batch-size", type=int, default=None, help="trajectories per iteration (train.batch_size)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out", help="output folder")
    p.add_argument("--tool", choices=("auto", "torch", "nsys"), default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--shapes", action="store_true", help="record input shapes (torch.profiler)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_intermixed_args(argv)
    if args.batch_size is not None:
        args.overrides.append(f"train.batch_size={args.batch_size}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    inner = os.environ.get(INNER_ENV) == "1"
    nsys = shutil.which("nsys") is not None
    if args.tool == "nsys" and not nsys and not inner:
        print("--tool nsys: `nsys` is not on PATH (install Nsight Systems, or use --tool torch)", file=sys.stderr)
        return 2
    if not inner and (args.tool == "nsys" or (args.tool == "auto" and nsys)):
        return launch_nsys(args, argv)
    trainer, args.cfg = build_trainer(args.preset, args.overrides, args.warmup + args.iterations)
    if not args.threads and args.cfg.threads:
        torch.set_num_threads(args.cfg.threads)  # as python -m fastnabla.train does
    if inner:
        run_under_nsys(args, trainer)
    else:
        run_torch(args, trainer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
