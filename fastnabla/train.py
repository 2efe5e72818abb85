"""``python -m fastnabla.train``: reward fine-tuning with nabla-GFlowNet (and the baselines).

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

Exit status: 0 finished; 2 bad input (the field or path named, nothing written); 3 the run diverged (why is in
``metrics.json``); 130 stopped by SIGTERM/SIGINT (continue with ``--resume``). This module imports torch only
once a run starts, so ``--help`` and config errors answer at once.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastnabla.run.config import RunConfig
    from fastnabla.training.distributed import DistContext

DEFAULT_PRESET = "gmm-default"
# Keys an override may change when resuming: how long, how often, how fast, what is logged. Anything else would
# not fit the checkpoint (network shapes, batch layout) or would silently change what the run means.
RESUME_MAY_CHANGE = (
    "train.iterations", "train.checkpoint_every", "train.keep_checkpoints", "train.max_skipped_updates",
    "train.device", "train.sample_batch_size", "train.micro_batch_size", "train.fl_batch_size", "threads",
    "optim.lr_policy", "optim.lr_flow", "optim.grad_clip_policy", "optim.grad_clip_flow", "method.fl_chunk_size",
    "eval.", "output.progress", "output.figure", "output.tensorboard", "output.report_to", "output.wandb_project",
    "output.export_lora", "output.push_to_hub", "output.hub_private", "sd.speed.", "sd.memory.",
    "sd.reward.chunk_size", "flow.speed.", "flow.reward.chunk_size",
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastnabla.train",
        description="Reward fine-tuning of diffusion models with nabla-GFlowNet (residual nabla-DB).",
        epilog="Overrides: key.path=value (YAML values), e.g. train.iterations=300 gmm.reward.center=[1,2]. "
               "Exit status: 0 done, 2 bad input, 3 diverged, 130 stopped (resumable).",
    )
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    p.add_argument("--config", metavar="FILE", help="YAML config file (layered over the preset)")
    p.add_argument("--preset", default=None, help=f"named preset (default: {DEFAULT_PRESET})")
    p.add_argument("--method", metavar="NAME", help="training method (same as method.name=NAME)")
    p.add_argument(
        "--model", metavar="PATH",
        help="sd / flow task: local pipeline directory or hub id (same as sd.model=PATH; flow.model=PATH when the "
             "preset's task is flow)"
    )
    p.add_argument("--out", metavar="DIR", help="output directory (same as output.dir=DIR)")
    p.add_argument("--init-lora", metavar="PATH",
                   help="sd task: start the policy from this diffusers-format LoRA (pytorch_lora_weights.safetensors "
                        "or its directory; same as sd.lora.init=PATH)")
    p.add_argument("--push-to-hub", metavar="REPO",
                   help="sd task: upload the exported LoRA and its model card to this hub repository at the end "
                        "(same as output.push_to_hub=REPO; needs a reachable hub)")
    p.add_argument("--report-to", metavar="LIST",
                   help="comma-separated trackers, e.g. tensorboard,wandb (same as output.report_to=[...])")
    p.add_argument(
        "--resume", metavar="DIR",
        help="continue the unfinished run in DIR from its latest checkpoint (its config.yaml, plus overrides of "
             "how long / how often / how fast)",
    )
    p.add_argument("--list-presets", action="store_true", help="list presets and exit")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--help-config", action="store_true", help="list every config field with its help and exit")
    return p


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    from fastnabla.config.loader import ConfigError, build_config, describe, parse_override, to_yaml
    from fastnabla.run.config import RunConfig
    from fastnabla.run.presets import PRESETS, get_preset

    if args.list_presets:
        for name, (text, _) in PRESETS.items():
            print(f"{name:26s} {text}")
        return 0
    if args.help_config:
        for path, default, text in describe(RunConfig):
            print(f"{path:34s} {default:24s} {text}")
        return 0
    overrides = list(args.overrides) + ([f"output.dir={json.dumps(args.out)}"] if args.out else [])
    overrides += [f"method.name={json.dumps(args.method)}"] if args.method else []
    model_key = "flow.model" if (args.preset and args.preset in PRESETS
                                 and PRESETS[args.preset][1].get("task") == "flow") else "sd.model"
    overrides += [f"{model_key}={json.dumps(args.model)}"] if args.model else []  # quoted: a path is a string
    section = model_key.split(".")[0]  # flow presets: --model / --init-lora set flow.*
    overrides += [f"{section}.lora.init={json.dumps(args.init_lora)}"] if args.init_lora else []
    overrides += [f"output.push_to_hub={json.dumps(args.push_to_hub)}"] if args.push_to_hub else []
    if args.report_to is not None:
        overrides.append(f"output.report_to={json.dumps([r.strip() for r in args.report_to.split(',') if r.strip()])}")
    resume_dir = Path(args.resume) if args.resume else None
    try:
        if resume_dir is not None:
            if args.preset or args.config or args.out or args.init_lora:
                return _error("--resume takes the run's own config.yaml; pass only key=value overrides")
            problem = _resume_problem(resume_dir)
            if problem:
                return _error(f"cannot resume {resume_dir}: {problem}")
            for text in overrides:
                key = text.split("=", 1)[0].strip()
                if not any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_MAY_CHANGE):
                    parse_override(text)  # a malformed override gets its own message first
                    return _error(f"--resume: {key} cannot change when a run is resumed (it would not fit the "
                                  f"checkpoint or would change what the run is); keys that may: "
                                  f"{', '.join(RESUME_MAY_CHANGE)}")
            own_dir = f"output.dir={json.dumps(str(resume_dir))}"
            cfg = build_config(RunConfig, None, resume_dir / "config.yaml", [*overrides, own_dir])
            if not cfg.name:
                cfg.name = resume_dir.name  # runs written before config.yaml held the name
        else:
            preset_name = args.preset or DEFAULT_PRESET
            cfg = build_config(RunConfig, get_preset(preset_name), args.config, overrides)
            if not cfg.name:
                cfg.name = preset_name
    except (ConfigError, ValueError) as err:
        return _error(str(err))
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    command = " ".join(["python -m fastnabla.train", *(shlex.quote(a) for a in (argv if argv is not None
                                                                              else sys.argv[1:]))])
    return _run(cfg, resume_dir, command)


def print_memory_estimate(cfg: RunConfig, dist: DistContext) -> None:
    """Before an sd run on CUDA, or when ``train.vram_budget_gb`` asks for a verdict: one line with the meta-device
    memory estimate (:func:`fastnabla.flops.memory_estimate.startup_line`; a few seconds, so not on a plain CPU run).
    A failing estimate only warns."""
    if cfg.task != "sd" or not (dist.device.type == "cuda" or cfg.train.vram_budget_gb > 0):
        return
    from fastnabla.tasks.digits.run import is_digits_model

    if is_digits_model(cfg.sd.model):
        return
    try:
        from fastnabla.flops.memory_estimate import startup_line

        line = startup_line(cfg, dist.device.type == "cuda", dist.world_size)
    except Exception as err:  # noqa: BLE001 -- an estimate never stops a run
        line = f"warning: no memory estimate ({type(err).__name__}: {err})"
    print(f"{cfg.name}: {line}", file=sys.stderr)


def _run(cfg, resume_dir: Path | None, command: str | None = None) -> int:
    from fastnabla.config.loader import ConfigError
    from fastnabla.run.driver import EXIT_STOPPED, run_training
    from fastnabla.training.distributed import init_distributed, shutdown_distributed

    try:
        dist = init_distributed("cpu" if cfg.task == "gmm" else cfg.train.device)
    except (RuntimeError, ValueError) as err:
        return _error(f"train.device: {err}")
    try:
        outcome = run_training(cfg, resume_dir=resume_dir, dist=dist, command=command,
                               before_start=print_memory_estimate)
        return outcome.exit_code
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError) as err:
        return _error(str(err))
    except KeyboardInterrupt:
        print("\ninterrupted: the run directory holds a partial metrics.jsonl and no metrics.json", file=sys.stderr)
        return EXIT_STOPPED
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
