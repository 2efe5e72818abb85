"""``python -m fastnabla.train``: reward fine-tuning with nabla-GFlowNet.

With no arguments it runs the built-in default (the analytic ``gmm-default`` case) and writes its
outputs under ``runs/gmm-default``. Configuration layers, later wins::

    defaults  <-  --preset NAME  <-  --config FILE.yaml  <-  key.path=value overrides

Examples::

    python -m fastnabla.train
    python -m fastnabla.train --preset gmm-paper train.iterations=300
    python -m fastnabla.train --config my.yaml method.td_lambda=0.9 output.dir=runs/lam09
    python -m fastnabla.train --help-config
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

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
    p.add_argument("--out", metavar="DIR", help="output directory (same as output.dir=DIR)")
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
    preset_name = args.preset or DEFAULT_PRESET
    overrides = list(args.overrides) + ([f"output.dir={args.out}"] if args.out else [])
    try:
        cfg = build_config(RunConfig, get_preset(preset_name), args.config, overrides)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0

    from fastnabla.tasks.gmm.build import build_gmm_task
    from fastnabla.tasks.gmm.run import run_gmm  # heavy imports (matplotlib) only when running

    try:
        build_gmm_task(cfg)  # fail on inconsistent task settings before creating any output
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out_dir = prepare_run_dir(cfg.output.dir.format(preset=preset_name), cfg.output.overwrite)
    try:
        run_gmm(cfg, out_dir, name=preset_name)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: {out_dir} holds a partial metrics.jsonl and no metrics.json", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
