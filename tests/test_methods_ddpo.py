"""DDPO: per-prompt advantages and the PPO-clipped surrogate against hand computations."""

from __future__ import annotations

import json
from collections import deque

import numpy as np
import pytest
import torch
from conftest import assert_close_rel
from torch.distributions import Normal

from fastnabla.config.loader import build_config
from fastnabla.methods import build_objective
from fastnabla.methods.ddpo import PerPromptStatTracker, batch_advantages, prompt_groups
from fastnabla.run.config import RunConfig
from fastnabla.run.driver import build_trainer
from fastnabla.tasks.gmm.build import build_gmm_task
from fastnabla.training.plan import plan_transitions
from fastnabla.training.trajectories import sample_keyed, select_transitions

SMALL = ["method.name=ddpo", "sampler.num_steps=5", "gmm.network.hidden=16", "gmm.network.layers=2"]


class NumpyTracker:
    """DDPO's per-prompt stat tracker written from its description: a deque of the last ``buffer`` rewards per
    prompt, extended with the batch before use; fewer than ``min_count`` -> the batch's mean and std."""

    def __init__(self, buffer: int, min_count: int):
        self.buffer, self.min_count, self.stats = buffer, min_count, {}

    def update(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        prompts_arr = np.array(prompts)
        out = np.empty_like(rewards)
        for p in np.unique(prompts_arr):
            sel = prompts_arr == p
            self.stats.setdefault(p, deque(maxlen=self.buffer)).extend(rewards[sel])
            pool = np.array(self.stats[p]) if len(self.stats[p]) >= self.min_count else rewards
            out[sel] = (rewards[sel] - pool.mean()) / (pool.std() + 1e-6)
        return out


CASES = [pytest.param(16, 16, id="ddpo-defaults"), pytest.param(4, 3, id="buffer4-min3"),
         pytest.param(3, 3, id="buffer-equals-min"), pytest.param(50, 2, id="long-buffer-min2")]


@pytest.mark.parametrize("buffer, min_count", CASES)
def test_per_prompt_tracker_matches_ddpo_semantics_over_iterations(buffer, min_count):
    g = torch.Generator().manual_seed(0)
    tracker, reference = PerPromptStatTracker(buffer, min_count), NumpyTracker(buffer, min_count)
    animals = ["cat", "dog", "owl", "fox"]
    for _ in range(6):  # the buffers fill across iterations
        prompts = [animals[i] for i in torch.randint(4, (9,), generator=g).tolist()]
        rewards = torch.randn(9, generator=g, dtype=torch.float64) * 3
        got = tracker.advantages(rewards, prompts)
        np.testing.assert_allclose(got.numpy(), reference.update(prompts, rewards.numpy()), rtol=1e-12, atol=1e-12)


def test_tracker_state_round_trips_through_a_checkpoint():
    g = torch.Generator().manual_seed(1)
    first = PerPromptStatTracker(8, 4)
    first.advantages(torch.randn(6, generator=g, dtype=torch.float64), ["a", "b", "a", "a", "b", "c"])
    second = PerPromptStatTracker(8, 4)
    second.load_state(json.loads(json.dumps(first.state())))  # plain data
    batch = torch.randn(5, generator=g, dtype=torch.float64), ["a", "a", "b", "c", "c"]
    assert torch.equal(first.advantages(*batch), second.advantages(*batch))


def test_tasks_without_prompts_use_batch_statistics():
    r = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    want = (r - r.mean()) / (r.std(unbiased=False) + 1e-6)
    torch.testing.assert_close(batch_advantages(r), want, rtol=0, atol=0)


def test_unconditional_task_is_one_group():
    assert prompt_groups(None, 3) == ["", "", ""]
    assert prompt_groups({"prompts": ["a", "b"], "prompt_embeds": None}, 2) == ["a", "b"]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("clip_range", [1e-4, 0.5], ids=["clip1e-4", "clip0.5"])
def test_ppo_loss_and_gradient_match_hand_computation(reduction, clip_range):
    cfg = build_config(RunConfig, None, None, [*SMALL, f"method.ddpo.log_prob_reduction={reduction}",
                                               f"method.ddpo.clip_range={clip_range}"])
    task = build_gmm_task(cfg)
    objective = build_objective(cfg.method, task)
    traj = sample_keyed(task, seed=1, iteration=1, global_batch=8)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # the policy moved since sampling: ratios differ from 1, some beyond the clip range
        head = task.residual.head
        head.weight.copy_(0.02 * torch.randn(head.weight.shape, generator=g))
        head.bias.copy_(0.02 * torch.randn(head.bias.shape, generator=g))
    plan = plan_transitions(seed=1, iteration=1, global_batch=8, local_start=0, local_count=8,
                            num_steps=task.mdp.num_steps, fraction=1.0, num_updates=1)
    state_extras, step_extras = objective.prepare(task, traj, plan, (1, 1), 64)
    batch = select_transitions(traj, plan.rows, plan.steps, state_extras, step_extras)
    loss, info = objective.loss(task, batch, (1, 1))

    r = traj.log_reward.double()
    adv_traj = ((r - r.mean()) / (r.std(unbiased=False) + 1e-6)).clamp(-5, 5)
    want = []
    for i in range(len(batch)):
        t = int(batch.step[i])
        x, x_next = batch.x_t[i : i + 1], batch.x_next[i : i + 1].double()
        a, b, sig = float(task.mdp.a[t]), float(task.mdp.b[t]), float(task.mdp.sigma[t])
        eps = task.policy_eps(x, torch.tensor([t])).double()
        lp = Normal(a * x.double() + b * eps, sig).log_prob(x_next)
        lp_old = Normal(a * x.double() + b * batch.eps_old[i : i + 1].double(), sig).log_prob(x_next)
        lp, lp_old = (lp.mean(), lp_old.mean()) if reduction == "mean" else (lp.sum(), lp_old.sum())
        ratio = torch.exp(lp - lp_old)
        adv = adv_traj[int(plan.rows[i])]
        want.append(torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range)))
    want = torch.stack(want)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-9)
    clipped = float(info["clip_fraction"][0].mean())
    assert (clipped > 0.2) if clip_range == 1e-4 else (clipped < 1.0)
    params = list(task.policy_parameters())
    got_g = torch.autograd.grad(loss.sum(), params)
    want_g = torch.autograd.grad(want.sum(), params)
    for a_, b_ in zip(got_g, want_g, strict=True):
        assert_close_rel(a_, b_, rel=1e-4)


