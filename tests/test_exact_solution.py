"""Every loss vanishes on a problem whose optimum is known exactly (Proposition 4, discrete chain).

Single Gaussian data ``N(m, diag(s^2))`` makes ``eps*`` affine in ``x``, so the pretrained step is
``mu#(x) = J x + h`` with a constant diagonal ``J``. With ``R(x) = exp(w^T x)`` the flow of the
*discrete* pretrained chain is exactly log-linear, ``log F_t(x) = c_t^T x + k_t`` with

    c_T = beta w,   c_t = J_t c_{t+1},   k_t = k_{t+1} + c_{t+1}^T h_t + sigma_t^2 |c_{t+1}|^2 / 2,

and the optimal policy is the Gaussian ``N(mu# + sigma^2 c_{t+1}, sigma^2)``. Everything below is
computed in the test from these formulas; the library is only asked for the losses.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastnabla.losses.dag_db import dag_db_loss, noising_log_prob
from fastnabla.losses.residual_db import residual_db_loss
from fastnabla.mdp.schedule import build_mdp
from fastnabla.methods.nabla_gfn.pathwise import pathwise_flow_targets
from fastnabla.ops.nabla_db_loss import residual_nabla_db_loss
from fastnabla.tasks.gmm.mixture import GaussianMixture
from fastnabla.tasks.gmm.model import GMMTask
from fastnabla.tasks.gmm.rewards import LogLinearReward
from fastnabla.training.trajectories import sample_trajectories

f64 = torch.float64
SCHED = {"beta_schedule": "linear", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}


def _problem(num_steps: int, beta: float):
    mdp = build_mdp(SCHED, num_steps, "ddim", 1.0)
    m = torch.tensor([0.7, -1.3, 0.2], dtype=f64)
    s = torch.tensor([0.6, 1.1, 0.35], dtype=f64)
    w = torch.tensor([0.5, -0.8, 1.5], dtype=f64)
    ab = mdp.alpha_bar
    v = ab[:, None] * s**2 + 1 - ab[:, None]  # [T, d] marginal variance
    eps_A = (1 - ab[:, None]).sqrt() / v  # eps*(x) = eps_A * x + eps_B
    eps_B = -(1 - ab[:, None]).sqrt() * ab[:, None].sqrt() * m / v
    J = mdp.a[:, None] + mdp.b[:, None] * eps_A
    h = mdp.b[:, None] * eps_B
    T = num_steps
    c = torch.empty(T + 1, 3, dtype=f64)
    k = torch.empty(T + 1, dtype=f64)
    c[T], k[T] = beta * w, 0.0
    for t in range(T - 1, -1, -1):
        c[t] = J[t] * c[t + 1]
        k[t] = k[t + 1] + (c[t + 1] * h[t]).sum() + 0.5 * mdp.sigma[t] ** 2 * (c[t + 1] ** 2).sum()
    return mdp, m, s, w, eps_A, eps_B, J, h, c, k


def _log_normal(x, mean, sigma):
    return (-0.5 * ((x - mean) / sigma) ** 2 - torch.log(sigma) - 0.5 * math.log(2 * math.pi)).sum(-1)


@pytest.mark.parametrize("beta", [0.5, 2.0], ids=["beta0.5", "beta2"])
def test_twisted_chain_reaches_the_tilted_target(beta):
    """Propagating Gaussian moments: the twisted chain ends at p#_T(x) exp(beta w^T x) exactly.

    The product of the DB ratios telescopes to ``F_T(x_T) / F_0(x_0)``, so the initial noise must be
    twisted too (``N(0, I) exp(c_0^T x) = N(c_0, I)``); with ``x_0 ~ N(0, I)`` the terminal mean is off
    by ``O(|c_0|)`` (about 1e-4 here), the initial-state bias of a finite first noise level."""
    mdp, m, s, w, eps_A, eps_B, J, h, c, k = _problem(12, beta)
    mean_p = torch.zeros(3, dtype=f64)
    var_p = torch.ones(3, dtype=f64)
    mean_q, var_q = c[0].clone(), var_p.clone()
    for t in range(mdp.num_steps):
        sig2 = mdp.sigma[t] ** 2
        mean_p, var_p = J[t] * mean_p + h[t], J[t] ** 2 * var_p + sig2
        mean_q, var_q = J[t] * mean_q + h[t] + sig2 * c[t + 1], J[t] ** 2 * var_q + sig2
    torch.testing.assert_close(mean_q, mean_p + var_p * beta * w, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(var_q, var_p, rtol=1e-12, atol=0)


def _transitions(num_steps: int, beta: float, batch: int = 9):
    mdp, m, s, w, eps_A, eps_B, J, h, c, k = _problem(num_steps, beta)
    g = torch.Generator().manual_seed(0)
    step = torch.randint(0, num_steps, (batch,), generator=g)
    step[0] = num_steps - 1  # one terminal transition
    x = torch.randn(batch, 3, generator=g, dtype=f64) * 1.7
    a, b, sig = mdp.a[step, None], mdp.b[step, None], mdp.sigma[step, None]
    eps_pretrained = eps_A[step] * x + eps_B[step]
    eps_theta = eps_pretrained + sig**2 * c[step + 1] / b
    mu_pretrained, mu_theta = a * x + b * eps_pretrained, a * x + b * eps_theta
    x_next = mu_theta + sig * torch.randn(batch, 3, generator=g, dtype=f64)
    return dict(mdp=mdp, step=step, x=x, x_next=x_next, a=a, b=b, sig=sig, eps_pretrained=eps_pretrained,
                eps_theta=eps_theta, mu_pretrained=mu_pretrained, mu_theta=mu_theta, eps_A=eps_A, c=c, k=k)


@pytest.mark.parametrize("beta", [0.5, 2.0], ids=["beta0.5", "beta2"])
def test_residual_nabla_db_vanishes_at_the_optimum(beta):
    p = _transitions(10, beta)
    step, x_next = p["step"], p["x_next"]
    A = p["eps_A"][step]
    terms = residual_nabla_db_loss(
        x_t=p["x"], x_next=x_next, eps_theta=p["eps_theta"], eps_pretrained=p["eps_pretrained"],
        vjp_theta=A * (x_next - p["mu_theta"]), vjp_pretrained=A * (x_next - p["mu_pretrained"]),
        fl_t=p["c"][step], fl_next=p["c"][step + 1], flow_t=torch.zeros_like(x_next),
        flow_next=torch.zeros_like(x_next), a=p["a"], b=p["b"], sigma=p["sig"],
        terminal=step == p["mdp"].num_steps - 1,
    )
    scale = (p["c"] ** 2).mean()
    assert float(terms.forward.max()) < 1e-20 * (1 + scale)
    assert float(terms.reverse.max()) < 1e-20 * (1 + scale)
    # a wrong flow is penalised: the check above can fail
    bad = residual_nabla_db_loss(
        x_t=p["x"], x_next=x_next, eps_theta=p["eps_theta"], eps_pretrained=p["eps_pretrained"],
        vjp_theta=A * (x_next - p["mu_theta"]), vjp_pretrained=A * (x_next - p["mu_pretrained"]),
        fl_t=1.1 * p["c"][step], fl_next=1.1 * p["c"][step + 1], flow_t=torch.zeros_like(x_next),
        flow_next=torch.zeros_like(x_next), a=p["a"], b=p["b"], sigma=p["sig"],
        terminal=step == p["mdp"].num_steps - 1,
    )
    torch.testing.assert_close(bad.reverse, 0.01 * (p["c"][step] ** 2).mean(-1), rtol=1e-8, atol=1e-20)


@pytest.mark.parametrize("beta", [0.5, 2.0], ids=["beta0.5", "beta2"])
def test_residual_db_vanishes_at_the_optimum(beta):
    p = _transitions(10, beta)
    step, x, x_next = p["step"], p["x"], p["x_next"]
    log_flow_t = (p["c"][step] * x).sum(-1) + p["k"][step]
    log_flow_next = (p["c"][step + 1] * x_next).sum(-1) + p["k"][step + 1]
    loss = residual_db_loss(
        log_pf=_log_normal(x_next, p["mu_theta"], p["sig"]), log_pf_pretrained=_log_normal(x_next, p["mu_pretrained"],
                                                                                           p["sig"]),
        log_flow_t=log_flow_t, log_flow_next=log_flow_next,
    )
    assert float(loss.max()) < 1e-18
    off = residual_db_loss(
        log_pf=_log_normal(x_next, p["mu_theta"], p["sig"]), log_pf_pretrained=_log_normal(x_next, p["mu_pretrained"],
                                                                                           p["sig"]),
        log_flow_t=log_flow_t + 0.1, log_flow_next=log_flow_next,
    )
    torch.testing.assert_close(off, torch.full_like(off, 0.01))


def test_dag_db_vanishes_for_the_exact_reverse_process():
    """beta = 0: DB holds with F = the noised marginals and P_F = the exact Gaussian posterior."""
    mdp = build_mdp(SCHED, 8, "ddim", 1.0)
    m, s2 = torch.tensor([0.4, -1.0], dtype=f64), torch.tensor([0.5, 2.0], dtype=f64)
    g = torch.Generator().manual_seed(1)
    for t in range(mdp.num_steps - 1):
        ab_t, ab_n = mdp.alpha_bar[t], mdp.alpha_bar_next[t]
        mean_t, var_t = ab_t.sqrt() * m, ab_t * s2 + 1 - ab_t
        mean_n, var_n = ab_n.sqrt() * m, ab_n * s2 + 1 - ab_n
        cov = (ab_t / ab_n).sqrt() * var_n  # Cov(x_t, x_{t+1}) per dimension
        x_t = mean_t + var_t.sqrt() * torch.randn(5, 2, generator=g, dtype=f64)
        post_mean = mean_n + cov / var_t * (x_t - mean_t)
        post_var = var_n - cov**2 / var_t
        x_n = post_mean + post_var.sqrt() * torch.randn(5, 2, generator=g, dtype=f64)
        loss = dag_db_loss(
            log_pf=_log_normal(x_n, post_mean, post_var.sqrt()),
            log_pb=noising_log_prob(x_t, x_n, ab_t.reshape(1, 1), ab_n.reshape(1, 1)),
            log_flow_t=_log_normal(x_t, mean_t, var_t.sqrt()),
            log_flow_next=_log_normal(x_n, mean_n, var_n.sqrt()),
        )
        assert float(loss.max()) < 1e-20, t


@pytest.mark.parametrize("td_lambda", [0.0, 0.5, 1.0], ids=["lam0", "lam0.5", "lam1"])
def test_pathwise_targets_equal_the_exact_flow_gradient(td_lambda):
    """With the exact flow (fl = c_s, g = 0) the pathwise targets are c_t for every lambda."""
    beta, T = 1.5, 7
    mdp, m, s, w, *_rest, c, k = _problem(T, beta)
    task = GMMTask(
        GaussianMixture(m[None], s[None], torch.ones(1, dtype=f64)), LogLinearReward(w), beta, mdp
    ).double()
    traj = sample_trajectories(task, 11, torch.Generator().manual_seed(2))
    fl = c[None].expand(11, T + 1, 3).clone()
    targets = pathwise_flow_targets(task, traj, fl, td_lambda)
    torch.testing.assert_close(targets, c[None, :T].expand_as(targets), rtol=1e-9, atol=1e-12)
