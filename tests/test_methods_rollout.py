"""ReFL, DRaFT-K and DRaFT-LV against hand-written rollouts on the analytic task.

The reference rollouts use the step noise the trajectories were sampled with (given explicitly, not recovered),
the one-step prediction and the bump reward from their formulas; gradients by autograd of those expressions."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_rel

from fastnabla.config.loader import build_config
from fastnabla.methods import build_objective
from fastnabla.methods.draft import lv_noise
from fastnabla.methods.options import ReFLOptions
from fastnabla.methods.refl import stop_step_range, stop_steps
from fastnabla.run.config import RunConfig
from fastnabla.run.driver import build_trainer
from fastnabla.tasks.gmm.build import build_gmm_task
from fastnabla.training.trajectories import sample_trajectories

SMALL = ["sampler.num_steps=7", "gmm.network.hidden=16", "gmm.network.layers=2"]
CENTER, WIDTH = torch.tensor([2.0, 1.0]), 2.5


def _log_reward(y: torch.Tensor) -> torch.Tensor:
    return -((y - CENTER.to(y)) ** 2).sum(-1) / (2 * WIDTH**2)


def _setup(*extra: str, n: int = 5):
    """Task with a non-zero residual policy, its objective, trajectories sampled with known noise."""
    cfg = build_config(RunConfig, None, None, [*SMALL, *extra])
    task = build_gmm_task(cfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        head = task.residual.head
        head.weight.copy_(0.1 * torch.randn(head.weight.shape, generator=g))
        head.bias.copy_(0.1 * torch.randn(head.bias.shape, generator=g))
    x0 = torch.randn(n, 2, generator=g)
    noise = torch.randn(task.mdp.num_steps, n, 2, generator=g)
    traj = sample_trajectories(task, n, x0=x0, step_noise=noise)
    traj.index = torch.tensor([3, 8, 1, 12, 5])[:n]
    return cfg, task, build_objective(cfg.method, task), traj, noise


def _step(task, x: torch.Tensor, t: int, z: torch.Tensor) -> torch.Tensor:
    m = task.mdp
    eps = task.policy_eps(x, torch.full((x.shape[0],), t, dtype=torch.int64))
    return float(m.a[t]) * x + float(m.b[t]) * eps + float(m.sigma[t]) * z


def _check_grads(task, loss: torch.Tensor, want: torch.Tensor) -> None:
    params = list(task.policy_parameters())
    for a, b in zip(torch.autograd.grad(loss.sum(), params), torch.autograd.grad(want.sum(), params), strict=True):
        assert_close_rel(a, b, rel=1e-4)


# --- ReFL ------------------------------------------------------------------------------------------------------


def test_refl_stop_steps_are_the_papers_and_keyed():
    first, last = stop_step_range(50, ReFLOptions())
    assert (first, last) == (35, 49)
    ids = torch.arange(400)
    steps = stop_steps(0, 3, ids, 50, ReFLOptions())
    assert int(steps.min()) == 35 and int(steps.max()) == 49 and len(set(steps.tolist())) == 15
    # a trajectory's stop step depends on (seed, iteration, id) only, not on the batch it comes in
    assert torch.equal(stop_steps(0, 3, ids[[7, 2]], 50, ReFLOptions()), steps[[7, 2]])
    assert not torch.equal(stop_steps(0, 4, ids, 50, ReFLOptions()), steps)
    assert stop_step_range(4, ReFLOptions()) == (2, 3)
    assert stop_step_range(10, ReFLOptions(stop_min=0.0, stop_max=0.1)) == (0, 0)


@pytest.mark.parametrize("relu", [False, True], ids=["logR", "relu"])
def test_refl_loss_and_gradient_match_hand_computation(relu):
    extra = ["method.name=refl", f"method.refl.relu={str(relu).lower()}", "method.refl.stop_min=0.3"]
    if relu:  # a log-linear reward, positive on part of the samples, so the ReLU acts
        extra += ["gmm.reward.kind=loglinear", "gmm.reward.weights=[0.4,0.3]"]
    cfg, task, objective, traj, _ = _setup(*extra)
    loss, info = objective.loss(task, traj, (2, 9))
    stops = stop_steps(2, 9, traj.index, task.mdp.num_steps, cfg.method.refl)
    assert len(set(stops.tolist())) > 1
    want = []
    for i, t in enumerate(stops.tolist()):
        x = traj.states[i : i + 1, t]
        ab = float(task.mdp.alpha_bar[t])
        eps = task.policy_eps(x, torch.tensor([t]))
        x_hat = (x - (1 - ab) ** 0.5 * eps) / ab**0.5
        log_r = x_hat[0] @ torch.tensor([0.4, 0.3]) if relu else _log_reward(x_hat)[0]
        want.append(-torch.relu(log_r) if relu else -log_r)
    want = torch.stack(want)
    if relu:
        assert bool((want == 0).any()) and bool((want < 0).any())
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    _check_grads(task, loss, want)
    torch.testing.assert_close(info["stop_step"][0], stops.float())


# --- DRaFT-K ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 7], ids=["K1", "K3", "K-all"])
def test_draft_k_matches_backprop_through_the_last_k_steps(k):
    _, task, objective, traj, noise = _setup("method.name=draft-k", f"method.draft.k={k}")
    loss, _ = objective.loss(task, traj, (0, 1))
    T = task.mdp.num_steps
    x = traj.states[:, T - k]
    for t in range(T - k, T):
        x = _step(task, x, t, noise[t])
    want = -_log_reward(x)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    # on the policy that sampled them, the replayed final states are the stored ones
    torch.testing.assert_close(loss.detach(), -traj.log_reward, rtol=1e-5, atol=1e-6)
    _check_grads(task, loss, want)


def test_draft_k_gradient_reaches_earlier_steps_only_when_k_covers_them():
    """With K = 1 the residual's output at earlier steps gets no gradient; with K = 3 it does."""
    for k, expect_early in ((1, False), (3, True)):
        _, task, objective, traj, _ = _setup("method.name=draft-k", f"method.draft.k={k}")
        early = torch.zeros(1, requires_grad=True)
        original = task.policy_eps

        def shifted(x, step, cond=None, _orig=original, _early=early, _at=task.mdp.num_steps - 3):
            return _orig(x, step, cond) + (step == _at).float()[:, None] * _early

        task.policy_eps = shifted
        loss, _ = objective.loss(task, traj, (0, 1))
        (g,) = torch.autograd.grad(loss.sum(), early, allow_unused=True)
        assert (g is not None and float(g.abs()) > 0) == expect_early


