"""Fused transition scores (``fastnabla.ops.transition_scores``): the decomposition of the reverse score
into ``rev_local`` + two VJPs against brute-force autograd of the transition log-density with real (tiny)
networks, Triton (interpreter) vs the reference for every output and gradient, registration, compile,
dispatch and input checks.

Triton runs here through its CPU interpreter, switched on per test by the ``interpret`` fixture (see
``tests/test_op_denoise_step.py`` for why a fixture and not a subprocess or conftest).
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_rel, mutated
from torch import nn

from fastnabla.mdp import gaussian_policy as gp
from fastnabla.mdp.schedule import SD15_SCHEDULER_CONFIG, build_mdp
from fastnabla.ops import dispatch
from fastnabla.ops.transition_scores import (
    OUTPUTS,
    transition_scores_fused,
    transition_scores_reference,
)

HAS_TRITON = dispatch.triton_available()
MDP = build_mdp(SD15_SCHEDULER_CONFIG, 50, "ddim", 1.0)
F64 = torch.float64
INPUTS = ("x_t", "x_next", "eps_theta", "eps_pretrained", "fl_cot")
STEP_CYCLE = (49, 0, 17, 33, 5, 41, 24)  # one batch mixes early, middle and late steps
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
]
SHAPES = [
    pytest.param((3, 4, 17, 9), id="odd3x4x17x9"),
    pytest.param((7, 4, 8, 8), id="latent7x4x8x8"),
    pytest.param((5, 3), id="flat5x3"),
]
FL = [pytest.param(None, id="no-fl"), pytest.param("theta", id="fl-theta"), pytest.param("pretrained",
                                                                                         id="fl-pretrained")]


pytestmark = pytest.mark.usefixtures("clean_backend_env")


def steps_for(batch: int) -> torch.Tensor:
    return torch.tensor([STEP_CYCLE[i % len(STEP_CYCLE)] for i in range(batch)], dtype=torch.long)


def make_case(shape, dtype=torch.float32, fl_into=None, prior_strength=0.8, seed=0, grad=True) -> dict:
    """Real SD1.5 DDIM coefficients (mixed steps); ``x_{t+1}`` drawn from the policy as in sampling."""
    gen = torch.Generator().manual_seed(seed)
    batch = shape[0]
    c = {k: getattr(MDP, k)[steps_for(batch)].float() for k in ("a", "b", "sigma", "alpha_bar")}
    bshape = (batch,) + (1,) * (len(shape) - 1)
    rnd = lambda scale=1.0: scale * torch.randn(shape, generator=gen)
    x_t, eps_theta = rnd(), rnd()
    case = {
        "x_t": x_t, "eps_theta": eps_theta, "eps_pretrained": eps_theta + rnd(0.1), "fl_cot": rnd(),
        "x_next": c["a"].view(bshape) * x_t + c["b"].view(bshape) * eps_theta + c["sigma"].view(bshape) * rnd(),
    }
    case = {k: v.to(dtype).requires_grad_(grad) for k, v in case.items()}
    if fl_into is None:
        case["fl_cot"] = None
    return {**case, **c, "prior_strength": prior_strength, "fl_into": fl_into or "theta"}


def run(fn, case: dict, upstream: list[torch.Tensor], outputs=OUTPUTS) -> dict:
    outs = [o for o in fn(**case, outputs=outputs) if o is not None]
    names = [k for k in INPUTS if case[k] is not None and case[k].requires_grad]
    pairs = [(o, u) for o, u in zip(outs, upstream, strict=False) if o.requires_grad]
    grads = torch.autograd.grad([p[0] for p in pairs], [case[k] for k in names], [p[1] for p in pairs],
                                allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(case[k]) for g, k in zip(grads, names, strict=True)]
    result = {name: o.detach() for name, o in zip(outputs, outs, strict=True)}
    result.update({f"grad_{k}": g for k, g in zip(names, grads, strict=True)})
    return result


def cast_case(case: dict, dtype: torch.dtype) -> dict:
    return {k: (v.detach().to(dtype).requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
            for k, v in case.items()}


def _in_dtype(kw: dict, dt: torch.dtype) -> list:
    nd = kw["x_t"].dim()
    a, b, s, ab = (kw[k].to(dt).reshape((-1,) + (1,) * (nd - 1)) for k in ("a", "b", "sigma", "alpha_bar"))
    eta, x, xn, fl = kw["prior_strength"], kw["x_t"], kw["x_next"], kw["fl_cot"]
    e, er = kw["eps_theta"], kw["eps_pretrained"]
    k = 1.0 / s**2
    r, rr = xn - gp.step_mean(x, e, a, b), xn - gp.step_mean(x, er, a, b)
    outs = {"score_fwd": (eta * rr - r) * k, "rev_local": a * (r - eta * rr) * k, "cot_theta": b * r * k,
            "cot_pretrained": eta * b * rr * k, "x_hat": gp.tweedie_x0(x, e, ab)}
    if fl is not None:
        key, sign = ("cot_theta", 1) if kw["fl_into"] == "theta" else ("cot_pretrained", -1)
        outs[key] = outs[key] + sign * fl
    return [outs[o] for o in kw["outputs"]]


def max_err(t: torch.Tensor, ref: torch.Tensor) -> float:
    return float((t.double() - ref.double()).abs().max()) if t.numel() else 0.0


def assert_matches(fused: dict, case: dict, upstream: list, dtype: torch.dtype, outputs=OUTPUTS) -> None:
    """Against the float64 reference: error <= 2x torch's own error in ``dtype`` + one ulp of the scale."""
    exact = run(transition_scores_reference, cast_case(case, F64), [u.double() for u in upstream], outputs)
    own = run(lambda **kw: _in_dtype(kw, dtype), case, upstream, outputs)
    assert fused.keys() == exact.keys()
    for name, got in fused.items():
        want = exact[name]
        assert got.dtype == dtype and got.shape == want.shape, name
        bound = 2 * max_err(own[name], want) + torch.finfo(dtype).eps * float(want.abs().max())
        assert max_err(got, want) <= bound, f"{name}: fused error {max_err(got, want):.3g} > {bound:.3g}"


