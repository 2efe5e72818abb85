"""``python -m fastnabla.compare.flow_prior``: the rectified-flow SDE with the exact velocity against the prior it
should reproduce, by step count (the discretisation error; docs/flow-matching.md).

Each step count builds the preset's task (``gmm-fm-default``: noise level, scheduler shift, mixture) with
``sampler.num_steps`` set, samples its pretrained sampler and scores the final states
(:func:`fastnabla.tasks.gmm.fm_prior.prior_fit`); the last row scores exact prior draws of the same sizes (the
sampling floor). Exit status 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from fastnabla.config.loader import build_config
from fastnabla.run.config import RunConfig
from fastnabla.run.presets import get_preset
from fastnabla.tasks.gmm.build import build_gmm_task
from fastnabla.tasks.gmm.fm_prior import prior_fit, prior_fit_table


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastnabla.compare.flow_prior", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="gmm-fm-default")
    p.add_argument("--steps", type=int, nargs="+", default=[20, 50, 100])
    p.add_argument("--samples", type=int, default=100_000, help="final states per seed for the mode weights")
    p.add_argument("--energy-samples", type=int, default=4000, help="samples per seed for the energy distance")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("overrides", nargs="*", metavar="key.path=value")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    try:
        for steps in args.steps:
            cfg = build_config(RunConfig, get_preset(args.preset), None,
                               [*args.overrides, f"sampler.num_steps={steps}"])
            task = build_gmm_task(cfg)
            level = getattr(task.mdp, "noise_level", None)
            label = f"{task.mdp.sampler}{'' if level is None else f' (noise level {level:.3g})'}, {steps} steps"
            rows.append(prior_fit(task, args.samples, args.energy_samples, args.seeds, label))
        rows.append(prior_fit(task, args.samples, args.energy_samples, args.seeds, "exact prior draws (floor)",
                              exact=True))
    except ValueError as err:  # ConfigError included
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(prior_fit_table(rows), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
