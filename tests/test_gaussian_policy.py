"""Scores of the Gaussian denoising policy against brute-force autograd of its log-density."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close_rel
from torch import nn

from fastnabla.mdp import (
    SD15_SCHEDULER_CONFIG,
    build_mdp,
    cfg_combine,
    denoise_step,
    forward_score,
    residual_forward_score,
    residual_reverse_score,
    reverse_score,
    step_mean,
    transition_log_prob,
    tweedie_x0,
)

F64 = torch.float64
SHAPE = (5, 4, 5, 7)
STEPS = torch.tensor([0, 17, 49, 33, 5], dtype=torch.int64)  # mixed steps, one per sample


class TinyEps(nn.Module):
    """A small nonlinear conv "eps-network" (random weights, float64)."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.c1 = nn.Conv2d(4, 6, 3, padding=1).double()
        self.c2 = nn.Conv2d(6, 4, 3, padding=1).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.4 * torch.randn(p.shape, generator=g, dtype=F64))

    def forward(self, x):
        return self.c2(torch.tanh(self.c1(x))) + 0.3 * torch.sin(x)


@pytest.fixture
def setup():
    mdp = build_mdp(SD15_SCHEDULER_CONFIG, 50, "ddim", 1.0)
    c = mdp.gather(STEPS, 4, F64)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(SHAPE, generator=g, dtype=F64)
    x_next = c["a"] * x + torch.randn(SHAPE, generator=g, dtype=F64)
    return mdp, c, x, x_next, TinyEps(11), TinyEps(12)


def _log_p(net, x, x_next, c):
    return transition_log_prob(x_next, c["a"] * x + c["b"] * net(x), c["sigma"])


def test_transition_log_prob_matches_normal(setup):
    _, c, x, x_next, net, _ = setup
    mean = c["a"] * x + c["b"] * net(x)
    ours = transition_log_prob(x_next, mean, c["sigma"])
    ref = torch.distributions.Normal(mean, c["sigma"].expand_as(mean)).log_prob(x_next).sum((1, 2, 3))
    assert ours.shape == (SHAPE[0],)
    assert_close_rel(ours, ref, 1e-13)


def test_forward_score_is_grad_wrt_x_next(setup):
    _, c, x, x_next, net, _ = setup
    mean = (c["a"] * x + c["b"] * net(x)).detach()
    xn = x_next.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(transition_log_prob(xn, mean, c["sigma"]).sum(), xn)
    assert_close_rel(forward_score(x_next, mean, c["sigma"]), ref, 1e-13)


def test_reverse_score_is_grad_wrt_x_t(setup):
    _, c, x, x_next, net, _ = setup
    xi = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(_log_p(net, xi, x_next, c).sum(), xi)
    score, eps = reverse_score(net, x, x_next, c["a"], c["b"], c["sigma"])
    assert not score.requires_grad and not eps.requires_grad
    assert_close_rel(eps, net(x), 1e-15)
    assert_close_rel(score, ref, 1e-12)


@pytest.mark.parametrize("prior_strength", [0.5, 1.0], ids=["eta_p0.5", "eta_p1"])
def test_residual_scores(setup, prior_strength):
    _, c, x, x_next, net, ref_net = setup
    xi = x.clone().requires_grad_(True)
    xn = x_next.clone().requires_grad_(True)
    objective = (_log_p(net, xi, xn, c) - prior_strength * _log_p(ref_net, xi, xn, c)).sum()
    ref_rev, ref_fwd = torch.autograd.grad(objective, (xi, xn))

    mean, mean_pretrained = step_mean(x, net(x), c["a"], c["b"]), step_mean(x, ref_net(x), c["a"], c["b"])
    fwd = residual_forward_score(x_next, mean.detach(), mean_pretrained.detach(), c["sigma"], prior_strength)
    assert_close_rel(fwd, ref_fwd, 1e-12, "forward")

    s_theta, _ = reverse_score(net, x, x_next, c["a"], c["b"], c["sigma"])
    s_ref, _ = reverse_score(ref_net, x, x_next, c["a"], c["b"], c["sigma"])
    assert_close_rel(residual_reverse_score(s_theta, s_ref, prior_strength), ref_rev, 1e-12, "reverse")
    if prior_strength == 1.0:  # documented identity: (mu - mu#) / sigma^2, independent of x_{t+1}
        assert_close_rel(fwd, c["b"] * (net(x) - ref_net(x)).detach() / c["sigma"] ** 2, 1e-12)