def upstream_for(shape, dtype=torch.float32, seed=1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(dtype) for _ in OUTPUTS]


# ---------------------------------------------------------------- the maths: decomposition of s~<-


class TinyEps(nn.Module):
    """A small nonlinear conv eps-network (random weights, float64)."""

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


@pytest.mark.parametrize("fl_into", ["theta", "pretrained"])
def test_reverse_score_decomposition_with_real_networks(fl_into):
    """``rev_local + J_theta^T cot_theta - J_ref^T cot_pretrained`` is the residual reverse score: equal to
    ``gaussian_policy.residual_reverse_score`` and to brute-force autograd of ``log P_F - eta log P_F#``
    w.r.t. ``x_t``; ``score_fwd`` is the same brute force w.r.t. ``x_{t+1}``; a folded ``fl_cot = v`` adds
    exactly ``J_net^T v``; ``x_hat`` is Tweedie."""
    eta, shape = 0.7, (5, 4, 5, 7)
    steps = steps_for(5)
    c = MDP.gather(steps, 4, F64)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen, dtype=F64)
    x_next = c["a"] * x + torch.randn(shape, generator=gen, dtype=F64)
    v = torch.randn(shape, generator=gen, dtype=F64)
    net, ref_net = TinyEps(11), TinyEps(12)

    with torch.no_grad():
        eps, eps_pretrained = net(x), ref_net(x)
    coeffs = [c[k].reshape(-1) for k in ("a", "b", "sigma", "alpha_bar")]
    fwd, rev_local, cot, cot_pretrained, x_hat = transition_scores_reference(  # float64: the fused op's reference
        x, x_next, eps, eps_pretrained, *coeffs, eta, fl_cot=v, fl_into=fl_into
    )

    def vjp(network, cotangent):
        x_in = x.clone().requires_grad_(True)
        return torch.autograd.grad(network(x_in), x_in, cotangent)[0]

    folded = rev_local + vjp(net, cot) - vjp(ref_net, cot_pretrained)

    # brute force: autograd of the log-densities
    def log_ratio(x_t, x_n):
        mean, mean_pretrained = gp.step_mean(x_t, net(x_t), c["a"], c["b"]), gp.step_mean(x_t, ref_net(x_t), c["a"],
                                                                                          c["b"])
        return (gp.transition_log_prob(x_n, mean, c["sigma"])
                - eta * gp.transition_log_prob(x_n, mean_pretrained, c["sigma"])).sum()

    xa, xb = x.clone().requires_grad_(True), x_next.clone().requires_grad_(True)
    brute_rev, brute_fwd = torch.autograd.grad(log_ratio(xa, xb), [xa, xb])
    j_v = vjp(net if fl_into == "theta" else ref_net, v)
    assert_close_rel(folded, brute_rev + j_v, rel=1e-11, msg="s~<- + J^T v")
    assert_close_rel(fwd, brute_fwd, rel=1e-12, msg="s~->")

    # the same against the library's score functions
    s_theta, _ = gp.reverse_score(net, x, x_next, c["a"], c["b"], c["sigma"])
    s_ref, _ = gp.reverse_score(ref_net, x, x_next, c["a"], c["b"], c["sigma"])
    assert_close_rel(folded - j_v, gp.residual_reverse_score(s_theta, s_ref, eta), rel=1e-11, msg="residual_reverse")
    assert_close_rel(x_hat, gp.tweedie_x0(x, eps, c["alpha_bar"]), rel=1e-12, msg="x_hat")


