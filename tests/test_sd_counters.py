"""Pass counters on toy networks with known counts, and on the SD task."""

from __future__ import annotations

import torch
from test_sd_common import build_tiny_task
from torch import nn

from fastnabla.tasks.sd.counters import PassCounter, count_task_passes


def test_forward_and_backward_counts_on_a_linear_layer():
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    with PassCounter() as counter:
        counter.watch_module("net", net)
        with torch.no_grad():
            net(x)  # forward 1: no graph, never a backward
        net(x).sum().backward()  # forward 2, backward 1 (into the parameters)
        xi = x.clone().requires_grad_(True)
        y = net(xi)  # forward 3
        torch.autograd.grad(y, xi, torch.ones_like(y), retain_graph=True)  # backward 2: a VJP w.r.t. the input
        torch.autograd.grad(y, xi, torch.ones_like(y))  # backward 3: the same graph again
        net(x)  # forward 4: graph built but never differentiated
        total = net(x).sum() + net(x[:2]).sum()  # forwards 5 and 6 (4 + 2 samples)
        total.backward()  # backwards 4 and 5: one backward call through two network calls
    count = counter.counts["net"]
    assert (count.forward, count.backward) == (6, 5)
    assert count.forward_samples == 4 * 5 + 2 and count.backward_samples == 4 * 4 + 2
    net(x).sum().backward()  # after close: not counted
    assert counter.counts["net"].forward == 6


def test_frozen_network_counts_input_vjps_only():
    frozen = nn.Sequential(nn.Linear(3, 3), nn.Tanh()).requires_grad_(False)
    with PassCounter() as counter:
        counter.watch_module("frozen", frozen)
        frozen(torch.randn(2, 3)).sum()  # nothing requires grad: the output has no graph
        xi = torch.randn(2, 3, requires_grad=True)
        torch.autograd.grad(frozen(xi).sum(), xi)
    assert counter.as_dict()["frozen"] == {"forward": 2, "backward": 1, "forward_samples": 4, "backward_samples": 2}


def test_watch_method_and_per_unit():
    class Scorer:
        def score(self, images):
            return images.mean(dim=1)

    scorer = Scorer()
    with PassCounter() as counter:
        counter.watch_method("reward", scorer, "score")
        img = torch.rand(5, 3, requires_grad=True)
        torch.autograd.grad(scorer.score(img).sum(), img)
        scorer.score(img.detach())
    assert "score" not in vars(scorer)  # the wrapper is gone after close
    assert counter.counts["reward"].forward == 2 and counter.counts["reward"].backward == 1
    assert counter.per(2)["reward"]["forward"] == 1.0 and counter.per(2)["reward"]["backward_samples"] == 2.5
    counter.reset()
    assert counter.counts["reward"].forward == 0


def test_counts_on_the_sd_task():
    task = build_tiny_task()
    cond = task.conditions_for(["cat", "dog"])
    x = torch.randn(2, 4, 8, 8)
    step, state = torch.tensor([0, 4]), torch.tensor([1, 6])
    with count_task_passes(task) as counter:
        xi = x.clone().requires_grad_(True)
        eps = task.policy_eps(xi, step, cond)  # one UNet call on the CFG pair (2B = 4 samples)
        torch.autograd.grad(eps, xi, torch.randn_like(eps))  # its VJP w.r.t. x
        with torch.no_grad():
            task.pretrained_eps(x, step, cond)  # a sampling-style call: no backward possible
        flow = task.flow(x, state, cond)
        flow.square().mean().backward()
        xi = x.clone().requires_grad_(True)
        log_r = task.log_reward(task.decode(xi), cond)  # decode + reward, then their VJP
        torch.autograd.grad(log_r.sum(), xi)
    counts = counter.as_dict()
    assert counts["unet"] == {"forward": 2, "backward": 1, "forward_samples": 8, "backward_samples": 4}
    assert counts["flow"] == {"forward": 1, "backward": 1, "forward_samples": 2, "backward_samples": 2}
    assert counts["vae_decoder"] == {"forward": 1, "backward": 1, "forward_samples": 2, "backward_samples": 2}
    assert counts["reward"] == {"forward": 1, "backward": 1, "forward_samples": 2, "backward_samples": 2}
