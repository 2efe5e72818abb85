"""The rectified-flow sampler of SD3 / SD3.5 / FLUX.1 as a denoising MDP with affine Gaussian steps.

Rectified flow (diffusers' ``FlowMatchEulerDiscreteScheduler`` "sigmas" ``s``; ``s = 1`` noise, ``s = 0`` data)::

    x_s = (1 - s) x_data + s n,        v_hat(x_s, s) ~ n - x_data,        x_hat = x_s - s v_hat

Flow-GRPO's SDE step (Liu et al. 2025, ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py`` of
github.com/yifan123/flow_grpo at ac4c86e) from ``s`` to ``s' < s`` with ``dt = s' - s < 0`` and noise level ``a``::

    sigma_s  = a sqrt(s / (1 - s))            (s = 1 uses s_1, the schedule's second sigma, in the denominator)
    mean     = x (1 + sigma_s^2 dt / (2 s)) + v_hat (1 + sigma_s^2 (1 - s) / (2 s)) dt  =  A x + B v_hat
    x'       = mean + sigma_s sqrt(-dt) z

``a = 0`` is the Euler ODE step diffusers' pipelines run (``x' = x + dt v_hat``). The MDP state is the rescaled
``y = x / c_s`` with ``c_s = sqrt((1 - s)^2 + s^2)``: a VP process with ``sqrt(abar) = (1 - s) / c_s`` and
``sqrt(1 - abar) = s / c_s`` whose epsilon is the noise ``n``, and ``n_hat = x_s + (1 - s) v_hat`` is affine in
``(y, v_hat)``. So the step is ``y' = a_t y + b_t eps_hat + sigma_t z`` with every existing op unchanged
(docs/flow-matching.md has the derivation). ``c = 1`` at ``s = 1`` and ``s = 0``: the initial noise and the final
sample are not rescaled.

The first state of every diffusers schedule sits at ``s = 1`` exactly, where ``abar = 0`` and ``x_hat`` cannot be
recovered from ``eps``. State 0 therefore gets a *nominal* VP pair ``sqrt(abar_0) = sqrt(FIRST_STATE_ALPHA_BAR_FACTOR
abar_1)``, and its epsilon is defined with the same pair (``eps = u y + w v_hat``, below), so the step's mean, its
variance and Tweedie's ``x_hat = x_0 - v_hat`` are exactly those of the flow; the nominal value enters only where
``abar`` has a VP meaning of its own (``gamma_t = abar_t`` schedules at state 0, the DB baselines' noising kernel of
the first transition). The true VP ``abar`` of every state (0 at ``s = 1``) is kept in ``vp_alpha_bar``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fastnabla.mdp.schedule import DenoisingMDP

FLOW_SAMPLER = "flow-sde"
FLOW_PREDICTION = "flow"  # the network predicts the velocity n - x_data
DEFAULT_NOISE_LEVEL = 0.7  # Flow-GRPO's sample.noise_level (config/base.py)
FIRST_STATE_ALPHA_BAR_FACTOR = 0.25  # ours: abar_0 = abar_1 / 4, i.e. sqrt(abar_0) = sqrt(abar_1) / 2

# Defaults of diffusers' FlowMatchEulerDiscreteScheduler constructor (0.42), used for keys a config omits.
FLOW_MATCH_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "invert_sigmas": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "time_shift_type": "exponential",
    "stochastic_sampling": False,
}
_UNSUPPORTED = {
    "invert_sigmas": "inverted sigmas run time the other way",
    "use_karras_sigmas": "Karras sigmas are not what the SD3 / FLUX pipelines sample with",
    "use_exponential_sigmas": "exponential sigmas are not what the SD3 / FLUX pipelines sample with",
    "use_beta_sigmas": "beta sigmas are not what the SD3 / FLUX pipelines sample with",
    "stochastic_sampling": "diffusers' own stochastic step re-noises x_hat; this table is Flow-GRPO's SDE",
}
# Keys of the DDPM/DDIM schedulers: a flow config that holds them was meant for another sampler.
_DDPM_KEYS = ("beta_schedule", "beta_start", "beta_end", "trained_betas", "set_alpha_to_one", "steps_offset",
              "prediction_type", "timestep_spacing", "clip_sample", "variance_type")


def flow_match_config(scheduler_config: Mapping[str, Any] | Any) -> dict[str, Any]:
    """A ``FlowMatchEulerDiscreteScheduler`` config (object, ``.config`` or mapping) with diffusers' defaults filled
    in; raises ``ValueError`` naming a key the table does not support."""
    if hasattr(scheduler_config, "config") and not isinstance(scheduler_config, Mapping):
        scheduler_config = scheduler_config.config
    given = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    foreign = sorted(k for k in given if k in _DDPM_KEYS)
    if foreign:
        raise ValueError(f"scheduler config: {foreign} are DDPM/DDIM settings, not FlowMatchEulerDiscreteScheduler "
                         "ones (num_train_timesteps, shift, use_dynamic_shifting, base_shift, max_shift, ...)")
    cfg = dict(FLOW_MATCH_DEFAULTS)
    cfg.update(given)
    for key, why in _UNSUPPORTED.items():
        if cfg.get(key):
            raise ValueError(f"scheduler config: {key}=True is not supported ({why}); set it to false")
    if cfg["time_shift_type"] not in ("exponential", "linear"):
        raise ValueError(f"scheduler config: time_shift_type={cfg['time_shift_type']!r} must be 'exponential' or "
                         "'linear'")
    return cfg


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent shift ``mu``: linear in the number of packed latent tokens (diffusers'
    ``pipelines.flux.pipeline_flux.calculate_shift``)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def dynamic_shift_mu(cfg: Mapping[str, Any], image_seq_len: int) -> float:
    """``mu`` of a dynamically shifted config for ``image_seq_len`` latent tokens (``(h / 2) (w / 2)`` for FLUX's
    packed 2x2 latents)."""
    c = {**FLOW_MATCH_DEFAULTS, **cfg}
    return calculate_shift(image_seq_len, c["base_image_seq_len"], c["max_image_seq_len"], c["base_shift"],
                           c["max_shift"])


def _time_shift(cfg: Mapping[str, Any], mu: float, t: np.ndarray) -> np.ndarray:
    if cfg["time_shift_type"] == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)
    return mu / (mu + (1 / t - 1) ** 1.0)


def flow_match_sigmas(
    scheduler_config: Mapping[str, Any] | Any, num_steps: int, mu: float | None = None,
    sigmas: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(timesteps [S], sigmas [S + 1])`` (float32) exactly as ``FlowMatchEulerDiscreteScheduler.set_timesteps``
    computes them (the same numpy / torch operations in the same dtypes), the last sigma 0.

    Args:
        mu: the dynamic shift (needed when ``use_dynamic_shifting``; :func:`dynamic_shift_mu`).
        sigmas: custom unshifted sigmas, as ``FluxPipeline`` passes ``linspace(1, 1 / S, S)``.
    """
    cfg = flow_match_config(scheduler_config)
    n = int(cfg["num_train_timesteps"])
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r} must be an integer >= 1")
    dynamic = bool(cfg["use_dynamic_shifting"])
    if dynamic and mu is None:
        raise ValueError("scheduler config: use_dynamic_shifting=True needs mu (FLUX: from the image size, "
                         "dynamic_shift_mu(config, image_seq_len))")
    shift = float(cfg["shift"])
    # the constructor's training sigmas (torch float32), whose ends set_timesteps interpolates between
    train = torch.from_numpy(np.linspace(1, n, n, dtype=np.float32)[::-1].copy()).to(torch.float32) / n
    if not dynamic:
        train = shift * train / (1 + (shift - 1) * train)
    sigma_max, sigma_min = train[0].item(), train[-1].item()
    if sigmas is None:
        ts = np.linspace(sigma_max * n, sigma_min * n, num_steps)
        sig = ts / n
    else:
        sig = np.array(sigmas).astype(np.float32)
        if len(sig) != num_steps:
            raise ValueError(f"{len(sig)} custom sigmas for num_steps={num_steps}")
    sig = _time_shift(cfg, mu, sig) if dynamic else shift * sig / (1 + (shift - 1) * sig)
    if cfg["shift_terminal"]:
        one_minus = 1 - sig
        sig = 1 - one_minus / (one_minus[-1] / (1 - cfg["shift_terminal"]))
    sig_t = torch.from_numpy(np.asarray(sig)).to(torch.float32)
    return sig_t * n, torch.cat([sig_t, torch.zeros(1)])