def test_scores_feed_the_loss_as_reverse_target():
    """docs/ops.md: ``reverse_target = -(rev_local + J_theta^T cot_theta - J_ref^T cot_pretrained)`` gives the same
    loss terms as the reference's own ``vjp_theta = J^T r`` route (float64, real networks)."""
    from fastnabla.ops.nabla_db_loss import residual_nabla_db_loss

    eta, shape = 0.7, (4, 4, 5, 7)
    c = MDP.gather(steps_for(4), 4, F64)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=gen, dtype=F64)
    x_next = c["a"] * x + torch.randn(shape, generator=gen, dtype=F64)
    net, ref_net = TinyEps(21), TinyEps(22)

    def vjp(network, cotangent):
        x_in = x.clone().requires_grad_(True)
        return torch.autograd.grad(network(x_in), x_in, cotangent)[0]

    with torch.no_grad():
        eps, eps_pretrained = net(x), ref_net(x)
    coeffs = [c[k].reshape(-1) for k in ("a", "b", "sigma", "alpha_bar")]
    _, rev_local, cot, cot_pretrained, _ = transition_scores_reference(x, x_next, eps, eps_pretrained, *coeffs, eta)
    s_rev = rev_local + vjp(net, cot) - vjp(ref_net, cot_pretrained)
    common = {k: torch.randn(shape, generator=gen, dtype=F64) for k in ("fl_t", "fl_next", "flow_t", "flow_next")}
    common.update(x_t=x, x_next=x_next, eps_theta=eps, eps_pretrained=eps_pretrained, a=c["a"], b=c["b"],
                  sigma=c["sigma"],
                  terminal=torch.tensor([False, True, False, False]), prior_strength=eta)
    r, r_pretrained = x_next - gp.step_mean(x, eps, c["a"], c["b"]), x_next - gp.step_mean(x, eps_pretrained, c["a"],
                                                                                           c["b"])
    via_vjp = residual_nabla_db_loss(**common, vjp_theta=vjp(net, r), vjp_pretrained=vjp(ref_net, r_pretrained))
    via_target = residual_nabla_db_loss(**common, vjp_theta=None, vjp_pretrained=None, reverse_target=-s_rev)
    assert_close_rel(via_target.reverse, via_vjp.reverse, rel=1e-11, msg="reverse term")
    assert_close_rel(via_target.total, via_vjp.total, rel=1e-11, msg="total")