def test_reverse_score_create_graph_matches_double_backward(setup):
    _, c, x, x_next, net, _ = setup
    params = list(net.parameters())
    weights = torch.randn(SHAPE, dtype=F64)  # random upstream gradient on the score

    xi = x.clone().requires_grad_(True)
    (s_ref,) = torch.autograd.grad(_log_p(net, xi, x_next, c).sum(), xi, create_graph=True)
    ref = torch.autograd.grad((weights * s_ref).sum(), params)

    score, eps = reverse_score(net, x, x_next, c["a"], c["b"], c["sigma"], create_graph=True)
    assert score.requires_grad and eps.requires_grad
    assert_close_rel(score, s_ref.detach(), 1e-12)
    ours = torch.autograd.grad((weights * score).sum(), params)
    for p, o, r in zip(params, ours, ref, strict=True):
        assert o is not None and o.shape == p.shape
        assert_close_rel(o, r, 1e-11)


def test_tweedie_inverts_noising(setup):
    _, c, x0, eps, _, _ = setup
    ab = c["alpha_bar"]
    x = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    assert_close_rel(tweedie_x0(x, eps, ab), x0, 1e-11)


@pytest.mark.parametrize("w", [0.0, 1.0, 5.0, 7.5], ids=["w0", "w1", "w5", "w7.5"])
def test_cfg_combine(w):
    g = torch.Generator().manual_seed(5)
    u, cnd = torch.randn(3, 4, 5, 7, generator=g, dtype=F64), torch.randn(3, 4, 5, 7, generator=g, dtype=F64)
    out = cfg_combine(u, cnd, w)
    assert_close_rel(out, (1 - w) * u + w * cnd, 1e-14)
    if w == 1.0:  # "w = 1 returns eps_c" (up to rounding of u + (c - u))
        assert_close_rel(out, cnd, 1e-15)
    if w == 0.0:
        assert torch.equal(out, u)


def test_denoise_step_is_mean_plus_noise(setup):
    _, c, x, z, net, _ = setup
    eps = net(x)
    out = denoise_step(x, eps, c["a"], c["b"], c["sigma"], z)
    # the transition density's mean is the step without noise: its log-prob is maximal at z = 0
    lp_noisy = transition_log_prob(out, step_mean(x, eps, c["a"], c["b"]), c["sigma"])
    d = x[0].numel()
    expected = -0.5 * (z**2).sum((1, 2, 3)) - d * c["sigma"].reshape(-1).log() - 0.5 * d * math.log(2 * math.pi)
    assert_close_rel(lp_noisy, expected, 1e-12)


def test_zero_sigma_raises(setup):
    _, c, x, x_next, net, _ = setup
    sigma = c["sigma"].clone()
    sigma[2] = 0.0
    mean = c["a"] * x
    with pytest.raises(ValueError, match="sigma"):
        transition_log_prob(x_next, mean, sigma)
    with pytest.raises(ValueError, match="sigma"):
        forward_score(x_next, mean, sigma)
    with pytest.raises(ValueError, match="sigma"):
        reverse_score(net, x, x_next, c["a"], c["b"], sigma)
    eta0 = build_mdp(SD15_SCHEDULER_CONFIG, 50, "ddim", 0.0).gather(STEPS, 4, F64)
    with pytest.raises(ValueError, match="sigma"):
        forward_score(x_next, mean, eta0["sigma"])
