"""Trajectory sampling, transition selection and the pathwise TD(lambda) flow targets (from an FL table, and in one
sweep that computes the FL gradients from the same frozen-network forwards)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import assert_close_rel

from fastnabla.mdp import build_mdp
from fastnabla.methods.nabla_gfn.fl_states import forward_looking_fn, forward_looking_table, state_forward_looking
from fastnabla.methods.nabla_gfn.options import NablaGFNOptions
from fastnabla.methods.nabla_gfn.pathwise import pathwise_flow_targets, pathwise_targets_and_forward_looking
from fastnabla.ops.forward_looking.reference import forward_looking_gradient
from fastnabla.tasks.gmm.mixture import GaussianMixture
from fastnabla.tasks.gmm.model import GMMTask
from fastnabla.tasks.gmm.rewards import GaussianBumpReward
from fastnabla.training.trajectories import gather_transitions, sample_trajectories, stratified_steps

F64 = torch.float64
T = 6
BETA = 1.5


def _task(seed=1):
    sched = {"beta_schedule": "linear", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
    mdp = build_mdp(sched, T, "ddim", 1.0)
    prior = GaussianMixture.create([[-2.0, 0.5], [1.5, 1.0], [0.3, -1.8]], [0.5, 0.8, 0.6], [0.5, 0.2, 0.3])
    task = GMMTask(prior, GaussianBumpReward(torch.tensor([0.8, -0.3], dtype=F64), 1.2), BETA, mdp, hidden=16, layers=2)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # nonzero residual policy and flow
        for p in list(task.residual.parameters()) + list(task.flow_net.parameters()):
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return task


# --- stratified_steps ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_steps", "fraction"), [(50, 0.1), (7, 0.3), (13, 0.5), (6, 0.9), (33, 0.05)],
                         ids=["50-0.1", "7-0.3", "13-0.5", "6-0.9", "33-0.05"])
def test_stratified_steps(num_steps, fraction):
    n = 400
    steps = stratified_steps(n, num_steps, fraction, torch.Generator().manual_seed(3))
    k = max(1, min(num_steps - 1, round(fraction * num_steps)))
    assert steps.shape == (n, k + 1) and steps.dtype == torch.int64
    assert bool((steps[:, -1] == num_steps - 1).all())  # terminal transition always included
    assert bool((steps >= 0).all() and (steps < num_steps).all())
    assert all(len(set(row)) == k + 1 for row in steps.tolist())  # distinct per row
    # one step per chunk: chunk i covers [round(i (T-1) / k), round((i+1) (T-1) / k)) of the steps 0..T-2
    edges = np.round(np.arange(k + 1) * (num_steps - 1) / k).astype(int)
    for i in range(k):
        col = steps[:, i]
        assert bool(((col >= int(edges[i])) & (col < int(edges[i + 1]))).all()), f"chunk {i}"
        # uniform within the chunk: with 400 rows every step of a chunk (<= 10 wide) is drawn
        assert set(col.tolist()) == set(range(int(edges[i]), int(edges[i + 1])))


def test_stratified_steps_full_and_errors():
    assert torch.equal(stratified_steps(3, 7, 1.0), torch.arange(7).expand(3, 7))
    assert torch.equal(stratified_steps(2, 1, 0.5), torch.zeros(2, 1, dtype=torch.int64))
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            stratified_steps(3, 7, bad)


# --- sample_trajectories -------------------------------------------------------------------------------


@pytest.mark.parametrize("use_pretrained", [False, True], ids=["policy", "reference"])
def test_sample_trajectories_matches_hand_loop(use_pretrained):
    task, n = _task(), 5
    traj = sample_trajectories(task, n, torch.Generator().manual_seed(42), use_pretrained=use_pretrained)
    assert traj.states.shape == (n, T + 1, 2) and traj.eps_old.shape == (n, T, 2)
    assert traj.num == n and traj.num_steps == T and traj.cond is None

    g = torch.Generator().manual_seed(42)
    x = torch.randn(n, 2, generator=g)
    states, epss = [x], []
    mdp = task.mdp
    for t in range(T):
        step = torch.full((n,), t, dtype=torch.int64)
        eps = task.pretrained_eps(x, step) if use_pretrained else task.policy_eps(x, step)
        z = torch.randn(n, 2, generator=g)
        x = float(mdp.a[t]) * x + float(mdp.b[t]) * eps + float(mdp.sigma[t]) * z
        states.append(x)
        epss.append(eps)
    assert_close_rel(traj.states, torch.stack(states, 1).detach(), 1e-6)
    assert_close_rel(traj.eps_old, torch.stack(epss, 1).detach(), 1e-6)
    assert_close_rel(traj.log_reward, task.reward.log_reward(x.detach().double()), 1e-5)
    if not use_pretrained:  # the policy really differs from the reference here
        ref = sample_trajectories(task, n, torch.Generator().manual_seed(42), use_pretrained=True)
        assert float((ref.states - traj.states).abs().max()) > 1e-3


# --- gather_transitions ----------------------------------------------------------------------------------


def test_gather_transitions_pairs_and_extras():
    n, d = 4, 3
    # states encode (row, state index): x[r, s] = (r, s, r * s)
    rr, ss = torch.meshgrid(torch.arange(n), torch.arange(T + 1), indexing="ij")
    states = torch.stack([rr, ss, rr * ss], -1).float()
    eps_old = -states[:, :T] - 0.5
    cond = torch.arange(n).float() * 10
    traj = SimpleNamespace(states=states, eps_old=eps_old, cond=cond, num=n, num_steps=T)
    state_extra = torch.randn(n, T + 1, 2, 5)
    step_extra = torch.randn(n, T)
    steps = torch.tensor([[0, 5], [2, 5], [3, 5], [1, 4]])
    batch = gather_transitions(traj, steps, torch.Generator().manual_seed(0), {"fl": state_extra}, {"w": step_extra})
    assert len(batch) == steps.numel() and batch.x_t.shape == (steps.numel(), d)
    seen = set()
    for i in range(len(batch)):
        r, s = int(batch.x_t[i, 0]), int(batch.x_t[i, 1])
        seen.add((r, s))
        assert int(batch.step[i]) == s
        assert torch.equal(batch.x_next[i], states[r, s + 1])
        assert torch.equal(batch.eps_old[i], eps_old[r, s])
        assert float(batch.cond[i]) == 10 * r
        assert torch.equal(batch.extras["fl_t"][i], state_extra[r, s])
        assert torch.equal(batch.extras["fl_next"][i], state_extra[r, s + 1])
        assert torch.equal(batch.extras["w"][i], step_extra[r, s])
    assert seen == {(r, int(s)) for r in range(n) for s in steps[r]}
    halves = batch.split(2)
    assert [len(h) for h in halves] == [4, 4]
    assert torch.equal(torch.cat([h.extras["fl_next"] for h in halves]), batch.extras["fl_next"])
    assert torch.equal(torch.cat([h.cond for h in halves]), batch.cond)


# --- pathwise targets -----------------------------------------------------------------------------------


def _mu_pretrained(task, x, t):
    step = torch.full((x.shape[0],), t, dtype=torch.int64)
    return float(task.mdp.a[t]) * x + float(task.mdp.b[t]) * task.pretrained_eps(x, step)


def _fl_brute(task, x, s):
    """beta gamma_s grad log R(x_hat(x_s)) with the policy's eps (full Jacobian); beta grad log R(x) at s = T."""
    xi = x.detach().double().requires_grad_(True)
    if s == T:
        return BETA * torch.autograd.grad(task.reward.log_reward(xi).sum(), xi)[0]
    ab = float(task.mdp.alpha_bar[s])
    eps = task.policy_eps(xi.float(), torch.full((x.shape[0],), s)).double()
    x_hat = (xi - (1 - ab) ** 0.5 * eps) / ab**0.5
    return BETA * ab * torch.autograd.grad(task.reward.log_reward(x_hat).sum(), xi)[0]


