"""The Polyak-averaged flow (``method.flow_ema_decay``): its weights are the closed-form exponential moving average
of the live flow's; the forward target and the pathwise bootstrap read it while the reverse and terminal terms train
the live flow (every gradient against the plain objective on a copy of the task holding those weights); a checkpoint
carries it; settings that cannot use it fail at the config."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close_rel
from gmm_common import checkpoint_round_trip, small_config, trainable_params

from fastnabla.config.loader import ConfigError
from fastnabla.mdp import build_mdp
from fastnabla.methods.nabla_gfn.fl_states import state_forward_looking
from fastnabla.methods.nabla_gfn.flow_average import AveragedFlow
from fastnabla.methods.nabla_gfn.loss import nabla_gfn_loss
from fastnabla.methods.nabla_gfn.objective import NablaGFNObjective
from fastnabla.methods.nabla_gfn.options import NablaGFNOptions
from fastnabla.methods.nabla_gfn.pathwise import pathwise_flow_targets
from fastnabla.run.driver import build_trainer
from fastnabla.tasks.gmm.build import build_gmm_task
from fastnabla.tasks.gmm.mixture import GaussianMixture
from fastnabla.tasks.gmm.model import GMMTask
from fastnabla.tasks.gmm.rewards import GaussianBumpReward
from fastnabla.training.trajectories import gather_transitions, sample_trajectories

T = 5
DECAYS = [0.5, 0.9]


def _task(seed: int = 3) -> GMMTask:
    sched = {"beta_schedule": "linear", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
    prior = GaussianMixture.create([[-2.0, 0.5], [1.5, 1.0], [0.3, -1.8]], [0.5, 0.8, 0.6], [0.5, 0.2, 0.3])
    reward = GaussianBumpReward(torch.tensor([0.8, -0.3], dtype=torch.float64), 1.2)
    task = GMMTask(prior, reward, 1.5, build_mdp(sched, T, "ddim", 1.0), hidden=16, layers=2)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a nonzero residual policy and flow
        for p in [*task.residual.parameters(), *task.flow_net.parameters()]:
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return task


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten() for p in module.parameters()])


def _step_live_flow(task: GMMTask, g: torch.Generator) -> None:
    with torch.no_grad():
        for p in task.flow_net.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))


def _with_flow_weights(task: GMMTask, flat: torch.Tensor) -> GMMTask:
    """A copy of ``task`` whose flow network holds ``flat``: the independent reference of the averaged flow."""
    other = copy.deepcopy(task)
    torch.nn.utils.vector_to_parameters(flat.float(), other.flow_net.parameters())
    return other


def _averaged_after_steps(task: GMMTask, decay: float, steps: int) -> tuple[AveragedFlow, torch.Tensor]:
    """An averaged flow made (on first use, as the first loss makes it) from ``task``'s flow, then ``steps`` random
    optimizer steps each followed by an update; and the closed form ``d^k p_0 + sum_j (1 - d) d^(k-j) p_j``."""
    averaged = AveragedFlow(decay)
    x = torch.randn(4, 2)
    averaged.flow(task, x, torch.zeros(4, dtype=torch.int64), None)
    expected = _flat(task.flow_net)
    g = torch.Generator().manual_seed(11)
    for _ in range(steps):
        _step_live_flow(task, g)
        averaged.update(task)
        expected = decay * expected + (1 - decay) * _flat(task.flow_net)
    return averaged, expected


@pytest.mark.parametrize("decay", DECAYS, ids=[f"d{d}" for d in DECAYS])
def test_the_average_is_the_closed_form_moving_average(decay):
    task = _task()
    averaged, expected = _averaged_after_steps(task, decay, 7)
    assert_close_rel(_flat(averaged.network), expected, 1e-6, "phi_bar")
    assert not torch.allclose(_flat(averaged.network), _flat(task.flow_net))  # it lags the live flow


@pytest.mark.parametrize("decay", DECAYS, ids=[f"d{d}" for d in DECAYS])
def test_the_averaged_flow_is_the_task_flow_with_the_averaged_weights(decay):
    task = _task()
    averaged, expected = _averaged_after_steps(task, decay, 4)
    live = task.flow_net
    x, state = torch.randn(9, 2), torch.arange(9) % (T + 1)
    before = task.flow(x, state).detach()
    got = averaged.flow(task, x, state, None)
    assert_close_rel(got, _with_flow_weights(task, expected).flow(x, state).detach(), 1e-5, "g_phi_bar")
    assert task.flow_net is live and torch.equal(task.flow(x, state).detach(), before)  # the live flow is back
    assert not got.requires_grad


def _batch(task: GMMTask, seed: int = 5):
    traj = sample_trajectories(task, 6, torch.Generator().manual_seed(seed))
    steps = torch.tensor([[0, T - 1], [1, 3], [2, T - 1], [3, 4], [0, 2], [1, T - 1]])  # terminal rows included
    return gather_transitions(traj, steps, torch.Generator().manual_seed(0), {}, {})


OPTS = dict(beta=1.5, weight_forward="eps", weight_reverse="eps", gamma="one", fl_model="pretrained",
            reverse_target="score", forward_trains_flow=False, terminal="paper")


def _loss_and_grads(task: GMMTask, batch, opts: NablaGFNOptions, upstream: torch.Tensor, target_flow=None):
    for p in [*task.policy_parameters(), *task.flow_parameters()]:
        p.grad = None
    per_row, info = nabla_gfn_loss(task, copy.copy(batch), opts, target_flow=target_flow)
    (per_row * upstream).sum().backward()
    grads = {n: [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in ps]
             for n, ps in (("policy", task.policy_parameters()), ("flow", task.flow_parameters()))}
    return {k: v[0].detach() for k, v in info.items()}, grads


def test_the_forward_target_reads_the_average_and_the_live_flow_is_trained():
    """Forward loss and policy gradients = the plain loss on a task holding the averaged weights; reverse and
    terminal losses and the flow's gradients = the plain loss on the live task (the forward loss trains no flow)."""
    task = _task()
    averaged, expected = _averaged_after_steps(task, 0.5, 3)
    batch = _batch(task)
    upstream = torch.rand(len(batch), generator=torch.Generator().manual_seed(2)) + 0.5
    opts = NablaGFNOptions(**OPTS, flow_ema_decay=0.5)
    plain = NablaGFNOptions(**OPTS)
    info, grads = _loss_and_grads(task, batch, opts, upstream,
                                  lambda x, s, c: averaged.flow(task, x, s, c))
    held = _with_flow_weights(task, expected)
    info_held, grads_held = _loss_and_grads(held, batch, plain, upstream)
    info_live, grads_live = _loss_and_grads(task, batch, plain, upstream)
    assert_close_rel(info["loss_forward"], info_held["loss_forward"], 1e-5, "forward loss")
    assert not torch.allclose(info_held["loss_forward"], info_live["loss_forward"])  # the two flows differ here
    for key in ("loss_reverse", "loss_terminal"):
        assert_close_rel(info[key], info_live[key], 1e-6, key)
    assert float(info["loss_terminal"].abs().sum()) > 0
    assert all(float(g.abs().sum()) > 0 for g in [*grads["policy"], *grads["flow"]])  # every parameter is trained
    for got, ref in zip(grads["policy"], grads_held["policy"], strict=True):
        assert_close_rel(got, ref, 1e-5, "policy gradient")
    for got, ref in zip(grads["flow"], grads_live["flow"], strict=True):
        assert_close_rel(got, ref, 1e-5, "flow gradient")