# ---------------------------------------------------------------- Triton (interpreter) vs reference


@pytest.mark.parametrize("fl_into", FL)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_matches_reference(interpret, dtype, shape, fl_into):
    case = make_case(shape, dtype, fl_into)
    upstream = upstream_for(shape, dtype)
    fused = run(transition_scores_fused, case, upstream)
    assert transition_scores_fused(**case).score_fwd.grad_fn.name() == "TransitionScoresFunctionBackward"
    assert_matches(fused, case, upstream, dtype)


@pytest.mark.parametrize(
    "outputs, grad_of",
    [
        pytest.param(("x_hat",), ("x_t",), id="x_hat-only"),
        pytest.param(("cot_theta", "cot_pretrained"), ("eps_pretrained", "fl_cot"), id="cotangents"),
        pytest.param(("score_fwd", "rev_local", "x_hat"), ("x_next", "eps_theta"), id="scores+x_hat"),
    ],
)
def test_triton_selected_outputs_and_grads(interpret, outputs, grad_of):
    """Only the requested outputs are written (the rest come back None) and only wanted gradients computed."""
    case = make_case((3, 2, 5, 7), fl_into="pretrained", grad=False)
    for k in grad_of:
        case[k].requires_grad_(True)
    result = transition_scores_fused(**case, outputs=outputs)
    assert [o is not None for o in result] == [name in outputs for name in OUTPUTS]
    upstream = upstream_for((3, 2, 5, 7))
    fused = run(transition_scores_fused, case, upstream, outputs)
    assert sorted(k for k in fused if k.startswith("grad_")) == sorted(f"grad_{k}" for k in grad_of)
    assert_matches(fused, case, upstream, torch.float32, outputs)


def test_triton_unused_output_gradients(interpret):
    """Outputs that get no upstream gradient (None) are skipped by the backward kernel."""
    case = make_case((2, 3, 4), fl_into="theta")
    out = transition_scores_fused(**case)
    grads = torch.autograd.grad(out.cot_theta.sum() + 0.5 * out.x_hat.sum(), [case[k] for k in INPUTS])
    want_out = transition_scores_reference(**case)
    want = torch.autograd.grad(want_out[2].sum() + 0.5 * want_out[4].sum(), [case[k] for k in INPUTS],
                               allow_unused=True)
    for g, w, k in zip(grads, want, INPUTS, strict=True):
        torch.testing.assert_close(g, w if w is not None else torch.zeros_like(g), rtol=1e-5, atol=1e-5, msg=k)


def test_triton_channels_last_empty_and_batch_slicing(interpret, monkeypatch):
    case = make_case((2, 3, 5, 4), fl_into="theta")
    cl = {k: (v.detach().to(memory_format=torch.channels_last).requires_grad_() if k in ("x_t", "fl_cot") else v)
          for k, v in case.items()}
    assert all(o.is_contiguous(memory_format=torch.channels_last) for o in transition_scores_fused(**cl))
    upstream = upstream_for((2, 3, 5, 4))
    assert_matches(run(transition_scores_fused, cl, upstream), cl, upstream, torch.float32)
    for shape in [(0, 3), (2, 0)]:
        assert all(o.shape == shape for o in transition_scores_fused(**make_case(shape, grad=False)))
    from fastnabla.kernels import triton_utils

    monkeypatch.setattr(triton_utils, "MAX_GRID_Y", 2)  # batch 5 -> three launches over batch slices
    case = make_case((5, 3, 4), fl_into="pretrained")
    upstream = upstream_for((5, 3, 4))
    assert_matches(run(transition_scores_fused, case, upstream), case, upstream, torch.float32)


# ---------------------------------------------------------------- registration, autograd, compile