def _chain_vjp(task, states, t, k, v):
    """J_{t->k}^T v for the composition mu#_{k-1} o ... o mu#_t, linearised along the stored trajectory."""
    x_t = states[:, t].double().requires_grad_(True)
    y = x_t
    for s in range(t, k):
        stored = states[:, s].double()
        y = _mu_pretrained(task, y, s) + (states[:, s + 1].double() - _mu_pretrained(task, stored, s)).detach()
    return torch.autograd.grad((y * v).sum(), x_t)[0]


@pytest.mark.parametrize("td_lambda", [0.0, 0.5, 1.0], ids=["lambda0", "lambda0.5", "lambda1"])
def test_pathwise_targets_match_brute_force(td_lambda):
    task = _task()
    traj = sample_trajectories(task, 5, torch.Generator().manual_seed(8))
    opts = NablaGFNOptions(fl_model="policy", beta=BETA, gamma="alpha_bar", fl_jacobian="full")
    fl = state_forward_looking(task, traj, opts)
    fl_ref = torch.stack([_fl_brute(task, traj.states[:, s], s) for s in range(T + 1)], 1)
    assert_close_rel(fl, fl_ref, 1e-5, "state FL")

    targets = pathwise_flow_targets(task, traj, fl, td_lambda)
    assert targets.shape == (5, T, 2)
    states = traj.states
    # G_t = sum_{k=t+1}^{T-1} (1-l) l^{k-t-1} J_{t->k}^T h_k + l^{T-1-t} J_{t->T}^T beta grad log R(x_T)
    h = [fl_ref[:, k] + task.flow(states[:, k], torch.full((5,), k)).detach().double() for k in range(T)]
    for t in range(T):
        ref = td_lambda ** (T - 1 - t) * _chain_vjp(task, states, t, T, fl_ref[:, T])
        for k in range(t + 1, T):
            ref = ref + (1 - td_lambda) * td_lambda ** (k - t - 1) * _chain_vjp(task, states, t, k, h[k])
        assert_close_rel(targets[:, t], ref, 1e-4, f"G_{t}")
    assert float(h[3].abs().max()) > 0.1 * float(fl_ref[:, 3].abs().max())  # the flow term matters