# --- DRaFT-LV --------------------------------------------------------------------------------------------------


def test_draft_lv_matches_hand_noising_denoising():
    cfg, task, objective, traj, _ = _setup("method.name=draft-lv", "method.draft.lv_samples=3")
    loss, _ = objective.loss(task, traj, (4, 6))
    T, m = task.mdp.num_steps, task.mdp
    z = lv_noise(4, 6, traj.index, 3, (2,))  # [n, 2, N, d]
    ratio = float(m.alpha_bar[T - 1] / m.alpha_bar_next[T - 1])
    rewards = []
    for j in range(3):
        x1 = ratio**0.5 * traj.states[:, T] + (1 - ratio) ** 0.5 * z[j, 0]
        rewards.append(_log_reward(_step(task, x1, T - 1, z[j, 1])))
    want = -torch.stack(rewards).mean(0)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    _check_grads(task, loss, want)
    # the draws belong to the trajectory: a sub-batch gets the same per-trajectory losses
    sub = type(traj)(traj.states[[3, 1]], traj.eps_old[[3, 1]], None, traj.log_reward[[3, 1]], traj.index[[3, 1]])
    torch.testing.assert_close(objective.loss(task, sub, (4, 6))[0], loss[[3, 1]])


@pytest.mark.parametrize("name", ["refl", "draft-k", "draft-lv"])
def test_rollout_methods_train_on_fresh_trajectories_without_a_flow(name):
    cfg = build_config(RunConfig, None, None, [*SMALL, f"method.name={name}", "train.batch_size=6",
                                               "train.updates_per_batch=2"])
    tr = build_trainer(build_gmm_task(cfg), cfg)
    assert [g["name"] for g in tr.optimizer.param_groups] == ["policy"]
    stats = tr.step()
    assert stats["transitions"] == 6 and tr.previous is None  # each trajectory once, at iteration 1
    assert float(torch.cat([p.detach().flatten() for p in tr.task.policy_parameters()]).abs().max()) > 0
