"""Shared helpers of the FLOP-accounting tests (imported as ``flops_common``): the tiny run config and a trainer
built from it, with the pass counters the SD run wraps around training."""

from __future__ import annotations

import torch

from fastnabla.flops.cli import build_run_config

# tiny-sd made smaller: 4 steps, 2 trajectories, 3 trained transitions each, one transition per micro-batch (so a
# terminal transition is a micro-batch of terminal transitions only, which skips a forward-looking UNet call)
FAST = [
    "sd.num_steps=4",
    "train.batch_size=2",
    "train.sample_batch_size=2",
    "train.micro_batch_size=1",
    "train.fl_batch_size=4",
    "train.transition_fraction=0.5",
    "train.device=cpu",
]


def tiny_run_config(*overrides: str):
    """The ``tiny-sd`` preset with :data:`FAST` and ``overrides``."""
    return build_run_config("tiny-sd", [*FAST, *overrides])


def build_tiny_trainer(cfg):
    """``(task, trainer)`` for ``cfg`` on the CPU, built as the run driver builds them."""
    from fastnabla.run.driver import build_trainer
    from fastnabla.tasks.sd.build import build_sd_task

    torch.manual_seed(cfg.seed)
    task = build_sd_task(cfg.sd, "cpu", seed=cfg.seed)
    return task, build_trainer(task, cfg)


def counted_per_item(counter, items: float, guidance_scale: float) -> dict[str, float]:
    """Counted passes per trained item in the layout of ``passes_per_transition`` (``fastnabla.tasks.sd.run``):
    samples per item, UNet samples divided by the CFG pair."""
    pair = 2 if guidance_scale != 1.0 else 1
    out = {}
    for net, v in counter.as_dict().items():
        for kind in ("forward", "backward"):
            value = v[f"{kind}_samples"] / (pair if net == "unet" else 1) / items
            if value:
                out[f"{net}_{kind}"] = value
    return out
