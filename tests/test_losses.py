"""Residual nabla-DB loss, forward-looking gradient and loss weights against independent computations."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_rel

from fastnabla.methods.nabla_gfn.weights import loss_weight
from fastnabla.ops.forward_looking import forward_looking_gradient, gamma_schedule
from fastnabla.ops.nabla_db_loss import residual_nabla_db_loss

F64 = torch.float64
B, SHAPE = 7, (7, 3, 5, 3)
TERMINAL = [False, True, False, False, True, False, False]
LEAVES = ("eps_theta", "vjp_theta", "flow_t", "flow_next")


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return scale * torch.randn(shape, generator=g, dtype=F64)

    inp = {k: rnd(*SHAPE) for k in ("x_t", "x_next", "eps_theta", "eps_pretrained", "vjp_theta", "vjp_pretrained",
                                    "fl_t", "fl_next", "flow_t", "flow_next", "eps_old")}
    inp["a"] = 1 + 0.1 * torch.rand((B, 1, 1, 1), generator=g, dtype=F64)
    inp["b"] = -0.5 * torch.rand((B, 1, 1, 1), generator=g, dtype=F64) - 0.05
    inp["sigma"] = 0.2 + torch.rand((B, 1, 1, 1), generator=g, dtype=F64)
    inp["terminal"] = torch.tensor(TERMINAL)
    return inp


def _hand_loss(inp, w_f, w_b, lam, eta_p, detach_reverse=True, forward_trains_flow=True, target=None):
    """Per-sample terms written from docs/maths.md / eqs. 16-19, one sample at a time."""
    out = {k: [] for k in ("forward", "reverse", "terminal", "output_reg", "total")}
    for i in range(B):
        a, b, s2 = inp["a"][i], inp["b"][i], inp["sigma"][i] ** 2
        x, xn, e, e_ref = inp["x_t"][i], inp["x_next"][i], inp["eps_theta"][i], inp["eps_pretrained"][i]
        # s~-> = grad_{x_{t+1}} [log N(x_{t+1}; mu, s2) - eta_p log N(x_{t+1}; mu#, s2)]
        r, r_pretrained = xn - (a * x + b * e), xn - (a * x + b * e_ref)
        s_fwd = -r / s2 + eta_p * r_pretrained / s2
        g_next = inp["flow_next"][i] if forward_trains_flow else inp["flow_next"][i].detach()
        bracket_fwd = inp["fl_next"][i] + (0.0 if TERMINAL[i] else g_next)
        l_fwd = ((s_fwd - bracket_fwd) ** 2).mean()
        # s~<- = (a r + b J^T r)/s2 - eta_p (a r# + b J#^T r#)/s2 (a constant unless detach_reverse=False)
        vjp = inp["vjp_theta"][i]
        if target is not None:
            s_rev = -target[i]
        else:
            s_rev = (a * r + b * vjp) / s2 - eta_p * (a * r_pretrained + b * inp["vjp_pretrained"][i]) / s2
            if detach_reverse:
                s_rev = s_rev.detach()
        l_rev = ((s_rev + inp["fl_t"][i] + inp["flow_t"][i]) ** 2).mean()
        l_term = (inp["flow_next"][i] ** 2).mean() if TERMINAL[i] else torch.zeros((), dtype=F64)
        l_reg = ((e - inp["eps_old"][i]) ** 2).mean()
        wf = w_f[i] if torch.is_tensor(w_f) else w_f
        wb = w_b[i] if torch.is_tensor(w_b) else w_b
        for k, v in zip(out, (l_fwd, l_rev, l_term, l_reg, wf * l_fwd + wb * l_rev + l_term + lam * l_reg),
                        strict=True):
            out[k].append(v)
    return {k: torch.stack(v) for k, v in out.items()}


def _lib_loss(inp, w_f, w_b, lam, eta_p, **opts):
    return residual_nabla_db_loss(**inp, w_forward=w_f, w_reverse=w_b, output_reg=lam, prior_strength=eta_p, **opts)


WEIGHT_CASES = [
    (1.0, 1.0, 0.0, 1.0),
    (torch.linspace(0.3, 2.0, B, dtype=F64), torch.linspace(1.5, 0.1, B, dtype=F64), 0.7, 0.6),
    (0.25, torch.rand(B, dtype=F64, generator=torch.Generator().manual_seed(9)) + 0.1, 3.0, 1.0),
]
WEIGHT_IDS = ["paper-defaults", "per-sample-weights-eta0.6", "mixed-weights-reg3"]


@pytest.mark.parametrize(("w_f", "w_b", "lam", "eta_p"), WEIGHT_CASES, ids=WEIGHT_IDS)
def test_terms_match_hand_computation(w_f, w_b, lam, eta_p):
    inp = _inputs()
    ours = _lib_loss(inp, w_f, w_b, lam, eta_p)
    ref = _hand_loss(inp, w_f, w_b, lam, eta_p)
    for k in ("forward", "reverse", "terminal", "output_reg", "total"):
        assert getattr(ours, k).shape == (B,), k
        if k == "output_reg" and lam == 0.0:  # disabled regulariser reports zeros
            assert torch.equal(ours.output_reg, torch.zeros(B, dtype=F64))
            continue
        assert_close_rel(getattr(ours, k), ref[k], 1e-13, k)
    assert torch.equal(ours.terminal == 0, ~torch.tensor(TERMINAL))


ROUTING = [
    ({}, {}),
    ({"forward_trains_flow": False}, {"forward_trains_flow": False}),
    ({"detach_reverse": False}, {"detach_reverse": False}),
    ({"detach_reverse": False, "forward_trains_flow": False}, {"detach_reverse": False, "forward_trains_flow": False}),
    ({"reverse_target": "G"}, {"target": "G"}),
]
ROUTING_IDS = ["defaults", "no-forward-flow", "second-order", "second-order-no-forward-flow", "reverse-target"]


@pytest.mark.parametrize(("opts", "hand_opts"), ROUTING, ids=ROUTING_IDS)
@pytest.mark.parametrize("term", ["forward", "reverse", "terminal", "output_reg", "total"])
def test_gradient_routing(opts, hand_opts, term):
    w_f, w_b, lam, eta_p = WEIGHT_CASES[1]
    upstream = torch.randn(B, dtype=F64, generator=torch.Generator().manual_seed(4))
    G = torch.randn(SHAPE, dtype=F64, generator=torch.Generator().manual_seed(5))
    opts = {k: (G if v == "G" else v) for k, v in opts.items()}
    hand_opts = {k: (G if v == "G" else v) for k, v in hand_opts.items()}
    grads = []
    for fn, o in ((_lib_loss, opts), (_hand_loss, hand_opts)):
        inp = _inputs()
        for k in LEAVES:
            inp[k].requires_grad_(True)
        out = fn(inp, w_f, w_b, lam, eta_p, **o)
        val = getattr(out, term) if fn is _lib_loss else out[term]
        if not val.requires_grad:
            grads.append({k: None for k in LEAVES})
            continue
        gs = torch.autograd.grad((upstream * val).sum(), [inp[k] for k in LEAVES], allow_unused=True)
        grads.append(dict(zip(LEAVES, gs, strict=True)))
    ours, ref = grads
    for k in LEAVES:
        if ref[k] is None or not bool(ref[k].any()):
            assert ours[k] is None or not bool(ours[k].any()), f"{term}: unexpected gradient into {k}"
        else:
            assert ours[k] is not None, f"{term}: no gradient into {k}"
            assert_close_rel(ours[k], ref[k], 1e-12, f"{term} d/d{k}")


def test_gradient_routing_facts():
    """The documented routing, stated directly (the parametrised test checks the values)."""
    def reached(term, **opts):
        inp = _inputs()
        for k in LEAVES:
            inp[k].requires_grad_(True)
        val = getattr(_lib_loss(inp, 1.0, 1.0, 0.5, 1.0, **opts), term).sum()
        gs = torch.autograd.grad(val, [inp[k] for k in LEAVES], allow_unused=True) if val.requires_grad else []
        return {k for k, gr in zip(LEAVES, gs, strict=False) if gr is not None and bool(gr.any())}

    assert reached("forward") == {"eps_theta", "flow_next"}
    assert reached("reverse") == {"flow_t"}
    assert reached("terminal") == {"flow_next"}
    assert reached("output_reg") == {"eps_theta"}
    assert reached("forward", forward_trains_flow=False) == {"eps_theta"}
    assert reached("terminal", forward_trains_flow=False) == {"flow_next"}
    assert reached("reverse", detach_reverse=False) == {"eps_theta", "vjp_theta", "flow_t"}
    assert reached("reverse", reverse_target=torch.zeros(SHAPE, dtype=F64)) == {"flow_t"}


def test_reverse_score_is_constant_wrt_all_inputs():
    inp = _inputs()
    names = ("x_t", "x_next", "eps_pretrained", "vjp_pretrained", "eps_theta", "vjp_theta")
    for k in names:
        inp[k].requires_grad_(True)
    rev = _lib_loss(inp, 1.0, 1.0, 0.0, 1.0).reverse.sum()
    if not rev.requires_grad:  # nothing upstream of the reverse term is differentiable: fully constant
        return
    gs = torch.autograd.grad(rev, [inp[k] for k in names], allow_unused=True)
    leaked = [k for k, gr in zip(names, gs, strict=True) if gr is not None and bool(gr.any())]
    assert leaked == []


@pytest.mark.parametrize("detach_reverse", [True, False], ids=["defaults", "second-order"])
def test_gradcheck(detach_reverse):
    """Finite differences see the value of the detached s~<- move with eps_theta, so with the defaults the
    reverse term is checked w.r.t. the flow only; with ``detach_reverse=False`` the total is exact."""
    # a smaller copy of the inputs: [B, 2, 3, 2] (coefficients stay [B, 1, 1, 1])
    inp = {k: (v[:, :2, :3, :2].contiguous() if v.ndim == 4 and v.shape[1] > 1 else v) for k, v in _inputs().items()}
    w_f, w_b, lam, eta_p = WEIGHT_CASES[1]
    names = ("eps_theta", "flow_t", "flow_next") + (() if detach_reverse else ("vjp_theta",))

    def fn(*args):
        out = _lib_loss({**inp, **dict(zip(names, args, strict=True))}, w_f, w_b, lam, eta_p,
                        detach_reverse=detach_reverse)
        return (out.forward, out.terminal, out.output_reg) if detach_reverse else out.total

    def rev(flow_t):
        return _lib_loss({**inp, "flow_t": flow_t}, w_f, w_b, lam, eta_p).reverse

    args = tuple(inp[k].clone().requires_grad_(True) for k in names)
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-6)
    assert torch.autograd.gradcheck(rev, (inp["flow_t"].clone().requires_grad_(True),), eps=1e-6, atol=1e-7)


def test_bad_terminal_raises():
    inp = _inputs()
    with pytest.raises(ValueError, match="terminal"):
        residual_nabla_db_loss(**{**inp, "terminal": inp["terminal"].long()})
    with pytest.raises(ValueError, match="terminal"):
        residual_nabla_db_loss(**{**inp, "terminal": inp["terminal"][:3]})


# --- loss weights ---------------------------------------------------------------------------------------


def test_loss_weight_closed_forms():
    g = torch.Generator().manual_seed(2)
    b = -torch.rand((5, 1, 1, 1), generator=g, dtype=F64) - 0.1
    sigma = torch.rand((5, 1, 1, 1), generator=g, dtype=F64) + 0.05
    one, eps, sig2 = (loss_weight(k, b, sigma) for k in ("one", "eps", "sigma2"))
    for w in (one, eps, sig2):
        assert w.shape == (5,) and w.dtype == F64
    assert torch.equal(one, torch.ones(5, dtype=F64))
    bb, ss = b.reshape(-1).tolist(), sigma.reshape(-1).tolist()
    assert_close_rel(eps, torch.tensor([s**4 / bi**2 for bi, s in zip(bb, ss, strict=True)], dtype=F64), 1e-14)
    assert_close_rel(sig2, torch.tensor([s * s for s in ss], dtype=F64), 1e-15)
    # "eps" makes an eps-residual e cost e^2 at every step: w * (|b| e / sigma^2)^2 == e^2
    e = 0.37
    eps_cost = eps * (b.reshape(-1).abs() * e / sigma.reshape(-1) ** 2) ** 2
    assert_close_rel(eps_cost, torch.full((5,), e * e, dtype=F64), 1e-14)
    with pytest.raises(ValueError, match="schedule"):
        loss_weight("snr", b, sigma)


# --- forward-looking reward gradient ---------------------------------------------------------------------

FL_SHAPE = (6, 3, 5)
FL_TERMINAL = torch.tensor([False, True, False, False, False, True])
BETA = 2.5


def _fl_setup():
    g = torch.Generator().manual_seed(21)
    x = torch.randn(FL_SHAPE, generator=g, dtype=F64)
    ab = 0.05 + 0.9 * torch.rand((FL_SHAPE[0], 1, 1), generator=g, dtype=F64)
    w1, w2 = 0.3 * torch.randn(15, 9, generator=g, dtype=F64), 0.3 * torch.randn(9, 15, generator=g, dtype=F64)
    center = torch.randn(FL_SHAPE[1:], generator=g, dtype=F64)

    def eps_net(y):  # per-row nonlinear "network" in float64
        h = torch.tanh(y.double().flatten(1) @ w1) @ w2
        return (h.reshape(y.shape) + 0.5 * torch.sin(y.double())).to(y.dtype)

    rewards = {
        "quadratic": lambda y: -0.5 * ((y - center.to(y)) ** 2).flatten(1).sum(1),
        "sines": lambda y: torch.sin(1.3 * y + center.to(y)).flatten(1).sum(1),
    }
    return x, ab, eps_net, rewards


GAMMA = {"alpha_bar": lambda ab: ab, "sqrt_alpha_bar": lambda ab: ab**0.5, "one": lambda ab: 1.0}
DECODERS = {None: lambda y: y, "nonlinear": lambda y: y + 0.2 * y**2}


def _fl_brute(x, ab, eps_net, log_r, jacobian, gamma, decode=None, noise=None):
    """Row by row, float64: beta gamma_t E_k grad_x log R(decode(x_hat(x) + e_k))."""
    dec = DECODERS[decode]
    noise = torch.zeros((1,) + x.shape, dtype=F64) if noise is None else noise
    rows = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1].clone().requires_grad_(True)
        a = ab[i : i + 1]
        if bool(FL_TERMINAL[i]):
            xhat, leaf, factor, scale = xi, xi, 1.0, BETA
        elif jacobian == "full":
            xhat = (xi - (1 - a).sqrt() * eps_net(xi)) / a.sqrt()
            leaf, factor, scale = xi, 1.0, BETA * GAMMA[gamma](a)
        else:
            leaf = ((x[i : i + 1] - (1 - a).sqrt() * eps_net(x[i : i + 1])) / a.sqrt()).requires_grad_(True)
            xhat, factor = leaf, (1 / a.sqrt() if jacobian == "tweedie" else 1.0)
            scale = BETA * GAMMA[gamma](a)
        grads = [torch.autograd.grad(log_r(dec(xhat + nk[i : i + 1])).sum(), leaf, retain_graph=True)[0]
                 for nk in noise]
        rows.append(scale * factor * torch.stack(grads).mean(0))
    return torch.cat(rows)


@pytest.mark.parametrize("reward", ["quadratic", "sines"])
@pytest.mark.parametrize("gamma", ["alpha_bar", "sqrt_alpha_bar", "one"])
@pytest.mark.parametrize("jacobian", ["full", "tweedie", "identity"])
def test_forward_looking_matches_brute_force(jacobian, gamma, reward):
    x, ab, eps_net, rewards = _fl_setup()
    ours = forward_looking_gradient(x, ab, FL_TERMINAL, eps_net, rewards[reward], BETA, gamma, jacobian)
    assert ours.dtype == F64 and ours.shape == FL_SHAPE and not ours.requires_grad
    ref = _fl_brute(x, ab, eps_net, rewards[reward], jacobian, gamma)
    assert_close_rel(ours, ref, 2e-5)  # the function evaluates in float32


@pytest.mark.parametrize(
    ("jacobian", "num_noise", "decode"),
    [("full", 1, None), ("full", 3, "nonlinear"), ("tweedie", 4, None), ("identity", 3, "nonlinear"),
     ("full", 2, None)],
    ids=["full-K1", "full-K3-decode", "tweedie-K4", "identity-K3-decode", "full-K2"],
)
def test_forward_looking_smoothing_matches_average(jacobian, num_noise, decode):
    x, ab, eps_net, rewards = _fl_setup()
    c = 0.05
    ours = forward_looking_gradient(
        x, ab, FL_TERMINAL, eps_net, rewards["sines"], BETA, "alpha_bar", jacobian, decode=DECODERS[decode],
        noise_var=c, num_noise=num_noise, generator=torch.Generator().manual_seed(77))
    draws = torch.randn((num_noise,) + FL_SHAPE, generator=torch.Generator().manual_seed(77), dtype=torch.float32)
    ref = _fl_brute(x, ab, eps_net, rewards["sines"], jacobian, "alpha_bar", decode, c**0.5 * draws.double())
    assert_close_rel(ours, ref, 2e-5)
    unsmoothed = _fl_brute(x, ab, eps_net, rewards["sines"], jacobian, "alpha_bar", decode)
    assert float((ours - unsmoothed).abs().max()) > 1e-3  # the noise is really used


def test_forward_looking_all_terminal_needs_no_network():
    x, ab, _, rewards = _fl_setup()

    def no_net(y):
        raise AssertionError("eps_fn must not be called for terminal states")

    ours = forward_looking_gradient(x, ab, torch.ones(FL_SHAPE[0], dtype=torch.bool), no_net, rewards["quadratic"],
                                    BETA, "alpha_bar", "full")
    xi = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(rewards["quadratic"](xi).sum(), xi)
    assert_close_rel(ours, BETA * ref, 1e-6)


def test_forward_looking_errors():
    x, ab, eps_net, rewards = _fl_setup()
    args = (x, ab, FL_TERMINAL, eps_net, rewards["sines"], BETA)
    with pytest.raises(ValueError, match="jacobian"):
        forward_looking_gradient(*args, jacobian="exact")
    with pytest.raises(ValueError, match="gamma"):
        forward_looking_gradient(*args, gamma="snr")
    with pytest.raises(ValueError, match="num_noise"):
        forward_looking_gradient(*args, noise_var=0.1, num_noise=0)
    with pytest.raises(ValueError, match="alpha_bar"):
        forward_looking_gradient(x, ab.reshape(-1), FL_TERMINAL, eps_net, rewards["sines"], BETA)
    with pytest.raises(ValueError, match="terminal"):
        forward_looking_gradient(x, ab, FL_TERMINAL[:3], eps_net, rewards["sines"], BETA)


def test_gamma_schedule_closed_forms():
    ab = torch.tensor([0.01, 0.25, 0.64, 1.0], dtype=F64)
    assert torch.equal(gamma_schedule(ab, "alpha_bar"), ab)
    assert_close_rel(gamma_schedule(ab, "sqrt_alpha_bar"), torch.tensor([0.1, 0.5, 0.8, 1.0], dtype=F64), 1e-15)
    assert torch.equal(gamma_schedule(ab, "one"), torch.ones(4, dtype=F64))
    with pytest.raises(ValueError, match="gamma"):
        gamma_schedule(ab, "linear")
