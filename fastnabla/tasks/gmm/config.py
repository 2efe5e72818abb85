"""Configuration of the analytic task (``gmm.*``) and of the sampler that defines its MDP (``sampler.*``).

Torch-free. Rules that need the whole task (dimensions that must agree, a sampler with a zero-variance step) are
checked when the task is built (:mod:`fastnabla.tasks.gmm.build`), before any output is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastnabla.config.fields import option

SAMPLERS = ("ddim", "ddpm", "flow-sde")
REWARD_KINDS = ("bump", "loglinear")


@dataclass
class MixtureConfig:
    """The pretrained model's data distribution: a diagonal Gaussian mixture."""

    means: list[list[float]] = option(
        default_factory=lambda: [[-2.0, -2.0], [2.0, -2.0], [-2.0, 2.0], [2.0, 2.0]], nonempty=True,
        help="component means, K lists of d numbers")
    stds: float | list[float] | list[list[float]] = option(
        0.5, gt=0, help="component std: one number, one per component, or K lists of d")
    weights: list[float] = option(
        default_factory=lambda: [0.4, 0.3, 0.2, 0.1], gt=0, nonempty=True,
        help="component weights (normalised)")


@dataclass
class GMMRewardConfig:
    """The analytic reward ``R`` (positive; ``log R`` is what the methods use)."""

    kind: str = option("bump", choices=REWARD_KINDS,
                       help="'bump': exp(-||x-center||^2/(2 width^2)); 'loglinear': exp(w.x)")
    center: list[float] = option(default_factory=lambda: [2.0, 1.0], help="bump centre (d numbers)")
    width: float = option(2.5, gt=0, help="bump width rho")
    weights: list[float] = option(default_factory=list, help="log-linear weights w (d numbers)")


@dataclass
class GMMNetworkConfig:
    """MLPs of the residual policy (LoRA analogue) and of the flow g_phi."""

    hidden: int = option(128, ge=1, help="hidden width")
    layers: int = option(3, ge=1, help="hidden layers")
    flow_output_scale: str = option(
        "none", choices=("none", "eps"), help="flow output in natural units, or in eps units of the producing step")
    flow_output_cap: float = option(1e9, gt=0, help="upper bound of the 'eps' output factor |b|/sigma^2")
    residual: str = option(
        "eps", choices=("eps", "velocity"),
        help="where the residual policy network adds its output: to eps, or (sampler.sampler=flow-sde only) to the "
             "velocity, as LoRA on a flow-matching transformer does (docs/flow-matching.md)")


@dataclass
class GMMConfig:
    mixture: MixtureConfig = option(default_factory=MixtureConfig, help="")
    reward: GMMRewardConfig = option(default_factory=GMMRewardConfig, help="")
    network: GMMNetworkConfig = option(default_factory=GMMNetworkConfig, help="")


@dataclass
class FlowSamplerConfig:
    """The rectified-flow SDE sampler (``sampler.sampler: flow-sde``; docs/flow-matching.md)."""

    noise_level: float = option(
        0.7, ge=0, help="Flow-GRPO's noise level a of sigma_s = a sqrt(s / (1 - s)) (its default 0.7); 0: the "
                        "deterministic Euler ODE")
    scheduler: dict[str, Any] = option(
        default_factory=lambda: {"num_train_timesteps": 1000, "shift": 1.0},
        help="diffusers FlowMatchEulerDiscreteScheduler config keys (shift, use_dynamic_shifting, ...)")


@dataclass
class SamplerConfig:
    """The sampler that defines the analytic task's MDP (a diffusers scheduler config + steps); the sd task
    takes its scheduler from the pipeline and its steps from ``sd.num_steps``."""

    sampler: str = option("ddim", choices=SAMPLERS, help="sampler")
    num_steps: int = option(50, ge=1, help="number of denoising steps T")
    eta: float = option(1.0, ge=0, help="DDIM eta (1 = DDPM-like, as in the paper)")
    scheduler: dict[str, Any] = option(
        default_factory=lambda: {
            "num_train_timesteps": 1000,
            "beta_schedule": "linear",
            "beta_start": 0.0001,
            "beta_end": 0.02,
            "clip_sample": False,
            "set_alpha_to_one": False,
            "steps_offset": 1,
        },
        help="diffusers scheduler config keys (beta_schedule, timestep_spacing, ...)",
    )
    flow: FlowSamplerConfig = option(default_factory=FlowSamplerConfig, help="")
