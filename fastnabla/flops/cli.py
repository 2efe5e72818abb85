"""``python -m fastnabla.flops``: FLOPs per trained transition and per sampled trajectory of a run config.

Examples::

    python -m fastnabla.flops --preset sd15-aesthetic                       # table: ours vs the release's layout
    python -m fastnabla.flops --preset sd15-hpsv2 --json                    # one JSON object
    python -m fastnabla.flops --preset sd15-aesthetic method.fl_noise_var=0.002 method.fl_num_noise=3  # smoothing
    python -m fastnabla.flops --preset sd15-aesthetic --method ddpo
    python -m fastnabla.flops --preset sd15-aesthetic --arch sdxl --resolution 1024
    python -m fastnabla.flops --preset flux-dev-aesthetic                   # the flow task: SD3.5 / FLUX transformers

The config is built exactly as ``python -m fastnabla.train`` builds it (defaults <- preset <- YAML <- overrides);
the networks are the real architectures of ``--arch`` (default: what ``sd.model`` points at; shipped configs for
SD 1.5 and SDXL, no weights, no files, no hub) on the meta device. Takes seconds (most of it importing diffusers).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

DEFAULT_PRESET = "sd15-aesthetic"


def build_run_config(preset: str, overrides: Sequence[str] = (), config: str | None = None) -> Any:
    """The ``RunConfig`` of ``preset`` + ``config`` (YAML) + ``key.path=value`` overrides, validated."""
    from fastnabla.config.loader import build_config
    from fastnabla.run.config import RunConfig
    from fastnabla.run.presets import get_preset

    return build_config(RunConfig, get_preset(preset), config, list(overrides))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastnabla.flops",
        description="FLOPs per trained transition (policy / pretrained UNet forward and backward, VAE decoder, reward, "
                    "flow) and per sampled trajectory of a Stable Diffusion run config, and of the authors' release's "
                    "layout, counted with torch's FlopCounterMode on the meta device (docs/flops.md).",
        epilog="Overrides: key.path=value as for python -m fastnabla.train, e.g. method.fl_num_noise=1 sd.num_steps=20",
    )
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    p.add_argument("--preset", default=DEFAULT_PRESET, help=f"named preset (default: {DEFAULT_PRESET})")
    p.add_argument("--config", metavar="FILE", help="YAML config file (layered over the preset)")
    p.add_argument("--method", metavar="NAME", help="training method (same as method.name=NAME)")
    p.add_argument("--arch", metavar="ARCH",
                   help="sd15 | sdxl | tiny | tiny-sdxl | a local diffusers pipeline directory (default: from "
                        "sd.model); flow task: sd35-medium | flux-dev | tiny-sd3 | tiny-flux | a local SD3 / FLUX "
                        "pipeline directory (default: from flow.model)")
    p.add_argument("--resolution", type=int, metavar="PX",
                   help="image side in pixels (default: sd.resolution, else the UNet's native size)")
    p.add_argument("--iteration", type=int, default=None, metavar="N",
                   help="training pass whose plan decides plan-dependent passes (default: the first in the steady "
                        "state: 2, the first that trains, or k + 1 with train.replay_batches=k)")
    p.add_argument("--no-release", action="store_true", help="leave out the release's layout")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    from fastnabla.config.fields import ConfigError
    from fastnabla.flops.report import flop_report, format_table

    overrides = list(args.overrides) + ([f"method.name={json.dumps(args.method)}"] if args.method else [])
    try:
        cfg = build_run_config(args.preset, overrides, args.config)
        if cfg.task not in ("sd", "flow"):
            raise ValueError(f"--preset {args.preset}: task={cfg.task!r}; FLOP accounting covers the sd task and the "
                             "flow task")
        if args.iteration is not None and args.iteration < 2:
            raise ValueError(f"--iteration {args.iteration}: the first training pass is iteration 2")
        if cfg.task == "sd":
            from fastnabla.tasks.digits.run import is_digits_model, prepare_digits_config

            if is_digits_model(cfg.sd.model):  # the digits pipeline's directory (built on demand, as a run does)
                prepare_digits_config(cfg, progress=True)
        report = flop_report(cfg, args.arch, args.resolution, args.iteration, release=not args.no_release)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = {"preset": args.preset, "overrides": overrides, **report}
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=False))
    else:
        print(format_table(report, f"of {args.preset} "))
    return 0
