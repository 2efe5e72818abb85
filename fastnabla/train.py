"""``python -m fastnabla.train``: reward fine-tuning with nabla-GFlowNet.

With no arguments it runs the built-in default (the analytic ``gmm-default`` case) and writes its
outputs under ``runs/gmm-default``. Configuration layers, later wins::

    defaults  <-  --preset NAME  <-  --config FILE.yaml  <-  key.path=value overrides

Examples::

    python -m fastnabla.train
    python -m fastnabla.train --preset gmm-paper train.iterations=300
    python -m fastnabla.train --preset tiny-sd                     # Stable Diffusion end to end on a CPU
    python -m fastnabla.train --preset sd15-aesthetic --model /models/stable-diffusion-v1-5
    python -m fastnabla.train --config my.yaml method.td_lambda=0.9 output.dir=runs/lam09
    python -m fastnabla.train --help-config
    python -m fastnabla.train --resume runs/gmm-default          # continue a stopped run
    torchrun --nproc_per_node=2 -m fastnabla.train               # several processes (gloo on CPU)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from fastnabla.config.loader import ConfigError, build_config, describe, to_yaml
from fastnabla.config.presets import DEFAULT_PRESET, PRESETS, get_preset
from fastnabla.config.schema import RunConfig
from fastnabla.utils.io import prepare_run_dir


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastnabla.train",
        description="Reward fine-tuning of diffusion models with nabla-GFlowNet (residual nabla-DB).",
        epilog="Overrides: key.path=value (YAML values), e.g. train.iterations=300 gmm.reward.center=[1,2]",
    )
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    p.add_argument("--config", metavar="FILE", help="YAML config file (layered over the preset)")
    p.add_argument("--preset", default=None, help=f"named preset (default: {DEFAULT_PRESET})")
    p.add_argument("--method", metavar="NAME", help="training method (same as method.name=NAME)")
    p.add_argument(
        "--model", metavar="PATH", help="sd task: local pipeline directory or hub id (same as sd.model=PATH)"
    )
    p.add_argument("--out", metavar="DIR", help="output directory (same as output.dir=DIR)")
    p.add_argument(
        "--resume", metavar="DIR",
        help="continue the unfinished run in DIR from its latest checkpoint (its config.yaml, plus any overrides)",
    )
    p.add_argument("--list-presets", action="store_true", help="list presets and exit")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--help-config", action="store_true", help="list every config field with its help and exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    if args.list_presets:
        for name, (text, _) in PRESETS.items():
            print(f"{name:26s} {text}")
        return 0
    if args.help_config:
        for path, default, text in describe(RunConfig):
            print(f"{path:34s} {default:24s} {text}")
        return 0
    overrides = list(args.overrides) + ([f"output.dir={args.out}"] if args.out else [])
    overrides += [f"method.name={json.dumps(args.method)}"] if args.method else []
    overrides += [f"sd.model={json.dumps(args.model)}"] if args.model else []  # quoted: a path is a string
    if args.resume:
        if args.preset or args.config or args.out:
            print("error: --resume takes the run's own config.yaml; pass only key=value overrides", file=sys.stderr)
            return 2
        resume_dir = Path(args.resume)
        problem = _resume_problem(resume_dir)
        if problem:
            print(f"error: cannot resume {resume_dir}: {problem}", file=sys.stderr)
            return 2
        preset_name, yaml_path, preset = resume_dir.name, resume_dir / "config.yaml", None
        overrides.append(f"output.dir={resume_dir}")
    else:
        preset_name = args.preset or DEFAULT_PRESET
        yaml_path = args.config
        try:
            preset = get_preset(preset_name)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    try:
        cfg = build_config(RunConfig, preset, yaml_path, overrides)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0

    from fastnabla.training.distributed import init_distributed, shutdown_distributed

    if cfg.task == "gmm":
        from fastnabla.tasks.gmm.build import build_gmm_task
        from fastnabla.tasks.gmm.run import run_gmm as run  # heavy imports (matplotlib) only when running

        try:
            build_gmm_task(cfg)  # fail on inconsistent task settings before creating any output
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        device = "cpu"  # the analytic task's tensors are tiny
    else:
        from fastnabla.tasks.sd.run import run_sd as run

        device = cfg.train.device
    try:
        dist = init_distributed(device)
    except (RuntimeError, ValueError) as err:
        print(f"error: train.device: {err}", file=sys.stderr)
        return 2
    try:
        if args.resume:
            out_dir = Path(args.resume)
        else:
            out_dir = None
            if dist.is_main:
                out_dir = prepare_run_dir(cfg.output.dir.format(preset=preset_name), cfg.output.overwrite)
            out_dir = Path(dist.broadcast_object(str(out_dir)))
        try:
            metrics = run(cfg, out_dir, name=preset_name, resume=bool(args.resume), dist=dist)
        except (ConfigError, ValueError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"\ninterrupted: {out_dir} holds a partial metrics.jsonl and no metrics.json", file=sys.stderr)
            return 130
        return 0 if metrics is not None or not dist.is_main else 130
    finally:
        shutdown_distributed()


def _resume_problem(run_dir: Path) -> str | None:
    if not (run_dir / "config.yaml").is_file():
        return "no config.yaml there (not a run directory)"
    if (run_dir / "metrics.json").exists():
        return "the run is finished (metrics.json exists)"
    if not (run_dir / "checkpoints" / "latest").is_file():
        return "no checkpoint (checkpoints/latest) was written before it stopped"
    return None


if __name__ == "__main__":
    sys.exit(main())
