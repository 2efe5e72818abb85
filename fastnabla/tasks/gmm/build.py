"""Build the analytic task from the run config (``gmm``, ``sampler``, ``method.beta``, ``seed``; errors name the
field)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fastnabla.config.fields import ConfigError
from fastnabla.mdp.flow_matching import FLOW_SAMPLER, build_flow_mdp
from fastnabla.mdp.schedule import DenoisingMDP, build_mdp
from fastnabla.tasks.gmm.flow_matching import GMMFlowTask
from fastnabla.tasks.gmm.mixture import GaussianMixture
from fastnabla.tasks.gmm.model import GMMTask
from fastnabla.tasks.gmm.rewards import AnalyticReward, GaussianBumpReward, LogLinearReward

if TYPE_CHECKING:
    from fastnabla.run.config import RunConfig


def build_sampler_mdp(cfg: RunConfig) -> DenoisingMDP:
    s = cfg.sampler
    try:
        if s.sampler == FLOW_SAMPLER:
            return build_flow_mdp(s.flow.scheduler, s.num_steps, s.flow.noise_level)
        return build_mdp(s.scheduler, s.num_steps, s.sampler, s.eta)
    except ValueError as err:
        field = "sampler.flow" if s.sampler == FLOW_SAMPLER else "sampler"
        raise ConfigError(f"{field}: {err}") from err


def build_mixture(cfg: RunConfig) -> GaussianMixture:
    m = cfg.gmm.mixture
    if not m.means or any(len(row) != len(m.means[0]) or not row for row in m.means):
        raise ConfigError("gmm.mixture.means must be K non-empty lists of the same length d")
    k, d = len(m.means), len(m.means[0])
    if len(m.weights) != k:
        raise ConfigError(f"gmm.mixture.weights needs {k} values (one per component), got {len(m.weights)}")
    stds = m.stds
    if isinstance(stds, list):
        if len(stds) != k:
            raise ConfigError(f"gmm.mixture.stds needs 1 or {k} values (or {k} lists of {d}), got {len(stds)}")
        if stds and isinstance(stds[0], list) and any(len(s) != d for s in stds):
            raise ConfigError(f"gmm.mixture.stds: each per-dimension list needs {d} values")
    try:
        return GaussianMixture.create(m.means, stds, m.weights)
    except ValueError as err:
        raise ConfigError(f"gmm.mixture: {err}") from err


def build_reward(cfg: RunConfig, dim: int) -> AnalyticReward:
    r = cfg.gmm.reward
    if r.kind == "bump":
        if len(r.center) != dim:
            raise ConfigError(f"gmm.reward.center needs d={dim} values, got {len(r.center)}")
        if not r.width > 0:
            raise ConfigError(f"gmm.reward.width must be > 0, got {r.width}")
        return GaussianBumpReward(torch.tensor(r.center, dtype=torch.float64), float(r.width))
    if r.kind == "loglinear":
        if len(r.weights) != dim:
            raise ConfigError(f"gmm.reward.weights needs d={dim} values for kind 'loglinear', got {len(r.weights)}")
        return LogLinearReward(torch.tensor(r.weights, dtype=torch.float64))
    raise ConfigError(f"gmm.reward.kind={r.kind!r} is not one of ('bump', 'loglinear')")


def build_gmm_task(cfg: RunConfig) -> GMMTask:
    """The task (networks seeded with ``cfg.seed``)."""
    mdp = build_sampler_mdp(cfg)
    flow = cfg.sampler.sampler == FLOW_SAMPLER
    if flow and not bool(mdp.stochastic.all()):
        raise ConfigError("sampler.flow.noise_level=0 is the deterministic ODE (sigma = 0 on every step): the analytic "
                          "task needs sigma_t > 0; use noise_level > 0 (Flow-GRPO's 0.7)")
    if not flow and cfg.gmm.network.residual != "eps":
        raise ConfigError(f"gmm.network.residual={cfg.gmm.network.residual!r} needs sampler.sampler={FLOW_SAMPLER!r} "
                          "(a DDIM / DDPM network predicts eps, not a velocity)")
    if not bool(mdp.stochastic.all()):
        raise ConfigError(
            "sampler: the analytic task needs sigma_t > 0 on every step, but this sampler's last step is "
            "deterministic (DDPM fixed_small, or DDIM with set_alpha_to_one=true): use "
            "sampler.scheduler.set_alpha_to_one=false with DDIM, or variance_type=fixed_large with DDPM"
        )
    prior = build_mixture(cfg)
    reward = build_reward(cfg, prior.dim)
    net = cfg.gmm.network
    torch.manual_seed(cfg.seed)
    if flow:
        return GMMFlowTask(prior, reward, cfg.method.beta, mdp, net.hidden, net.layers, net.flow_output_scale,
                           net.flow_output_cap, net.residual)
    return GMMTask(
        prior, reward, cfg.method.beta, mdp, net.hidden, net.layers, net.flow_output_scale, net.flow_output_cap
    )
