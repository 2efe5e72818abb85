"""Per-step coefficients of the denoising MDP built from a diffusers scheduler config.

Time runs as in the paper: ``x_0`` is noise, ``x_T`` is data, and transition ``t`` maps
``x_t -> x_{t+1}`` at scheduler timestep ``tau_t``. Every supported sampler step is affine in
``(x_t, eps_hat)`` plus Gaussian noise::

    mu_t      = a_t * x_t + b_t * eps_hat
    x_{t+1}   = mu_t + sigma_t * z

so the whole sampler is described by the per-step tensors ``(tau_t, abar_t, abar_{t+1}, a_t, b_t,
sigma_t)`` held in :class:`DenoisingMDP`. DDIM(eta) and DDPM (``fixed_small`` / ``fixed_large``
variance) reproduce ``diffusers``: its float32 ``alphas_cumprod`` bit for bit, its timestep
spacings, and the value of ``abar`` after the last step (``set_alpha_to_one`` for DDIM, ``1`` for
DDPM). Missing config keys take diffusers' constructor defaults (note ``clip_sample=True``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

SAMPLERS = ("ddim", "ddpm")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# Defaults of diffusers' DDIMScheduler / DDPMScheduler constructors, used for keys a config omits.
_SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "clip_sample": True,
    "thresholding": False,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
    "variance_type": "fixed_small",
}


def _betas_from_config(cfg: Mapping[str, Any]) -> torch.Tensor:
    """Float32 betas computed exactly as diffusers does, so ``alphas_cumprod`` agrees bitwise."""
    n = int(cfg["num_train_timesteps"])
    if cfg.get("trained_betas") is not None:
        return torch.tensor(cfg["trained_betas"], dtype=torch.float32)
    kind = cfg["beta_schedule"]
    if kind == "linear":
        return torch.linspace(cfg["beta_start"], cfg["beta_end"], n, dtype=torch.float32)
    if kind == "scaled_linear":
        return torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n, dtype=torch.float32) ** 2
    if kind == "squaredcos_cap_v2":

        def abar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)]
        return torch.tensor(betas, dtype=torch.float32)
    raise ValueError(
        f"scheduler config: beta_schedule={kind!r} is not supported "
        "(use 'linear', 'scaled_linear', 'squaredcos_cap_v2' or trained_betas)"
    )


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    sqrt_abar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def _inference_timesteps(cfg: Mapping[str, Any], num_steps: int) -> np.ndarray:
    n = int(cfg["num_train_timesteps"])
    spacing = cfg["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, n - 1, num_steps).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = n // num_steps
        steps = (np.arange(0, num_steps) * ratio).round()[::-1].copy().astype(np.int64)
        return steps + int(cfg["steps_offset"])
    if spacing == "trailing":
        ratio = n / num_steps
        return np.round(np.arange(n, 0, -ratio)).astype(np.int64) - 1
    raise ValueError(
        f"scheduler config: timestep_spacing={spacing!r} is not supported "
        "(use 'leading', 'trailing' or 'linspace')"
    )


@dataclass(frozen=True)
class DenoisingMDP:
    """The sampler as an MDP: per-step affine coefficients, one entry per transition ``t``.

    All tensors have shape ``[num_steps]`` and dtype float64 (``timesteps``: int64); use
    :meth:`gather` to broadcast them per sample when a batch mixes steps.
    """

    sampler: str
    eta: float
    prediction_type: str
    timesteps: torch.Tensor  # tau_t, int64 [S]
    alpha_bar: torch.Tensor  # abar_t = abar(tau_t)
    alpha_bar_next: torch.Tensor  # abar_{t+1} (abar after the last step at the end)
    a: torch.Tensor  # coefficient of x_t in mu_t
    b: torch.Tensor  # coefficient of eps_hat in mu_t
    sigma: torch.Tensor  # standard deviation of the step noise
    alphas_cumprod: torch.Tensor  # training schedule abar(tau), tau = 0..N-1

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.numel())

    @property
    def alpha_bar_terminal(self) -> float:
        """``abar`` of the terminal state ``x_T`` (1 when the sampler ends on clean data)."""
        return float(self.alpha_bar_next[-1])

    @property
    def stochastic(self) -> torch.Tensor:
        """Bool ``[S]``: steps whose Gaussian policy has a density (``sigma_t > 0``)."""
        return self.sigma > 0

    def gather(
        self, step: torch.Tensor, ndim: int, dtype: torch.dtype = torch.float32
    ) -> dict[str, torch.Tensor]:
        """Coefficients of step ``step`` (int64 ``[B]``) shaped ``[B, 1, ..., 1]`` for ``ndim`` dims."""
        if step.dtype != torch.int64:
            raise TypeError(f"step indices must be int64, got {step.dtype}")
        if step.numel() and (int(step.min()) < 0 or int(step.max()) >= self.num_steps):
            raise IndexError(f"step indices must lie in [0, {self.num_steps}), got {step.tolist()}")
        shape = (-1,) + (1,) * (ndim - 1)
        idx = step.cpu()
        out = {
            k: getattr(self, k)[idx].to(device=step.device, dtype=dtype).reshape(shape)
            for k in ("alpha_bar", "alpha_bar_next", "a", "b", "sigma")
        }
        out["timesteps"] = self.timesteps[idx].to(step.device)
        return out

    def to_epsilon(
        self, model_output: torch.Tensor, x: torch.Tensor, alpha_bar: torch.Tensor
    ) -> torch.Tensor:
        """Convert a model output of ``prediction_type`` to ``eps_hat`` (affine in ``x``)."""
        if self.prediction_type == "epsilon":
            return model_output
        if self.prediction_type == "v_prediction":
            return alpha_bar.sqrt() * model_output + (1 - alpha_bar).sqrt() * x
        return (x - alpha_bar.sqrt() * model_output) / (1 - alpha_bar).sqrt()


def build_mdp(
    scheduler_config: Mapping[str, Any] | Any,
    num_steps: int,
    sampler: str = "ddim",
    eta: float = 1.0,
) -> DenoisingMDP:
    """Build the per-step coefficients from a diffusers scheduler (object or config mapping).

    Args:
        scheduler_config: a ``diffusers`` scheduler, its ``.config``, or a plain dict with the same
            keys (``num_train_timesteps``, ``beta_schedule``, ``timestep_spacing``, ...). Missing
            keys take diffusers' constructor defaults.
        num_steps: number of inference (denoising) steps ``T``.
        sampler: ``"ddim"`` (with ``eta``) or ``"ddpm"`` (ancestral; ``variance_type`` from the
            config, ``fixed_small`` or ``fixed_large``).
        eta: DDIM noise scale; ``eta=1`` gives the DDPM-like sampler used by every seed method.

    Raises:
        ValueError: naming the offending key when the config asks for a non-affine step
            (``clip_sample``, ``thresholding``) or an unsupported option.
    """
    if hasattr(scheduler_config, "config") and not isinstance(scheduler_config, Mapping):
        scheduler_config = scheduler_config.config
    cfg = dict(_SCHEDULER_DEFAULTS)
    cfg.update({k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")})
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not supported (use one of {SAMPLERS})")
    n = int(cfg["num_train_timesteps"])
    if not isinstance(num_steps, int) or not 1 <= num_steps <= n:
        raise ValueError(f"num_steps={num_steps!r} must be an integer in [1, {n}]")
    if sampler == "ddim" and not (isinstance(eta, (int, float)) and eta >= 0):
        raise ValueError(f"eta={eta!r} must be a number >= 0")
    for key in ("clip_sample", "thresholding"):
        if cfg.get(key):
            raise ValueError(
                f"scheduler config: {key}=True makes the step non-affine in (x_t, eps); "
                f"set {key}=False (Stable Diffusion configs already do)"
            )
    if cfg["prediction_type"] not in PREDICTION_TYPES:
        raise ValueError(
            f"scheduler config: prediction_type={cfg['prediction_type']!r} is not supported "
            f"(use one of {PREDICTION_TYPES})"
        )

    betas = _betas_from_config(cfg)
    if cfg.get("rescale_betas_zero_snr"):
        betas = _rescale_zero_terminal_snr(betas)
    # diffusers' float32 alphas_cumprod, bit for bit; the coefficients are then derived in float64.
    abar_all = torch.cumprod(1.0 - betas, dim=0).double().numpy()
    taus = _inference_timesteps(cfg, num_steps)
    if bool((abar_all[taus] <= 0).any()):
        bad = [int(t) for t in taus if abar_all[t] <= 0]
        raise ValueError(
            f"scheduler config: alpha_bar = 0 at timesteps {bad} (zero terminal SNR): the step is not "
            "defined in (x_t, eps) form there; use a timestep_spacing that skips the last training "
            "timestep or rescale_betas_zero_snr=False"
        )

    if sampler == "ddim":
        final = 1.0 if cfg["set_alpha_to_one"] else abar_all[0]
        prev = taus - n // num_steps
        abar_prev = np.where(prev >= 0, abar_all[np.clip(prev, 0, None)], final)
        abar = abar_all[taus]
        var = (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)
        sigma = float(eta) * np.sqrt(var)
        direction = np.sqrt(np.clip(1 - abar_prev - sigma**2, 0.0, None))
        a = np.sqrt(abar_prev) / np.sqrt(abar)
        b = direction - np.sqrt(abar_prev) * np.sqrt(1 - abar) / np.sqrt(abar)
    else:
        variance_type = cfg["variance_type"]
        if variance_type not in ("fixed_small", "fixed_large"):
            raise ValueError(
                f"scheduler config: variance_type={variance_type!r} is not supported for the MDP "
                "(use 'fixed_small' or 'fixed_large')"
            )
        abar = abar_all[taus]
        abar_prev = np.append(abar_all[taus[1:]], 1.0)
        alpha = abar / abar_prev
        beta = 1 - alpha
        coef_x0 = np.sqrt(abar_prev) * beta / (1 - abar)
        coef_x = np.sqrt(alpha) * (1 - abar_prev) / (1 - abar)
        a = coef_x + coef_x0 / np.sqrt(abar)
        b = -coef_x0 * np.sqrt(1 - abar) / np.sqrt(abar)
        var = (1 - abar_prev) / (1 - abar) * beta if variance_type == "fixed_small" else beta
        sigma = np.where(taus > 0, np.sqrt(var), 0.0)
        eta = 1.0

    f64 = torch.float64
    return DenoisingMDP(
        sampler=sampler,
        eta=float(eta),
        prediction_type=str(cfg["prediction_type"]),
        timesteps=torch.as_tensor(taus, dtype=torch.int64),
        alpha_bar=torch.as_tensor(abar, dtype=f64),
        alpha_bar_next=torch.as_tensor(abar_prev, dtype=f64),
        a=torch.as_tensor(a, dtype=f64),
        b=torch.as_tensor(b, dtype=f64),
        sigma=torch.as_tensor(sigma, dtype=f64),
        alphas_cumprod=torch.as_tensor(abar_all, dtype=f64),
    )


# Stable Diffusion 1.x scheduler config (as shipped in its `scheduler/scheduler_config.json`).
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}
