"""What a flow-matching training run adds to the shared driver: the Stable Diffusion run's evaluation grids, pass
counters and LoRA export (:class:`fastnabla.tasks.sd.run.SDRun`), on the SD3 / FLUX task.

Outputs as the sd task's: ``samples/*.png`` (evaluation grids sampled with the training SDE), ``eval_pretrained.json``,
``lora/`` (loadable by ``StableDiffusion3Pipeline`` / ``FluxPipeline``), and ``metrics.jsonl`` with transformer /
VAE / reward / flow passes per trained transition.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fastnabla.tasks.flow.build import build_flow_task
from fastnabla.tasks.sd.counters import PassCounter
from fastnabla.tasks.sd.run import SDRun

if TYPE_CHECKING:
    from fastnabla.run.config import RunConfig
    from fastnabla.training.distributed import DistContext


class TransformerPassCounter:
    """Network passes during training passes only (a trainer observer): transformer, VAE decoder, flow, reward.

    Counted in samples per trained transition; a CFG pair call on ``B`` latents counts ``B`` transformer passes.
    """

    def __init__(self, task, world_size: int = 1):
        self.task, self.world_size = task, world_size
        self.counter = PassCounter()
        self.counter.watch_module("transformer", task.transformer)
        self.counter.watch_module("vae_decoder", task.vae.decoder)
        self.counter.watch_module("flow", task.flow_net)
        self.counter.watch_method("reward", task.reward.model, "score")
        self.passes: dict[str, float] = {}

    def before_train(self) -> None:
        self.counter.reset()

    def after_train(self, stats: dict[str, Any]) -> None:
        per = self.counter.per(max(int(stats["transitions"] // self.world_size), 1))
        pair = 2 if self.task.guided else 1
        for net, v in per.items():
            for kind in ("forward", "backward"):
                self.passes[f"{net}_{kind}"] = v[f"{kind}_samples"] / (pair if net == "transformer" else 1)
        stats["passes_per_transition"] = dict(self.passes)

    def close(self) -> None:
        self.counter.close()


class FlowRun(SDRun):
    """The SD3 / FLUX task of ``cfg.flow`` with the sd task's evaluation grids and LoRA export."""

    def __init__(self, cfg: RunConfig, dist: DistContext):
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.task = build_flow_task(cfg.flow, dist.device, seed=cfg.seed)
        self.counter = TransformerPassCounter(self.task, dist.world_size)
        self.observers = [self.counter]
        self.eval_prompts = self.task.default_eval_prompts
        self.eval_seeds = list(cfg.flow.prompts.eval_seeds)
        self.images: list = []
        self.pretrained: dict[str, float] = {}

    def summary(self, s: dict[str, Any], out_dir: Path) -> str:
        text = super().summary(s, out_dir)
        p = s.get("passes_per_transition") or {}
        line = (f"transformer passes per trained {s['passes_unit']}: {p.get('transformer_forward', 0):.2f} forward + "
                f"{p.get('transformer_backward', 0):.2f} backward")
        return "\n".join(line if t.startswith("UNet passes") else t for t in text.splitlines())
