"""Optimizers of the trainer: Adam/AdamW (torch) or 8-bit AdamW (bitsandbytes), separate parameter
groups for the policy and the flow, per-group gradient clipping, constant or cosine learning rate."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

OPTIMIZERS = ("adam", "adamw", "adamw8bit")


def _help(text: str, **kw) -> dict:
    return {"metadata": {"help": text}, **kw}


@dataclass
class OptimOptions:
    """Optimizer settings (separate groups for policy and flow)."""

    optimizer: str = field(
        default="adam", **_help("'adam', 'adamw' or 'adamw8bit' (bitsandbytes 8-bit states; needs bitsandbytes)")
    )
    lr_policy: float = field(default=1e-3, **_help("learning rate of the policy (residual / LoRA)"))
    lr_flow: float = field(default=1e-3, **_help("learning rate of the flow network g_phi"))
    betas: tuple[float, float] = field(default=(0.9, 0.999), **_help("Adam betas"))
    weight_decay: float = field(default=0.0, **_help("weight decay (AdamW: decoupled)"))
    eps: float = field(default=1e-8, **_help("Adam epsilon"))
    grad_clip_policy: float = field(default=1.0, **_help("max grad norm of the policy (0: off)"))
    grad_clip_flow: float = field(default=1.0, **_help("max grad norm of the flow (0: off)"))
    lr_schedule: str = field(default="constant", **_help("'constant' or 'cosine' (decay to lr_min_ratio)"))
    lr_min_ratio: float = field(default=0.1, **_help("final lr / initial lr of the cosine schedule"))

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optim.optimizer={self.optimizer!r} is not one of {OPTIMIZERS}")
        for name in ("lr_policy", "lr_flow", "eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"optim.{name} must be > 0, got {getattr(self, name)}")
        for name in ("weight_decay", "grad_clip_policy", "grad_clip_flow"):
            if getattr(self, name) < 0:
                raise ValueError(f"optim.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"optim.lr_schedule={self.lr_schedule!r} is not one of ('constant', 'cosine')")
        if not 0 <= self.lr_min_ratio <= 1:
            raise ValueError(f"optim.lr_min_ratio must be in [0, 1], got {self.lr_min_ratio}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")


def _adamw8bit():
    try:
        from fastnabla.compat import prepare_third_party_imports

        prepare_third_party_imports()
        import bitsandbytes as bnb
    except ImportError as err:
        raise RuntimeError(
            "optim.optimizer='adamw8bit' needs bitsandbytes: pip install 'fastnabla[sd]' (or use 'adamw')"
        ) from err
    return bnb.optim.AdamW8bit


def build_optimizer(
    policy_params: list[torch.nn.Parameter], flow_params: list[torch.nn.Parameter], opts: OptimOptions
) -> torch.optim.Optimizer:
    """One optimizer, a parameter group per network (empty groups dropped)."""
    groups = [
        {"params": policy_params, "lr": opts.lr_policy, "name": "policy"},
        {"params": flow_params, "lr": opts.lr_flow, "name": "flow"},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("nothing to train: the task has no trainable parameters")
    kw = {"betas": tuple(opts.betas), "weight_decay": opts.weight_decay, "eps": opts.eps}
    if opts.optimizer == "adamw8bit":
        return _adamw8bit()(groups, **kw)
    cls = torch.optim.AdamW if opts.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, **kw)


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, opts: OptimOptions, total_updates: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-update multiplier: constant, or cosine from 1 to ``lr_min_ratio`` over ``total_updates``."""
    if opts.lr_schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, _constant)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _Cosine(opts.lr_min_ratio, total_updates))


def _constant(i: int) -> float:
    return 1.0


class _Cosine:
    """Picklable cosine multiplier (LambdaLR state dicts keep callable objects' ``__dict__``)."""

    def __init__(self, floor: float, total: int):
        self.floor, self.total = floor, max(total, 1)

    def __call__(self, i: int) -> float:
        u = min(i / self.total, 1.0)
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * u))


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip ``params``' gradient norm to ``max_norm`` (0: no clipping); returns the norm before clipping."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
