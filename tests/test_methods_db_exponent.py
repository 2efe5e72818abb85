"""The DB baselines' ``log_prob_reduction`` decides what they target: ``sum`` reaches ``p# R^beta``, ``mean`` (the
DAG-DB release's, and the SD presets') reaches ``p# R^(N beta)`` with ``N`` the latent elements per sample.

Closed form in the linear-Gaussian case: data ``N(0, s^2 I)`` in ``d`` dimensions, so the pretrained model's exact eps
is linear and every pretrained transition is ``x_{t+1} = m_t x_t + sigma_t z``; a log-linear reward
``log R(x) = w . x``. Then ``F_e(x_t) = E#[R(x_T)^e | x_t] = exp(c_t . x_t + k_t)`` with ``c_T = e w``,
``c_t = m_t c_{t+1}``, ``k_t = k_{t+1} + sigma_t^2 |c_{t+1}|^2 / 2``, and the sampler of ``p# R^e`` is the tilted
policy ``N(mu#_t + sigma_t^2 c_{t+1}, sigma_t^2)``: eps shifted by ``sigma_t^2 c_{t+1} / b_t``. The residual DB
condition (terminal flow fixed at ``beta log R``, other flows free) holds exactly for that policy at ``e = beta``
with summed log-densities and at ``e = d beta`` with their element means -- checked through the objective's own
log-density and loss functions.
"""

from __future__ import annotations

import pytest
import torch

from fastnabla.losses.residual_db import residual_db_loss
from fastnabla.mdp.schedule import build_mdp
from fastnabla.methods.db import log_density, step_log_prob

D, S2, BETA = 3, 0.7, 0.8
W = torch.tensor([0.6, -0.3, 0.25], dtype=torch.float64)
SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
             "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}


class LinearGaussianTask:
    """Just what ``step_log_prob`` reads: the MDP."""

    def __init__(self, steps: int):
        self.mdp = build_mdp(SCHEDULER, steps, "ddim", 1.0)


def _exact_eps(x: torch.Tensor, abar: float) -> torch.Tensor:
    return (1 - abar) ** 0.5 * x / (abar * S2 + 1 - abar)  # E[eps | x_t] for data N(0, s^2 I)


def _flow_coefficients(mdp, exponent: float) -> tuple[list[torch.Tensor], list[float]]:
    """``c_s`` and ``k_s`` of ``log F_e(x_s) = c_s . x_s + k_s`` for states ``s = 0 .. T``."""
    steps = mdp.num_steps
    c: list[torch.Tensor] = [torch.zeros(D, dtype=torch.float64)] * (steps + 1)
    k = [0.0] * (steps + 1)
    c[steps] = exponent * W
    for t in reversed(range(steps)):
        abar = float(mdp.alpha_bar[t])
        m = float(mdp.a[t]) + float(mdp.b[t]) * (1 - abar) ** 0.5 / (abar * S2 + 1 - abar)
        c[t] = m * c[t + 1]
        k[t] = k[t + 1] + 0.5 * float(mdp.sigma[t]) ** 2 * float(c[t + 1].square().sum())
    return c, k


def _residuals(exponent: float, reduction: str, steps: int = 5, n: int = 64) -> torch.Tensor:
    """Residual DB loss of every transition of ``n`` trajectories of the policy tilted by ``R^exponent``, with the
    exact flows of that exponent (scaled like the log-densities) and the terminal flow fixed at ``beta log R``."""
    task = LinearGaussianTask(steps)
    mdp = task.mdp
    c, k = _flow_coefficients(mdp, exponent)
    scale = 1.0 / D if reduction == "mean" else 1.0
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, D, generator=gen, dtype=torch.float64)  # x_0
    losses = []
    for t in range(steps):
        step = torch.full((n,), t, dtype=torch.int64)
        abar, b, sigma = float(mdp.alpha_bar[t]), float(mdp.b[t]), float(mdp.sigma[t])
        eps_pretrained = _exact_eps(x, abar)
        eps = eps_pretrained + sigma**2 * c[t + 1] / b  # the tilted policy
        x_next = mdp.a[t] * x + b * eps + sigma * torch.randn(n, D, generator=gen, dtype=torch.float64)
        log_pf = log_density(step_log_prob(task, x, x_next, eps, step), D, reduction)
        log_pf_pretrained = log_density(step_log_prob(task, x, x_next, eps_pretrained, step), D, reduction)
        flow_t = scale * (x @ c[t] + k[t])
        flow_next = BETA * (x_next @ W) if t == steps - 1 else scale * (x_next @ c[t + 1] + k[t + 1])  # k_T = 0
        losses.append(residual_db_loss(log_pf=log_pf, log_pf_pretrained=log_pf_pretrained, log_flow_t=flow_t,
                                       log_flow_next=flow_next))
        x = x_next
    return torch.stack(losses)


@pytest.mark.parametrize("reduction, exponent", [("sum", BETA), ("mean", D * BETA)], ids=["sum-beta", "mean-d-beta"])
def test_db_condition_holds_at_the_effective_exponent(reduction, exponent):
    assert float(_residuals(exponent, reduction).max()) < 1e-18


@pytest.mark.parametrize("reduction, exponent", [("sum", D * BETA), ("mean", BETA)], ids=["sum-d-beta", "mean-beta"])
def test_db_condition_fails_at_the_other_exponent(reduction, exponent):
    """Only the terminal transition sees the exponent (the free flows absorb it elsewhere), and there it breaks."""
    residuals = _residuals(exponent, reduction)
    assert float(residuals[:-1].max()) < 1e-18 < float(residuals[-1].mean())
