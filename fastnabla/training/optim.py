"""Optimizers of the trainer: Adam/AdamW (torch) or 8-bit AdamW (bitsandbytes), separate parameter
groups for the policy and the flow, per-group gradient clipping, constant or cosine learning rate.
The options (:class:`~fastnabla.training.config.OptimOptions`) live in :mod:`fastnabla.training.config`."""

from __future__ import annotations

import math

import torch

from fastnabla.training.config import OptimOptions


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
