"""Folding the FL gradient's VJP into the reverse score's VJP changes no loss value and no gradient."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import assert_close_rel

from fastnabla.config.loader import build_config
from fastnabla.methods.nabla_gfn.fl_states import fl_noise
from fastnabla.methods.nabla_gfn.loss import nabla_gfn_loss
from fastnabla.run.config import RunConfig
from fastnabla.run.presets import get_preset
from fastnabla.tasks.gmm.build import build_gmm_task
from fastnabla.training.trajectories import sample_keyed, select_transitions

CASES = [
    pytest.param({"fl_model": "policy"}, id="fl-policy"),
    pytest.param({"fl_model": "pretrained"}, id="fl-reference"),
    pytest.param({"fl_model": "policy", "fl_noise_var": 0.01, "fl_num_noise": 3}, id="fl-policy-smoothed"),
    pytest.param({"fl_model": "pretrained", "prior_strength": 0.7, "gamma": "sqrt_alpha_bar"}, id="eta0.7"),
]


def _task_and_batch(seed: int = 0):
    cfg = build_config(RunConfig, get_preset("gmm-paper"), None, ["sampler.num_steps=8", "gmm.network.hidden=16"])
    task = build_gmm_task(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-trivial policy and flow
        for p in [*task.policy_parameters(), *task.flow_parameters()]:
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    traj = sample_keyed(task, seed=seed, iteration=1, global_batch=5)
    rows = torch.tensor([0, 0, 1, 1, 2, 3, 4, 4, 2])
    steps = torch.tensor([0, 7, 3, 7, 5, 1, 6, 2, 7])  # terminal transitions mixed in
    return cfg, task, traj, rows, steps


def _loss_and_grads(task, traj, rows, steps, opts):
    batch = select_transitions(traj, rows, steps)
    if opts.fl_noise_var > 0:
        for name, s in (("fl_noise_t", batch.step), ("fl_noise_next", batch.step + 1)):
            batch.extras[name] = fl_noise(0, 1, batch.traj_index, s, opts.fl_num_noise, (2,))
    for p in task.parameters():
        p.grad = None
    per_sample, info = nabla_gfn_loss(task, batch, opts)
    upstream = torch.linspace(0.5, 1.5, per_sample.numel())  # a non-uniform upstream gradient
    (per_sample * upstream).sum().backward()
    params = [*task.policy_parameters(), *task.flow_parameters()]
    return per_sample.detach(), {k: v.detach() for k, (v, _) in info.items()}, [p.grad.clone() for p in params]


@pytest.mark.parametrize("changes", CASES)
def test_folded_equals_unfolded(changes):
    cfg, task, traj, rows, steps = _task_and_batch()
    opts = dataclasses.replace(cfg.method, **changes)
    folded = _loss_and_grads(task, traj, rows, steps, dataclasses.replace(opts, fold_fl_vjp=True))
    plain = _loss_and_grads(task, traj, rows, steps, dataclasses.replace(opts, fold_fl_vjp=False))
    # fp32 sums in another order: errors relative to each tensor's scale (the paper weighting spans 1e1..1e10)
    assert_close_rel(folded[0], plain[0], 1e-5, "per-transition loss")
    for k in plain[1]:
        assert_close_rel(folded[1][k], plain[1][k], 1e-5, k)
    assert float(plain[1]["loss_reverse"].abs().max()) > 0  # the reverse term is present
    for i, (a, b) in enumerate(zip(folded[2], plain[2], strict=True)):
        assert_close_rel(a, b, 1e-5, f"grad {i}")