@pytest.mark.parametrize("fl_into", ["theta", "pretrained"])
def test_custom_op_closed_form_gradcheck_and_opcheck(fl_into):
    """float64 gradcheck of the reference and of the custom op's closed-form backward; opcheck."""
    case = cast_case(make_case((2, 3, 4), fl_into=fl_into), F64)
    leaves = tuple(case[k] for k in INPUTS)
    coeffs = [case[k].detach() for k in ("a", "b", "sigma", "alpha_bar")]
    ref = lambda *t: transition_scores_reference(*t[:4], *coeffs, 0.8, t[4], fl_into)
    assert torch.autograd.gradcheck(ref, leaves)
    flags = (True,) * 5
    op = lambda *t: torch.ops.fastnabla.transition_scores(*t[:4], *coeffs, 0.8, t[4], fl_into == "pretrained", *flags)
    assert torch.autograd.gradcheck(op, leaves)
    partial = lambda *t: torch.ops.fastnabla.transition_scores(
        *t[:4], *coeffs, 0.8, t[4], fl_into == "pretrained", False, True, False, True, True
    )
    assert torch.autograd.gradcheck(partial, leaves)
    args = [*leaves[:4], *coeffs, 0.8, leaves[4], fl_into == "pretrained", *flags]
    torch.library.opcheck(torch.ops.fastnabla.transition_scores.default, args)


@pytest.mark.parametrize("fl_into", FL)
def test_custom_op_closed_forms_match_reference(fl_into):
    """The registered op called directly on CPU: closed-form forward and backward (eager) vs the reference."""
    case = make_case((4, 3, 5), fl_into=fl_into)
    coeffs = [case[k] for k in ("a", "b", "sigma", "alpha_bar")]

    def via_op(x_t, x_next, eps_theta, eps_pretrained, fl_cot, outputs, **_):
        flags = [name in outputs for name in OUTPUTS]
        outs = iter(torch.ops.fastnabla.transition_scores(x_t, x_next, eps_theta, eps_pretrained, *coeffs, 0.8, fl_cot,
                                                          fl_into == "pretrained", *flags))
        return [next(outs) if want else None for want in flags]

    assert via_op(**case, outputs=OUTPUTS)[0].grad_fn.name().startswith("GeneratedBackwardFor_fastnabla")
    for outputs in (OUTPUTS, ("rev_local", "cot_pretrained")):
        upstream = upstream_for((4, 3, 5))
        assert_matches(run(via_op, case, upstream, outputs), case, upstream, torch.float32, outputs)


@pytest.mark.parametrize("entry", ["op", "public"])
def test_compile_fullgraph_aot_eager(entry, monkeypatch):
    monkeypatch.setattr(dispatch, "use_compiled", lambda *a: True)  # the public entry takes the custom op
    monkeypatch.setattr(dispatch, "compiled", lambda fn: fn)
    case = make_case((2, 4, 6, 5), fl_into="theta")
    coeffs = [case[k] for k in ("a", "b", "sigma", "alpha_bar")]
    leaves = [case[k] for k in INPUTS]

    def loss(x_t, x_next, eps_theta, eps_pretrained, fl_cot):
        if entry == "op":
            outs = torch.ops.fastnabla.transition_scores(x_t, x_next, eps_theta, eps_pretrained, *coeffs, 0.8, fl_cot,
                                                         False, True, True, True, False, True)
        else:
            outs = [o for o in transition_scores_fused(x_t, x_next, eps_theta, eps_pretrained, *coeffs, 0.8, fl_cot,
                                                        outputs=("score_fwd", "rev_local", "cot_theta", "x_hat"))
                    if o is not None]
        return sum((i + 1) * o.square().mean() for i, o in enumerate(outs))

    got = torch.compile(loss, fullgraph=True, backend="aot_eager")(*leaves)
    want = loss(*leaves)
    torch.testing.assert_close(got, want)
    for g, w in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_cpu_path_dynamic_batches(monkeypatch):
    """``FASTNABLA_COMPILE=on``: the closed forms compiled by inductor, one graph per pass for every batch size
    > 1, keeping only the [B] coefficients for backward."""
    monkeypatch.setenv("FASTNABLA_COMPILE", "on")
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    for batch in (3, 6):
        case = make_case((batch, 4, 6, 6), fl_into="pretrained")
        upstream = upstream_for((batch, 4, 6, 6))
        assert_matches(run(transition_scores_fused, case, upstream), case, upstream, torch.float32)
    assert counters["stats"]["unique_graphs"] == 2
    out = transition_scores_fused(**case).score_fwd.sum()  # backward twice through one graph
    first = torch.autograd.grad(out, case["eps_theta"], retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(out, case["eps_theta"])[0], first)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        transition_scores_fused(**case)
    assert kept and all(t.numel() <= case["x_t"].shape[0] for t in kept)  # [B] coefficients, 0-d eta


