"""Residual DB (eq. 20) and DAG-DB objectives against a hand computation on the analytic task.

The independent computation writes each term from its definition: Gaussian log-densities from
``torch.distributions.Normal`` with the step coefficients read off the MDP, the one-step prediction and the
bump reward from their formulas, the DB residual squared; gradients by autograd of that expression."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close_rel
from torch.distributions import Normal

from fastnabla.config.loader import build_config
from fastnabla.methods import build_objective
from fastnabla.run.config import RunConfig
from fastnabla.tasks.gmm.build import build_gmm_task
from fastnabla.training.plan import plan_transitions
from fastnabla.training.trajectories import sample_keyed, select_transitions

SMALL = ["sampler.num_steps=6", "gmm.network.hidden=16", "gmm.network.layers=2", "method.db.flow_hidden=16",
         "method.db.flow_layers=2", "method.beta=1.5"]
CENTER, WIDTH = torch.tensor([2.0, 1.0], dtype=torch.float64), 2.5  # the default bump reward


def _setup(*extra: str, n: int = 6):
    cfg = build_config(RunConfig, None, None, [*SMALL, *extra])
    task = build_gmm_task(cfg)
    objective = build_objective(cfg.method, task, seed=3)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # move the zero-initialised output layers so every term is non-trivial
        for head, scale in ((task.residual.head, 0.05), (objective.module.head, 0.3)):
            head.weight.copy_(scale * torch.randn(head.weight.shape, generator=g))
            head.bias.copy_(scale * torch.randn(head.bias.shape, generator=g))
    traj = sample_keyed(task, seed=5, iteration=2, global_batch=n)
    with torch.no_grad():  # the stored eps_old comes from an "older" policy
        traj.eps_old.add_(0.05 * torch.randn(traj.eps_old.shape, generator=g))
    plan = plan_transitions(seed=5, iteration=2, global_batch=n, local_start=0, local_count=n,
                            num_steps=task.mdp.num_steps, fraction=1.0, num_updates=1)
    state_extras, step_extras = objective.prepare(task, traj, plan, (5, 2), 7)
    batch = select_transitions(traj, plan.rows, plan.steps, state_extras, step_extras)
    return cfg, task, objective, traj, batch


def _log_reward(y: torch.Tensor) -> torch.Tensor:
    return -((y - CENTER) ** 2).sum(-1) / (2 * WIDTH**2)


def _hand_loss(cfg, task, objective, batch) -> torch.Tensor:
    """The DB loss of every transition of ``batch``, written from the definitions (float64 densities)."""
    mdp, db = task.mdp, cfg.method.db
    T = mdp.num_steps
    state_abar = torch.cat([mdp.alpha_bar, mdp.alpha_bar_next[-1:]])
    gamma = {"one": lambda ab: torch.ones_like(ab), "alpha_bar": lambda ab: ab}[db.gamma]
    eps_model = task.policy_eps if db.fl_model == "policy" else task.pretrained_eps
    out = []
    for i in range(len(batch)):
        t = int(batch.step[i])
        x, x_next = batch.x_t[i : i + 1], batch.x_next[i : i + 1]
        s = torch.tensor([t])
        a, b, sig = float(mdp.a[t]), float(mdp.b[t]), float(mdp.sigma[t])
        eps = task.policy_eps(x, s)
        log_pf = Normal(a * x.double() + b * eps.double(), sig).log_prob(x_next.double()).sum()
        scale = x.numel() if db.log_prob_reduction == "mean" else 1

        def log_flow(state: int, y: torch.Tensor) -> torch.Tensor:
            if state == T:
                return cfg.method.beta * _log_reward(y.double())[0]
            ab = state_abar[state]
            with torch.no_grad():
                e = eps_model(y, torch.tensor([state])).double()
            x_hat = (y.double() - (1 - ab).sqrt() * e) / ab.sqrt()
            g = objective.module(y, torch.tensor([state]), None)[0].double()
            return cfg.method.beta * gamma(ab) * _log_reward(x_hat)[0] + g

        if objective.name == "residual-db":
            with torch.no_grad():
                eps_pretrained = task.pretrained_eps(x, s).double()
            other = Normal(a * x.double() + b * eps_pretrained, sig).log_prob(x_next.double()).sum()
        else:
            ab_t, ab_n = mdp.alpha_bar[t], mdp.alpha_bar_next[t]
            other = Normal((ab_t / ab_n).sqrt() * x_next.double(), (1 - ab_t / ab_n).sqrt()).log_prob(x.double()).sum()
        delta = log_flow(t, x) + (log_pf - other) / scale - log_flow(t + 1, x_next)
        reg = ((eps.double() - batch.eps_old[i : i + 1].double()) ** 2).mean()
        out.append(delta**2 + db.output_reg * reg)
    return torch.stack(out)


def _grads(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return torch.autograd.grad(loss.sum(), params, allow_unused=True)


CASES = [
    pytest.param("residual-db", [], id="residual-db"),
    pytest.param("residual-db", ["method.db.gamma=alpha_bar", "method.db.fl_model=pretrained",
                                 "method.db.output_reg=0.5"], id="residual-db-gamma-abar-reference-fl"),
    pytest.param("residual-db", ["method.db.log_prob_reduction=mean"], id="residual-db-mean-logprob"),
    pytest.param("dag-db", [], id="dag-db"),
    pytest.param("dag-db", ["method.db.gamma=alpha_bar", "method.db.log_prob_reduction=mean"],
                 id="dag-db-gamma-abar-mean-logprob"),
]


@pytest.mark.parametrize(("name", "extra"), CASES)
def test_db_loss_and_gradients_match_hand_computation(name, extra):
    cfg, task, objective, _, batch = _setup(f"method.name={name}", *extra)
    assert bool((batch.step == task.mdp.num_steps - 1).any()) and bool((batch.step == 0).any())
    loss, info = objective.loss(task, batch, (5, 2))
    want = _hand_loss(cfg, task, objective, batch)
    torch.testing.assert_close(loss.double(), want, rtol=2e-4, atol=1e-6)
    assert float(want.detach().min()) > 1e-4  # the case is away from the optimum
    params = [*task.policy_parameters(), *objective.module.parameters()]
    # fp32 networks: gradients agree to ~1e-6 of their scale (sums of per-transition terms of both signs)
    for got, ref in zip(_grads(loss, params), _grads(want, params), strict=True):
        assert_close_rel(got, ref, rel=1e-4)
    assert set(info) >= {"loss", "loss_db", "loss_output_reg"}


def test_terminal_transition_uses_the_reward_itself():
    """At ``x_T`` the log-flow is ``beta log R(x_T)``: the flow network's output there has no effect."""
    cfg, task, objective, traj, batch = _setup("method.name=dag-db")
    last = batch.step == task.mdp.num_steps - 1
    before, _ = objective.loss(task, batch, (5, 2))
    with torch.no_grad():
        objective.module.head.bias.add_(3.0)  # shifts g at every state by the same constant
    after, _ = objective.loss(task, batch, (5, 2))
    # g(x_t) - g(x_{t+1}) cancels except at the terminal transition, which sees only g(x_t)
    torch.testing.assert_close(after[~last], before[~last], rtol=1e-4, atol=1e-5)
    assert bool((after[last] != before[last]).all())
    torch.testing.assert_close(batch.extras["logr_next"][last], traj.log_reward[batch.traj_index[last]])


def test_db_objectives_own_a_scalar_flow_and_train_it():
    cfg, task, objective, _, _ = _setup("method.name=residual-db")
    x = torch.randn(5, 2)
    assert objective.module(x, torch.arange(5), None).shape == (5,)
    assert objective.trains_flow and not getattr(objective, "on_policy", False)
    n_flow = sum(p.numel() for p in objective.module.parameters())
    assert n_flow > 0 and math.isfinite(n_flow)
