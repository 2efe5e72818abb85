"""Our residual nabla-DB loss against an independent re-implementation of the authors' release's per-transition
loss, written from its description (docs/maths.md, docs/fidelity.md), with every score taken by autograd of
Gaussian log-densities (not our closed forms) -- under both terminal semantics (``method.terminal``):

* ``release`` (D1-D3): no reverse loss on terminal transitions (the release zeroes the target, and its reverse score
  carries no gradient), ``||g(x_T)||^2`` averaged over the micro-batch's terminal rows, forward-looking strength
  ``abar_0`` at ``x_T``;
* ``paper``: eqs. 16-18 on every transition, ``||g(x_T)||^2`` averaged over the micro-batch like every term,
  strength 1 at ``x_T``.

Both share the release's weights (``w = 1``), ``gamma_t = abar_t``, ``x_hat`` through the policy with its full
Jacobian, the forward loss training the flow, element means, and the output regulariser.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import assert_close_rel

from fastnabla.config.loader import build_config
from fastnabla.methods.nabla_gfn.loss import nabla_gfn_loss
from fastnabla.run.config import RunConfig
from fastnabla.run.presets import get_preset
from fastnabla.tasks.gmm.build import build_gmm_task
from fastnabla.training.trajectories import sample_keyed, select_transitions

T = 8
LAMBDA = 0.3


def _setup(seed: int = 0):
    cfg = build_config(RunConfig, get_preset("gmm-paper"), None, [f"sampler.num_steps={T}", "gmm.network.hidden=16",
                                                                  f"method.output_reg={LAMBDA}", "method.beta=1.7"])
    task = build_gmm_task(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a non-trivial policy and flow
        for p in [*task.policy_parameters(), *task.flow_parameters()]:
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    traj = sample_keyed(task, seed=seed, iteration=1, global_batch=5)
    return cfg, task, traj


def _grads(task, loss: torch.Tensor) -> list[torch.Tensor]:
    params = [*task.policy_parameters(), *task.flow_parameters()]
    return list(torch.autograd.grad(loss, params, allow_unused=False))


def _elem_mean(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).mean(1)


def _log_density(x_next, mean, sigma):
    return _elem_mean(-0.5 * ((x_next - mean) / sigma) ** 2) * x_next[0].numel()  # constants dropped


def release_style_loss(task, batch, beta: float, semantics: str, forward_looking: str = "all") -> torch.Tensor:
    """The micro-batch loss, from the description of the release's training step (module docstring);
    ``forward_looking='terminal'`` keeps the forward-looking term at ``x_T`` only (zero at every other state)."""
    mdp = task.mdp
    x_t, x_next, step, cond = batch.x_t.float(), batch.x_next.float(), batch.step, batch.cond
    terminal = step == mdp.num_steps - 1
    c = mdp.gather(step, x_t.ndim, torch.float32)
    a, b, sigma, abar = c["a"], c["b"], c["sigma"], c["alpha_bar"]
    step_next = (step + 1).clamp(max=mdp.num_steps - 1)
    abar_next = mdp.gather(step_next, x_t.ndim, torch.float32)["alpha_bar"]
    release = semantics == "release"

    def fl(x, s, ab, gamma, at_terminal):
        """beta gamma grad_x log R(x_hat(x)); x_hat through the policy (full Jacobian), x itself at x_T."""
        xi = x.detach().requires_grad_(True)
        x_hat = (xi - (1 - ab).sqrt() * task.policy_eps(xi, s, cond)) / ab.sqrt()
        x_hat = torch.where(at_terminal.reshape(-1, *[1] * (x.ndim - 1)), xi, x_hat)
        (grad,) = torch.autograd.grad(task.log_reward(task.decode(x_hat), cond).sum(), xi)
        return (beta * gamma * grad).detach()

    end_strength = torch.full_like(abar_next, mdp.alpha_bar_terminal if release else 1.0)
    t_mask = terminal.reshape(-1, *[1] * (x_t.ndim - 1))
    fl_next = fl(x_next, step_next, abar_next, torch.where(t_mask, end_strength, abar_next), terminal)
    fl_t = fl(x_t, step, abar, abar, torch.zeros_like(terminal))
    if forward_looking == "terminal":
        fl_next, fl_t = torch.where(t_mask, fl_next, torch.zeros_like(fl_next)), torch.zeros_like(fl_t)
    g_next, g_t = task.flow(x_next, step + 1, cond), task.flow(x_t, step, cond)

    # forward scores: grad_{x_{t+1}} log P_F, with the graph to the policy for the fine-tuned one
    xn = x_next.detach().requires_grad_(True)
    eps = task.policy_eps(x_t, step, cond)
    (score_f,) = torch.autograd.grad(_log_density(xn, a * x_t + b * eps, sigma).sum(), xn, create_graph=True)
    eps_pretrained = task.pretrained_eps(x_t, step, cond).detach()
    (score_f_ref,) = torch.autograd.grad(_log_density(xn, a * x_t + b * eps_pretrained, sigma).sum(), xn)
    target_f = torch.where(t_mask, score_f_ref + fl_next, score_f_ref + g_next + fl_next)
    loss_f = _elem_mean((score_f - target_f) ** 2)

    # reverse scores: grad_{x_t} log P_F (no second-order terms: constants)
    xt = x_t.detach().requires_grad_(True)
    (score_b,) = torch.autograd.grad(_log_density(x_next, a * xt + b * task.policy_eps(xt, step, cond), sigma).sum(),
                                     xt)
    xt = x_t.detach().requires_grad_(True)
    (score_b_ref,) = torch.autograd.grad(
        _log_density(x_next, a * xt + b * task.pretrained_eps(xt, step, cond), sigma).sum(), xt)
    target_b = score_b_ref - g_t - fl_t
    if release:
        target_b = torch.where(t_mask, torch.zeros_like(target_b), target_b)
    loss_b = _elem_mean((score_b - target_b) ** 2)
    if release:  # there the release's term is ||grad_{x_t} log P_F||^2, a constant: it adds to the value only
        loss_b = torch.where(terminal, torch.zeros_like(loss_b), loss_b)

    term_rows = _elem_mean(g_next**2) * terminal
    loss_terminal = term_rows.sum() / (terminal.sum().clamp(min=1) if release else terminal.numel())
    reg = LAMBDA * _elem_mean((eps - batch.eps_old.float()) ** 2)
    return (loss_f + loss_b + reg).mean() + loss_terminal


MICRO_BATCHES = [
    pytest.param((torch.tensor([0, 0, 1, 1, 2, 3, 4, 4, 2]), torch.tensor([0, 7, 3, 7, 5, 1, 6, 2, 7])),
                 id="three-terminal-of-nine"),
    pytest.param((torch.tensor([1, 2, 3]), torch.tensor([7, 0, 4])), id="one-terminal-of-three"),
    pytest.param((torch.tensor([0, 1, 4]), torch.tensor([2, 5, 6])), id="no-terminal"),
]


@pytest.mark.parametrize("forward_looking", ["all", "terminal"])
@pytest.mark.parametrize("fold", [True, False], ids=["folded", "unfolded"])
@pytest.mark.parametrize("semantics", ["release", "paper"])
@pytest.mark.parametrize("rows_steps", MICRO_BATCHES)
def test_loss_and_gradients_match_the_release_style_reimplementation(semantics, fold, rows_steps, forward_looking):
    cfg, task, traj = _setup()
    opts = dataclasses.replace(cfg.method, terminal=semantics, fold_fl_vjp=fold, forward_looking=forward_looking)
    rows, steps = rows_steps
    ours_loss, _ = nabla_gfn_loss(task, select_transitions(traj, rows, steps), opts)
    ours = ours_loss.mean()
    theirs = release_style_loss(task, select_transitions(traj, rows, steps), opts.beta, semantics, forward_looking)
    assert_close_rel(ours.detach(), theirs.detach(), 1e-5, "loss")
    for i, (mine, want) in enumerate(zip(_grads(task, ours), _grads(task, theirs), strict=True)):
        assert_close_rel(mine, want, 1e-4, f"gradient {i}")


def test_the_two_semantics_differ_where_the_release_says():
    """On a micro-batch with terminal rows the flow gradient differs between the semantics; without terminal rows
    the two are the same loss."""
    cfg, task, traj = _setup()
    losses = {}
    for rows, steps, name in ((torch.tensor([0, 1, 2]), torch.tensor([7, 3, 5]), "terminal"),
                              (torch.tensor([0, 1, 2]), torch.tensor([2, 3, 5]), "none")):
        for semantics in ("release", "paper"):
            opts = dataclasses.replace(cfg.method, terminal=semantics)
            loss, _ = nabla_gfn_loss(task, select_transitions(traj, rows, steps), opts)
            losses[name, semantics] = _grads(task, loss.mean())
    flow = len(list(task.policy_parameters()))
    assert any(not torch.allclose(a, b) for a, b in zip(losses["terminal", "release"][flow:],
                                                         losses["terminal", "paper"][flow:], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(losses["none", "release"], losses["none", "paper"], strict=True))


def test_terminal_only_tables_hold_the_terminal_gradient_and_zeros():
    """The precomputed forward-looking tables (fl_model=pretrained, pathwise targets) follow the same rule."""
    from fastnabla.methods.nabla_gfn.fl_states import forward_looking_table

    cfg, task, traj = _setup()
    full = forward_looking_table(task, traj, cfg.method).dense()
    terminal_only = forward_looking_table(task, traj, dataclasses.replace(cfg.method, forward_looking="terminal"))
    dense = terminal_only.dense()
    assert torch.equal(dense[:, -1], full[:, -1]) and float(full[:, -1].abs().max()) > 0
    assert float(dense[:, :-1].abs().max()) == 0 and float(full[:, :-1].abs().max()) > 0