def flow_sde_std(s: np.ndarray, s_first_next: float, noise_level: float) -> np.ndarray:
    """Flow-GRPO's ``sigma_s = a sqrt(s / (1 - s))``, with ``s = 1`` replaced by ``s_1`` in the denominator."""
    return noise_level * np.sqrt(s / (1 - np.where(s == 1, s_first_next, s)))


@dataclass(frozen=True)
class FlowMatchMDP(DenoisingMDP):
    """A :class:`DenoisingMDP` of the rectified-flow SDE in the rescaled state ``y = x / c_s``, with what a
    velocity network needs besides: per step ``t`` the flow time ``s_t``, the model's timestep, and the affine map
    ``eps = eps_x[t] y + eps_v[t] v_hat`` from the velocity to the table's epsilon; per state the rescaling ``c_s``.

    ``timesteps`` (int64) are diffusers' float timesteps rounded (for display); the network gets
    ``model_timesteps``. ``alphas_cumprod`` holds the VP ``abar`` of the scheduler's training sigmas, by timestep
    ``1 .. N`` ascending.
    """

    noise_level: float
    flow_sigmas: torch.Tensor  # s of every state [S + 1] (float32 values in float64), 0 at the end
    model_timesteps: torch.Tensor  # float32 [S]: scheduler.timesteps, what the transformer is called with
    scale: torch.Tensor  # c_s of every state [S + 1]
    eps_x: torch.Tensor  # u_t [S]
    eps_v: torch.Tensor  # w_t [S]
    vp_alpha_bar: torch.Tensor  # the VP abar of every state [S + 1] (0 at s = 1; alpha_bar holds the nominal)

    def gather(self, step: torch.Tensor, ndim: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """:meth:`DenoisingMDP.gather` plus ``s``, ``scale``, ``scale_next``, ``eps_x``, ``eps_v`` (shaped
        ``[B, 1, ..., 1]``) and ``model_timesteps`` (``[B]``, float32)."""
        out = super().gather(step, ndim, dtype)
        shape = (-1,) + (1,) * (ndim - 1)
        idx = step.cpu()
        extra = {"s": self.flow_sigmas[idx], "scale": self.scale[idx], "scale_next": self.scale[idx + 1],
                 "eps_x": self.eps_x[idx], "eps_v": self.eps_v[idx]}
        out.update({k: v.to(device=step.device, dtype=dtype).reshape(shape) for k, v in extra.items()})
        out["model_timesteps"] = self.model_timesteps[idx].to(step.device)
        return out

    def velocity_to_epsilon(self, velocity: torch.Tensor, y: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """``eps_hat = eps_x[t] y + eps_v[t] v_hat`` (``= c y + (1 - s) v_hat = n_hat`` for ``s < 1``)."""
        c = self.gather(step, y.dim(), y.dtype)
        return c["eps_x"] * y + c["eps_v"] * velocity

    def epsilon_to_velocity(self, eps: torch.Tensor, y: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`velocity_to_epsilon`."""
        c = self.gather(step, y.dim(), y.dtype)
        return (eps - c["eps_x"] * y) / c["eps_v"]

    def to_epsilon(self, model_output: torch.Tensor, x: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("a flow-matching MDP converts velocities with velocity_to_epsilon(v, y, step): the "
                                  "map depends on the step, not on abar alone")


def build_flow_mdp(
    scheduler_config: Mapping[str, Any] | Any,
    num_steps: int,
    noise_level: float = DEFAULT_NOISE_LEVEL,
    *,
    mu: float | None = None,
    image_seq_len: int | None = None,
    sigmas: Sequence[float] | None = None,
) -> FlowMatchMDP:
    """The rectified-flow SDE of a ``FlowMatchEulerDiscreteScheduler`` config as a :class:`FlowMatchMDP`.

    Args:
        scheduler_config: the scheduler, its ``.config`` or a mapping (missing keys take diffusers' defaults).
        num_steps: denoising steps ``T``.
        noise_level: Flow-GRPO's ``a`` (its default 0.7); 0 gives the deterministic Euler ODE of the pipelines.
        mu / image_seq_len: the dynamic shift, or the latent token count it is computed from (FLUX).
        sigmas: custom unshifted sigmas (``FluxPipeline`` passes ``numpy.linspace(1, 1 / T, T)``).
    """
    if not (isinstance(noise_level, (int, float)) and math.isfinite(noise_level) and noise_level >= 0):
        raise ValueError(f"noise_level={noise_level!r} must be a number >= 0")
    cfg = flow_match_config(scheduler_config)
    if cfg["use_dynamic_shifting"] and mu is None and image_seq_len is not None:
        mu = dynamic_shift_mu(cfg, image_seq_len)
    timesteps, sig32 = flow_match_sigmas(cfg, num_steps, mu, sigmas)
    s_all = sig32.double().numpy()
    if not (np.all(np.diff(s_all) < 0) and s_all[0] <= 1 and s_all[-2] > 0):
        raise ValueError(f"the flow schedule must decrease strictly from <= 1 to > 0 before the final 0, got "
                         f"sigmas {s_all.tolist()}")
    s, s_next = s_all[:-1], s_all[1:]
    scale = np.sqrt((1 - s_all) ** 2 + s_all**2)
    m = (1 - s_all) / scale  # sqrt(abar) of the VP process y = x / c
    vp_abar = m**2
    if s_all[0] == 1.0:  # pure noise: a nominal VP pair (module docstring)
        m = m.copy()
        m[0] = math.sqrt(FIRST_STATE_ALPHA_BAR_FACTOR) * m[1]
    k = np.sqrt(1 - m**2)
    c, c_next = scale[:-1], scale[1:]
    u = (1 - c * m[:-1]) / k[:-1]  # eps = u y + w v_hat reproduces x_hat = x - s v_hat under Tweedie with (m, k)
    w = s * m[:-1] / k[:-1]
    dt = s_next - s
    std_flow = flow_sde_std(s, float(s_all[1]), float(noise_level))
    big_a = 1 + std_flow**2 * dt / (2 * s)
    big_b = (1 + std_flow**2 * (1 - s) / (2 * s)) * dt
    a = (big_a * c - big_b * u / w) / c_next
    b = big_b / (w * c_next)
    sigma = std_flow * np.sqrt(-dt) / c_next

    n = int(cfg["num_train_timesteps"])
    train = torch.from_numpy(np.linspace(1, n, n, dtype=np.float32)).to(torch.float32) / n  # ascending timestep
    if not cfg["use_dynamic_shifting"]:
        shift = float(cfg["shift"])
        train = shift * train / (1 + (shift - 1) * train)
    tr = train.double().numpy()
    f64 = torch.float64
    return FlowMatchMDP(
        sampler=FLOW_SAMPLER,
        eta=float(noise_level),
        prediction_type=FLOW_PREDICTION,
        timesteps=timesteps.double().round().to(torch.int64),
        alpha_bar=torch.as_tensor(m[:-1] ** 2, dtype=f64),
        alpha_bar_next=torch.as_tensor(m[1:] ** 2, dtype=f64),
        a=torch.as_tensor(a, dtype=f64),
        b=torch.as_tensor(b, dtype=f64),
        sigma=torch.as_tensor(sigma, dtype=f64),
        alphas_cumprod=torch.as_tensor(((1 - tr) / np.sqrt((1 - tr) ** 2 + tr**2)) ** 2, dtype=f64),
        noise_level=float(noise_level),
        flow_sigmas=torch.as_tensor(s_all, dtype=f64),
        model_timesteps=timesteps.clone(),
        scale=torch.as_tensor(scale, dtype=f64),
        eps_x=torch.as_tensor(u, dtype=f64),
        eps_v=torch.as_tensor(w, dtype=f64),
        vp_alpha_bar=torch.as_tensor(vp_abar, dtype=f64),
    )


# SD3 / SD3.5 (medium and large) ship this scheduler config; FLUX.1-dev adds dynamic shifting.
SD3_SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
    "base_image_seq_len": 256, "max_image_seq_len": 4096,
}
