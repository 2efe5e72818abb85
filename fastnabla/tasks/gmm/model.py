"""The analytic task: exact mixture prior + zero-initialised residual network (the LoRA analogue).

``eps_theta(x, t) = eps*(x, abar_t) + r_theta(x, t)`` with ``r_theta`` an MLP whose last layer
starts at zero, so fine-tuning starts exactly at the pretrained sampler. The flow ``g_phi`` is a
second MLP, also zero at initialisation. Optionally its output is preconditioned into
"epsilon units" (``output_scale="eps"``): ``g = |b_{s-1}| / sigma_{s-1}^2 * net(x, s)``, the factor
that turns an eps-residual into a score at the step that produced state ``s``, optionally capped
(``flow_output_cap``): the factor is ~1.2 for most states but reaches ~400 at the last ones, where
the true residual flow is ~0 and the uncapped factor magnifies every wobble of the network.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from fastnabla.mdp.schedule import DenoisingMDP
from fastnabla.tasks.gmm.mixture import GaussianMixture
from fastnabla.tasks.gmm.rewards import AnalyticReward

Tensor = torch.Tensor


class TimeConditionedMLP(nn.Module):
    """``[x, fourier(s / T)] -> MLP -> out``; the output layer is zero-initialised."""

    def __init__(self, dim: int, hidden: int, layers: int, num_states: int, num_frequencies: int = 6):
        super().__init__()
        self.num_states = num_states
        self.register_buffer("freqs", math.pi * torch.arange(1, num_frequencies + 1, dtype=torch.float32))
        width_in = dim + 1 + 2 * num_frequencies
        mods: list[nn.Module] = []
        for i in range(layers):
            mods += [nn.Linear(width_in if i == 0 else hidden, hidden), nn.SiLU()]
        self.body = nn.Sequential(*mods)
        self.head = nn.Linear(hidden, dim)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor, index: Tensor) -> Tensor:
        u = (index.to(x.dtype) / self.num_states)[:, None]  # [B, 1]
        ang = u * self.freqs.to(x.dtype)
        h = torch.cat([x, u, ang.sin(), ang.cos()], dim=-1)
        return self.head(self.body(h))


class GMMTask(nn.Module):
    """Analytic benchmark implementing :class:`fastnabla.training.interface.DiffusionTask`."""

    def __init__(
        self,
        prior: GaussianMixture,
        reward: AnalyticReward,
        beta: float,
        mdp: DenoisingMDP,
        hidden: int = 128,
        layers: int = 3,
        flow_output_scale: str = "eps",
        flow_output_cap: float = float("inf"),
    ):
        super().__init__()
        if not mdp.stochastic.all():
            raise ValueError(
                "the analytic task needs sigma_t > 0 on every step (the last step of this sampler "
                "is deterministic); use DDIM with set_alpha_to_one=False or DDPM fixed_large"
            )
        if flow_output_scale not in ("eps", "none"):
            raise ValueError(f"flow_output_scale must be 'eps' or 'none', got {flow_output_scale!r}")
        self.mdp = mdp
        self.data_prior = prior
        # The terminal state carries abar_T < 1: the pretrained sampler targets the mixture noised to
        # abar_T, and the closed-form target is that mixture tilted by R^beta.
        self.prior = prior.noised(mdp.alpha_bar_terminal)
        self.reward = reward
        self.beta = float(beta)
        self.target = reward.tilt(self.prior, self.beta)
        d = prior.dim
        self.residual = TimeConditionedMLP(d, hidden, layers, mdp.num_steps)
        self.flow_net = TimeConditionedMLP(d, hidden, layers, mdp.num_steps)
        ab = mdp.alpha_bar.float()
        self.register_buffer("alpha_bar", ab)
        self.register_buffer("state_alpha_bar", torch.cat([ab, ab.new_ones(1)]))
        # eps -> score factor of the step that produced each state (state 0 uses step 0)
        factor = (mdp.b.abs() / mdp.sigma**2).clamp(max=flow_output_cap).float()
        factor = torch.cat([factor[:1], factor]) if flow_output_scale == "eps" else torch.ones(mdp.num_steps + 1)
        self.register_buffer("flow_scale", factor)

    # --- DiffusionTask -------------------------------------------------------------------------
    def initial_noise(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.randn(n, self.prior.dim, generator=generator, dtype=self.residual.head.weight.dtype)

    def sample_conditions(self, n: int, generator: torch.Generator | None = None) -> Any:
        return None

    def pretrained_eps(self, x: Tensor, step: Tensor, cond: Any = None) -> Tensor:
        ab = self.alpha_bar[step][:, None].to(x.dtype)
        return self.data_prior.eps_star(x.double(), ab.double()).to(x.dtype)

    def policy_eps(self, x: Tensor, step: Tensor, cond: Any = None) -> Tensor:
        return self.pretrained_eps(x, step) + self.residual(x, step)

    def flow(self, x: Tensor, state: Tensor, cond: Any = None) -> Tensor:
        return self.flow_scale[state][:, None] * self.flow_net(x, state)

    def decode(self, x: Tensor) -> Tensor:
        return x

    def log_reward(self, decoded: Tensor, cond: Any = None) -> Tensor:
        return self.reward.log_reward(decoded.float())

    def policy_parameters(self) -> Iterable[nn.Parameter]:
        return self.residual.parameters()

    def flow_parameters(self) -> Iterable[nn.Parameter]:
        return self.flow_net.parameters()

    def trainable_state_dict(self) -> dict[str, dict[str, Tensor]]:
        return {"residual": self.residual.state_dict(), "flow_net": self.flow_net.state_dict()}

    def load_trainable_state_dict(self, state: dict[str, dict[str, Tensor]]) -> None:
        self.residual.load_state_dict(state["residual"])
        self.flow_net.load_state_dict(state["flow_net"])

    # --- analytic extras -----------------------------------------------------------------------
    def oracle_log_flow(self, x: Tensor, state: Tensor) -> Tensor:
        """``log E#[R(x_T)^beta | x_s]`` from the mixture posterior (exact for the noising process)."""
        ab_state = self.state_alpha_bar[state].double()
        ab_rel = ab_state / self.mdp.alpha_bar_terminal
        ab_rel = torch.where(state == self.mdp.num_steps, torch.ones_like(ab_rel), ab_rel.clamp(max=1.0))
        return self.reward.log_expected_reward_power(self.prior, x.double(), ab_rel[:, None], self.beta)

    def oracle_log_flow_grad(self, x: Tensor, state: Tensor) -> Tensor:
        """``grad_x log E#[R^beta | x_s]``: the exact residual flow score the learned one should match."""
        with torch.enable_grad():
            xi = x.detach().double().requires_grad_(True)
            (g,) = torch.autograd.grad(self.oracle_log_flow(xi, state).sum(), xi)
        return g.to(x.dtype)