@pytest.mark.parametrize("terminal_rows", [[0, 3, 4], [5], [], [0, 1, 2, 3, 4, 5]],
                         ids=["three", "last", "none", "all"])
def test_forward_looking_runs_the_network_on_non_terminal_rows_only(monkeypatch, terminal_rows):
    """A batch mixing x_T with other states gives the reference op's result on the whole batch (same smoothing
    draws), while the network sees only the non-terminal rows (x_hat(x_T) = x_T)."""
    task = _task()
    traj = sample_trajectories(task, 6, torch.Generator().manual_seed(4))
    terminal = torch.zeros(6, dtype=torch.bool)
    terminal[terminal_rows] = True
    s = torch.where(terminal, T, torch.tensor([1, 2, 3, 4, 5, 2]))
    x = traj.states[torch.arange(6), s].float()
    step = s.clamp(max=T - 1)
    ab = task.mdp.gather(step, x.ndim, x.dtype)["alpha_bar"]
    noise = torch.randn(3, 6, 2, generator=torch.Generator().manual_seed(5))
    opts = NablaGFNOptions(fl_model="policy", beta=BETA, gamma="alpha_bar", fl_jacobian="full", fl_noise_var=0.04,
                           fl_num_noise=3)
    want = forward_looking_gradient(x, ab, terminal, lambda y: task.policy_eps(y, step), task.log_reward, BETA,
                                    decode=task.decode, noise_var=0.04, num_noise=3, noise=noise)
    seen = []
    policy_eps = task.policy_eps
    monkeypatch.setattr(task, "policy_eps", lambda y, st, cond=None: seen.append(st.clone()) or policy_eps(y, st, cond))
    got = forward_looking_fn(task, opts)(x, step, ab, terminal, None, noise)
    assert_close_rel(got, want, 1e-5, "FL on a mixed batch")
    rows_seen = torch.cat(seen) if seen else torch.zeros(0, dtype=torch.long)
    assert sorted(rows_seen.tolist()) == sorted(step[~terminal].tolist())