# ---------------------------------------------------------------- dispatch and input checks


def test_reference_route_is_inline_autograd():
    case = make_case((3, 5), fl_into="theta")
    out = transition_scores_fused(**case)
    assert "TransitionScoresFunction" not in out.score_fwd.grad_fn.name()  # small CPU tensors: plain autograd
    upstream = upstream_for((3, 5), torch.bfloat16)
    bf16 = cast_case(case, torch.bfloat16)
    assert_matches(run(transition_scores_fused, bf16, upstream), bf16, upstream, torch.bfloat16)


BAD_INPUTS = [
    ("int-x", mutated(x_t=lambda c: c["x_t"].long()), TypeError, "x_t has dtype torch.int64"),
    ("fp64-x", mutated(x_t=lambda c: c["x_t"].double()), TypeError, "x_t has dtype torch.float64"),
    ("dtype-mix", mutated(eps_pretrained=lambda c: c["eps_pretrained"].half()), TypeError,
     "eps_pretrained has dtype torch.float16 but x_t"),
    ("shape-mix", mutated(x_next=lambda c: c["x_next"][:, :2]), ValueError, r"x_next has shape \(3, 2\)"),
    ("fl-shape", mutated(fl_cot=torch.ones(3, 4)), ValueError, r"fl_cot has shape \(3, 4\)"),
    ("device-mix", mutated(eps_theta=lambda c: c["eps_theta"].to("meta")), ValueError, "eps_theta is on meta"),
    ("not-tensor", mutated(x_next=1.0), TypeError, "x_next must be a torch.Tensor"),
    ("scalar-x", mutated(x_t=lambda c: c["x_t"][0, 0]), ValueError, "leading batch dimension"),
    ("coef-len", mutated(a=torch.ones(4)), ValueError, r"a must have shape \[3\]"),
    ("coef-int", mutated(alpha_bar=torch.ones(3, dtype=torch.long)), TypeError, "alpha_bar must be a floating"),
    ("coef-grad", mutated(sigma=lambda c: c["sigma"].clone().requires_grad_()), ValueError, "sigma requires grad"),
    ("eta-str", mutated(prior_strength="1"), TypeError, "prior_strength must be a Python number"),
    ("fl-into", mutated(fl_into="both"), ValueError, "fl_into='both' is not one of"),
    ("outputs-name", mutated(outputs=("score",)), ValueError, "outputs must be a non-empty tuple"),
    ("outputs-empty", mutated(outputs=()), ValueError, "outputs must be a non-empty tuple"),
]


@pytest.mark.parametrize("mutate, exc, match", [pytest.param(*b[1:], id=b[0]) for b in BAD_INPUTS])
def test_bad_inputs(mutate, exc, match):
    with pytest.raises(exc, match=match):
        transition_scores_fused(**mutate(make_case((3, 5), fl_into="theta", grad=False)))


def test_accepts_gathered_coefficients():
    """``DenoisingMDP.gather`` output ([B,1,...,1], float64) is accepted and used in fp32."""
    case = make_case((3, 2, 4, 4), grad=False)
    gathered = MDP.gather(steps_for(3), 4, dtype=F64)
    got = transition_scores_fused(**{**case, **{k: gathered[k] for k in ("a", "b", "sigma", "alpha_bar")}})
    for g, w in zip(got, transition_scores_reference(**case), strict=True):
        torch.testing.assert_close(g, w)
