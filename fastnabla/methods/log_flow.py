"""The scalar log-flow network ``g_phi(x_s, s, c) -> R`` of the DB baselines (residual DB, DAG-DB).

Paper section 4.3: the flow of DAG-DB and residual DB is "a similar network [to the scaled-down SD UNet] but
without the U-Net decoding structure (since the desired output is a scalar)", its output layer initialised with
tiny weights. Here:

* vector states ``[B, d]`` (the analytic task): ``[x, fourier(s / T)] -> MLP -> 1``;
* image latents ``[B, C, H, W]`` (Stable Diffusion): a strided-conv encoder (3x3, stride 2, GroupNorm, SiLU per
  level) and a spatial mean, then the same MLP;
* prompt conditioning, when ``cond`` carries ``prompt_embeds`` ``[B, L, D]``: the token-mean embedding joins the
  MLP input.

The output layer starts at zero, so ``g = 0`` at initialisation: the log-flow starts at its forward-looking
baseline ``beta gamma_s log R(x_hat(x_s))``. The network belongs to the objective (the tasks' own flow networks
output gradients, not scalars); the trainer trains and checkpoints it with the policy.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from fastnabla.training.rng import derive_seed

Tensor = torch.Tensor


def _fourier(state: Tensor, num_states: int, freqs: Tensor, dtype: torch.dtype) -> Tensor:
    u = (state.to(dtype) / num_states)[:, None]  # [B, 1]
    ang = u * freqs.to(dtype)
    return torch.cat([u, ang.sin(), ang.cos()], dim=-1)


def _group_norm(channels: int) -> nn.GroupNorm:
    groups = math.gcd(channels, 8)
    return nn.GroupNorm(groups, channels)


class ScalarLogFlow(nn.Module):
    """``g_phi(x_s, s, c)``: one scalar per state ``[B]`` (fp32).

    Args:
        state_shape: shape of one state (``(d,)`` or ``(C, H, W)``).
        num_states: ``T`` (the time input is ``s / T`` for ``s = 0 .. T``).
        cond_dim: width of the prompt embeddings (0: unconditional).
        hidden, layers: the MLP.
        channels: conv encoder widths, image states only.
    """

    def __init__(
        self,
        state_shape: tuple[int, ...],
        num_states: int,
        cond_dim: int = 0,
        hidden: int = 128,
        layers: int = 3,
        channels: tuple[int, ...] = (64, 128, 256, 256),
        num_frequencies: int = 6,
    ):
        super().__init__()
        if len(state_shape) not in (1, 3):
            raise ValueError(f"ScalarLogFlow supports [d] or [C, H, W] states, got state shape {tuple(state_shape)}")
        self.num_states = num_states
        self.cond_dim = cond_dim
        self.register_buffer("freqs", math.pi * torch.arange(1, num_frequencies + 1, dtype=torch.float32))
        if len(state_shape) == 3:
            mods: list[nn.Module] = []
            prev = state_shape[0]
            for ch in channels:
                mods += [nn.Conv2d(prev, ch, 3, stride=2, padding=1), _group_norm(ch), nn.SiLU()]
                prev = ch
            self.encoder: nn.Module | None = nn.Sequential(*mods)
            features = prev
        else:
            self.encoder = None
            features = state_shape[0]
        width = features + 1 + 2 * num_frequencies + cond_dim
        mlp: list[nn.Module] = []
        for i in range(layers):
            mlp += [nn.Linear(width if i == 0 else hidden, hidden), nn.SiLU()]
        self.body = nn.Sequential(*mlp)
        self.head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor, state: Tensor, cond: Any = None) -> Tensor:
        x = x.float()
        h = x if self.encoder is None else self.encoder(x).mean(dim=(2, 3))  # [B, F]
        parts = [h, _fourier(state.to(x.device), self.num_states, self.freqs, x.dtype)]
        if self.cond_dim:
            if not isinstance(cond, dict) or "prompt_embeds" not in cond:
                raise ValueError("this flow network is prompt-conditioned: cond must carry 'prompt_embeds' [B, L, D]")
            parts.append(cond["prompt_embeds"].to(device=x.device, dtype=x.dtype).mean(dim=1))
        return self.head(self.body(torch.cat(parts, dim=-1))).squeeze(-1)


def _cond_dim(cond: Any) -> int:
    if isinstance(cond, dict) and isinstance(cond.get("prompt_embeds"), Tensor):
        return int(cond["prompt_embeds"].shape[-1])
    return 0


def build_log_flow(task, hidden: int, layers: int, channels: list[int], seed: int = 0) -> ScalarLogFlow:
    """The scalar flow for ``task`` (state shape, steps and prompt width read from the task), on its device.

    The weights are drawn from ``seed`` without touching the global RNG; the task's probing draws use their own
    generator too.
    """
    probe = torch.Generator().manual_seed(0)
    x = task.initial_noise(1, probe)
    cond = task.sample_conditions(1, probe)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "scalar-log-flow-init"))
        net = ScalarLogFlow(
            tuple(x.shape[1:]), task.mdp.num_steps, _cond_dim(cond), hidden, layers, tuple(channels)
        )
    return net.to(x.device).float().train()