def test_pathwise_lambda_range():
    task = _task()
    traj = sample_trajectories(task, 2, torch.Generator().manual_seed(0))
    fl = torch.zeros(2, T + 1, 2)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="td_lambda"):
            pathwise_flow_targets(task, traj, fl, bad)


# (id, FL options, td_lambda, trajectories swept together): the one-sweep form against the table and its sweep
ONE_SWEEP_CASES = [
    ("default", {}, 0.5, None),
    ("gamma-alpha-bar-release-terminal", {"gamma": "alpha_bar", "terminal": "release"}, 0.8, None),
    ("keyed-smoothing-K2", {"fl_noise_var": 0.05, "fl_num_noise": 2}, 0.5, None),
    ("tweedie-jacobian", {"fl_jacobian": "tweedie"}, 0.0, None),
    ("identity-jacobian-lambda1", {"fl_jacobian": "identity"}, 1.0, None),
    ("chunks-of-3", {}, 0.5, 3),
]


@pytest.mark.parametrize("fl_opts, td_lambda, chunk", [c[1:] for c in ONE_SWEEP_CASES],
                         ids=[c[0] for c in ONE_SWEEP_CASES])
def test_one_sweep_equals_the_fl_table_and_its_sweep(monkeypatch, fl_opts, td_lambda, chunk):
    """``pathwise_targets_and_forward_looking`` gives the FL table of ``forward_looking_table`` (same keyed smoothing
    draws) and the targets ``pathwise_flow_targets`` computes from it (both checked against brute force above), with
    one frozen-network forward per non-terminal state where the two take two."""
    task = _task()
    traj = sample_trajectories(task, 7, torch.Generator().manual_seed(8))
    opts = NablaGFNOptions(fl_model="pretrained", beta=BETA, reverse_target="pathwise", **fl_opts)
    rows_seen = []
    pretrained_eps = task.pretrained_eps
    monkeypatch.setattr(task, "pretrained_eps",
                        lambda y, st, cond=None: rows_seen.append(st.numel()) or pretrained_eps(y, st, cond))
    fl_table = forward_looking_table(task, traj, opts, noise_key=(4, 9)).dense()
    targets = pathwise_flow_targets(task, traj, fl_table, td_lambda, chunk=chunk)
    assert sum(rows_seen) == 2 * 7 * T  # FL and the sweep's VJP each run the network at the T non-terminal states
    rows_seen.clear()
    fl, got = pathwise_targets_and_forward_looking(task, traj, opts, td_lambda, chunk=chunk, noise_key=(4, 9))
    assert sum(rows_seen) == 7 * T
    assert fl.shape == fl_table.shape and got.shape == targets.shape == (7, T, 2)
    assert_close_rel(fl, fl_table, 1e-6, "FL at every state")
    assert_close_rel(got, targets, 1e-6, "G_t")
    other = forward_looking_table(task, traj, opts, noise_key=(4, 10)).dense()  # another iteration's draws
    assert torch.equal(other, fl_table) != (opts.fl_noise_var > 0)


@pytest.mark.parametrize("fl_opts", [{"fl_model": "policy"}, {"forward_looking": "terminal"}],
                         ids=["fl-from-policy", "fl-terminal-only"])
def test_one_sweep_refuses_fl_it_cannot_share(fl_opts):
    task = _task()
    traj = sample_trajectories(task, 2, torch.Generator().manual_seed(0))
    opts = NablaGFNOptions(beta=BETA, reverse_target="pathwise", **{"fl_model": "pretrained", **fl_opts})
    with pytest.raises(ValueError, match="compute the FL table first"):
        pathwise_targets_and_forward_looking(task, traj, opts, 0.5)