def test_clipped_transitions_carry_no_gradient():
    """Where the ratio left the clip range in the advantage's direction, the surrogate is flat."""
    cfg = build_config(RunConfig, None, None, [*SMALL, "method.ddpo.clip_range=1e-6"])
    task = build_gmm_task(cfg)
    objective = build_objective(cfg.method, task)
    traj = sample_keyed(task, seed=2, iteration=1, global_batch=6)
    with torch.no_grad():
        task.residual.head.bias.fill_(0.05)
    plan = plan_transitions(seed=2, iteration=1, global_batch=6, local_start=0, local_count=6,
                            num_steps=task.mdp.num_steps, fraction=1.0, num_updates=1)
    extras = objective.prepare(task, traj, plan, (2, 1), 64)
    batch = select_transitions(traj, plan.rows, plan.steps, *extras)
    loss, info = objective.loss(task, batch, (2, 1))
    ratio, adv = info["ratio"][0], batch.extras["advantage"]
    flat = ((adv > 0) & (ratio > 1 + 1e-6)) | ((adv < 0) & (ratio < 1 - 1e-6))
    assert 0 < int(flat.sum()) < len(batch)
    grads = torch.autograd.grad(loss[flat].sum(), list(task.policy_parameters()), allow_unused=True)
    assert all(g is None or float(g.abs().max()) == 0 for g in grads)


def test_ddpo_trains_on_the_batch_it_just_sampled():
    cfg = build_config(RunConfig, None, None, [*SMALL, "train.batch_size=8", "train.transition_fraction=0.4"])
    tr = build_trainer(build_gmm_task(cfg), cfg)
    assert [g["name"] for g in tr.optimizer.param_groups] == ["policy"]  # no flow group
    stats = tr.step()
    assert stats["transitions"] > 0 and tr.previous is None  # iteration 1 already trained
    assert abs(stats["advantage"]) < 1e-6  # advantages are centred over the batch
    assert float(torch.cat([p.detach().flatten() for p in tr.task.policy_parameters()]).abs().max()) > 0