def test_the_pathwise_bootstrap_reads_the_average():
    task = _task()
    averaged, expected = _averaged_after_steps(task, 0.9, 3)
    traj = sample_trajectories(task, 5, torch.Generator().manual_seed(8))
    fl = state_forward_looking(task, traj, NablaGFNOptions(**{**OPTS, "reverse_target": "pathwise"}))
    got = pathwise_flow_targets(task, traj, fl, 0.5, flow=lambda x, s, c: averaged.flow(task, x, s, c))
    held = _with_flow_weights(task, expected)
    assert_close_rel(got, pathwise_flow_targets(held, traj, fl, 0.5), 1e-5, "G_t")
    assert not torch.allclose(got, pathwise_flow_targets(task, traj, fl, 0.5))


@pytest.mark.parametrize("reverse_target", ["pathwise", "score"])
def test_training_updates_the_average_after_every_step_and_resumes_bit_exact(tmp_path, reverse_target):
    cfg = small_config("method.flow_ema_decay=0.8", f"method.reverse_target={reverse_target}")
    straight = build_trainer(build_gmm_task(cfg), cfg)
    start = _flat(straight.task.flow_net)
    straight.fit(2)  # the first iteration only samples; 2 optimizer steps (updates_per_batch=2) in the second
    objective = straight.objective
    assert isinstance(objective, NablaGFNObjective)
    live = _flat(straight.task.flow_net)
    assert not torch.equal(live, start)
    assert not torch.allclose(_flat(objective.averaged_flow.network), live)
    straight.fit(5)
    _, resumed = checkpoint_round_trip(cfg, 3, tmp_path / "ckpt")
    resumed.fit(5)
    assert torch.equal(trainable_params(resumed.task), trainable_params(straight.task))
    assert torch.equal(_flat(resumed.objective.averaged_flow.network), _flat(objective.averaged_flow.network))


def test_a_checkpoint_of_another_setting_is_refused():
    cfg = small_config("method.flow_ema_decay=0.8")
    with pytest.raises(ValueError, match="flow_ema_decay"):
        build_trainer(build_gmm_task(cfg), cfg).objective.load_state({})  # a checkpoint without the average
    plain = small_config("method.flow_ema_decay=0")  # the live flow
    with pytest.raises(ValueError, match="flow_ema_decay"):
        build_trainer(build_gmm_task(plain), plain).objective.load_state({"averaged_flow": {}})


@pytest.mark.parametrize(("overrides", "message"), [
    (["method.flow_ema_decay=0.9", "method.forward_trains_flow=true"], "forward_trains_flow=false"),
    (["method.flow_ema_decay=1.0"], "flow_ema_decay"),
    (["method.flow_ema_decay=-0.1"], "flow_ema_decay"),
], ids=["forward-trains-flow", "one", "negative"])
def test_settings_that_cannot_average_fail_at_the_config(overrides, message):
    with pytest.raises(ConfigError, match=message):
        small_config(*overrides)


@pytest.mark.parametrize("overrides", [
    ["method.name=residual-db", "method.forward_trains_flow=true"],
    ["method.flow=oracle", "method.forward_trains_flow=true"],
], ids=["baseline", "oracle-flow"])
def test_methods_without_a_learned_flow_ignore_the_option(overrides):
    cfg = small_config("method.flow_ema_decay=0.9", *overrides)
    objective = build_trainer(build_gmm_task(cfg), cfg).objective
    assert getattr(objective, "averaged_flow", None) is None
