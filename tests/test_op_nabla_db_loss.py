"""Fused residual nabla-DB loss (``fastnabla.ops.nabla_db_loss``) against the reference
``fastnabla.ops.nabla_db_loss.residual_nabla_db_loss``: Triton (interpreter) and the closed-form CPU path, every option
combination, every gradient, registration, compile, dispatch and input checks.

Triton runs here through its CPU interpreter, switched on per test by the ``interpret`` fixture (see
``tests/test_op_denoise_step.py`` for why a fixture and not a subprocess or conftest).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import mutated

from fastnabla.mdp.schedule import SD15_SCHEDULER_CONFIG, build_mdp
from fastnabla.ops import dispatch
from fastnabla.ops.nabla_db_loss import (
    GRAD_INPUTS,
    NablaDBTerms,
    nabla_db_loss_reference,
    residual_nabla_db_loss,
    residual_nabla_db_loss_fused,
)

HAS_TRITON = dispatch.triton_available()
MDP = build_mdp(SD15_SCHEDULER_CONFIG, 50, "ddim", 1.0)
STATES = GRAD_INPUTS + ("reverse_target",)
TERMS = ("forward", "reverse", "terminal", "output_reg", "total")
STEP_CYCLE = (49, 0, 17, 49, 33, 5, 41)  # mixed timesteps; 49 is the last step: x_{t+1} = x_T is terminal
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
]
SHAPES = [
    pytest.param((3, 4, 17, 9), id="odd3x4x17x9"),
    pytest.param((7, 4, 8, 8), id="latent7x4x8x8"),
    pytest.param((5, 3), id="flat5x3"),
    pytest.param((4,), id="scalar-state4"),
]
OPTIONS = {
    "paper": {},
    "release": {"output_reg": 2.0, "w_forward": "tensor", "w_reverse": 0.5},
    "second-order": {"detach_reverse": False, "prior_strength": 0.7, "output_reg": 1.5, "w_forward": "tensor"},
    "pathwise-target": {"reverse_target": True, "forward_trains_flow": False, "prior_strength": 1.3},
    "second-order-no-fwd-flow": {"detach_reverse": False, "forward_trains_flow": False, "w_reverse": "tensor"},
}


pytestmark = pytest.mark.usefixtures("clean_backend_env")


def make_case(shape, dtype=torch.float32, options: dict | None = None, seed=0, grad=True) -> dict:
    """Keyword arguments of the loss: real SD1.5 DDIM coefficients, a different step per sample, terminal
    and non-terminal transitions mixed, ``x_{t+1}`` sampled from ``eps_old`` as a trajectory would be."""
    options = dict(options or {})
    gen = torch.Generator().manual_seed(seed)
    batch = shape[0]
    steps = torch.tensor([STEP_CYCLE[i % len(STEP_CYCLE)] for i in range(batch)], dtype=torch.long)
    c = {k: getattr(MDP, k)[steps].float() for k in ("a", "b", "sigma")}
    bshape = (batch,) + (1,) * (len(shape) - 1)
    rnd = lambda scale=1.0: scale * torch.randn(shape, generator=gen)
    x_t, eps_old = rnd(), rnd()
    case = {
        "x_t": x_t, "eps_old": eps_old,
        "x_next": c["a"].view(bshape) * x_t + c["b"].view(bshape) * eps_old + c["sigma"].view(bshape) * rnd(),
        "eps_theta": eps_old + rnd(0.1), "eps_pretrained": eps_old + rnd(0.1),
        "vjp_theta": rnd(), "vjp_pretrained": rnd(),
        "fl_t": rnd(), "fl_next": rnd(), "flow_t": rnd(), "flow_next": rnd(), "reverse_target": rnd(3.0),
    }
    case = {k: v.to(dtype).requires_grad_(grad) for k, v in case.items()}
    if not options.pop("reverse_target", False):
        case["reverse_target"] = None
    for w in ("w_forward", "w_reverse"):
        if options.get(w) == "tensor":
            options[w] = 0.5 + torch.rand(batch, generator=gen)
    return {**case, **c, "terminal": steps == MDP.num_steps - 1, **options}


def to_reference_case(case: dict, dtype: torch.dtype | None = None) -> dict:
    """The same case for the reference: [B, 1, ...] coefficients; states (as new leaves), coefficients and
    weights in ``dtype`` (default: the states' dtype, i.e. torch's own low-precision computation)."""
    dtype = dtype or case["x_t"].dtype
    out = dict(case)
    nd = case["x_t"].dim()
    for k in ("a", "b", "sigma"):
        out[k] = case[k].reshape((-1,) + (1,) * (nd - 1)).to(dtype)
    for k in STATES:
        if case[k] is not None:
            out[k] = case[k].detach().to(dtype).requires_grad_(case[k].requires_grad)
    for w in ("w_forward", "w_reverse"):
        if isinstance(out.get(w), torch.Tensor):
            out[w] = out[w].to(dtype)
    return out


def run(fn, case: dict, upstream: torch.Tensor) -> dict:
    """Terms and the gradients of every state that requires grad, under a random [5, B] upstream gradient."""
    terms = fn(**case)
    outs = [getattr(terms, t) for t in TERMS]
    names = [k for k in STATES if case[k] is not None and case[k].requires_grad]
    pairs = [(o, u) for o, u in zip(outs, upstream.to(outs[0].dtype), strict=True) if o.requires_grad]
    grads = torch.autograd.grad([p[0] for p in pairs], [case[k] for k in names], [p[1] for p in pairs],
                                allow_unused=True)
    result = {f"term_{t}": o.detach() for t, o in zip(TERMS, outs, strict=True)}
    result.update({f"grad_{k}": g for k, g in zip(names, grads, strict=True)})
    return result


def producer(term: torch.Tensor) -> str:
    """Name of the autograd node behind a term (the fused path's terms are views of one [5, B] output)."""
    node = term.grad_fn
    return node.next_functions[0][0].name() if node.name() == "UnbindBackward0" else node.name()


def max_err(t: torch.Tensor, ref: torch.Tensor) -> float:
    return float((t.double() - ref.double()).abs().max()) if t.numel() else 0.0


def assert_matches(fused: dict, case: dict, upstream: torch.Tensor, dtype: torch.dtype) -> None:
    """Against a float64 reference, the fused error is at most 2x torch's own error (the reference run in ``dtype``,
    coefficients included) plus one ulp of the output's scale; the same terms and gradients must exist."""
    exact = run(residual_nabla_db_loss, to_reference_case(case, torch.float64), upstream.double())
    torch_own = run(residual_nabla_db_loss, to_reference_case(case), upstream)
    assert fused.keys() == exact.keys()
    for name, got in fused.items():
        want = exact[name]
        assert (got is None) == (want is None), f"{name}: the fused op and the reference disagree on whether it exists"
        if got is None:
            continue
        assert got.dtype == (torch.float32 if name.startswith("term_") else dtype), name
        assert got.shape == want.shape, name
        scale = float(want.abs().max()) if want.numel() else 0.0
        bound = 2 * max_err(torch_own[name], want) + torch.finfo(got.dtype).eps * scale
        assert max_err(got, want) <= bound, f"{name}: error {max_err(got, want):.3g} > {bound:.3g}"


def upstream_for(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(5, batch, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- Triton (interpreter) vs the reference


@pytest.mark.parametrize("options", [pytest.param(v, id=k) for k, v in OPTIONS.items()])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_matches_reference(interpret, dtype, shape, options):
    case = make_case(shape, dtype, options)
    # late SD steps have 1/sigma^2 ~ 2e3: fp16 gradients (max 65504) need a smaller upstream gradient
    upstream = upstream_for(shape[0]) * (1e-2 if dtype == torch.float16 else 1.0)
    fused = run(residual_nabla_db_loss_fused, case, upstream)
    assert_matches(fused, case, upstream, dtype)


def test_triton_is_the_path_and_is_deterministic(interpret, monkeypatch):
    """The public entry runs the kernels; partial sums are added in a fixed order (no atomics), so
    reruns are bit-identical, also with many blocks per sample."""
    from fastnabla.kernels import nabla_db_loss as kernels

    forward = kernels.nabla_db_loss_forward
    calls = []
    monkeypatch.setattr(kernels, "nabla_db_loss_forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    case = make_case((3, 4, 33, 8), options=OPTIONS["release"], grad=False)
    first = residual_nabla_db_loss_fused(**case)
    assert calls, "the Triton forward did not run"
    args = [case[k] for k in STATES] + [case["a"], case["b"], case["sigma"], case["terminal"].float(),
                                        case["w_forward"], torch.full((3,), 0.5), 1.0, 2.0]
    blocked = [forward(*args, block_size=64) for _ in range(2)]  # 17 blocks per sample
    assert torch.equal(blocked[0], blocked[1])
    torch.testing.assert_close(blocked[0], torch.stack([getattr(first, t) for t in TERMS]), rtol=1e-5, atol=0)


def test_triton_partial_grads_and_batch_slicing(interpret, monkeypatch):
    """Only the requested gradients are written; batches beyond the grid limit launch in slices."""
    from fastnabla.kernels import triton_utils

    monkeypatch.setattr(triton_utils, "MAX_GRID_Y", 2)  # batch 5 -> three launches
    case = make_case((5, 3, 4), options=OPTIONS["second-order"], grad=False)
    case["flow_t"].requires_grad_(True)
    case["vjp_pretrained"].requires_grad_(True)
    upstream = upstream_for(5)
    fused = run(residual_nabla_db_loss_fused, case, upstream)
    assert sorted(k for k in fused if k.startswith("grad_")) == ["grad_flow_t", "grad_vjp_pretrained"]
    assert_matches(fused, case, upstream, torch.float32)


def test_triton_channels_last(interpret):
    case = make_case((2, 3, 5, 4), options=OPTIONS["release"])
    cl = {k: (v.detach().to(memory_format=torch.channels_last).requires_grad_() if k in ("x_t", "eps_theta") else v)
          for k, v in case.items()}
    upstream = upstream_for(2)
    fused = run(residual_nabla_db_loss_fused, cl, upstream)
    assert fused["grad_eps_theta"].is_contiguous(memory_format=torch.channels_last)
    assert_matches(fused, cl, upstream, torch.float32)


# ---------------------------------------------------------------- closed-form CPU path, registration


def closed_forms_uncompiled(mp: pytest.MonkeyPatch) -> None:
    """Route CPU calls through the fused path (custom Function + closed forms) without compiling them."""
    mp.setattr(dispatch, "use_compiled", lambda *a: True)
    mp.setattr(dispatch, "compiled", lambda fn: fn)


OPTION_GRID = [
    pytest.param(dict(detach_reverse=d, forward_trains_flow=f, reverse_target=t, output_reg=1.5 * r, prior_strength=0.7,
                      w_forward="tensor"),
                 id=f"{'detach' if d else 'second'}-{'ftf' if f else 'noftf'}-{'target' if t else 'score'}-"
                    f"{'reg' if r else 'noreg'}")
    for d, f, t, r in itertools.product([True, False], repeat=4)
]


def via_custom_op(**case) -> NablaDBTerms:
    """The registered op called directly (eager closed forms on CPU, registered autograd formula)."""
    batch = case["x_t"].shape[0]
    weight = lambda w: w if isinstance(w, torch.Tensor) else torch.full((batch,), float(w))
    lam = case.get("output_reg", 0.0)
    eps_old = case["eps_old"] if lam else None
    target = case["reverse_target"]
    states = [case[k] for k in STATES[:10]] + [eps_old, target]
    if target is not None:
        states[4:6] = [None, None]
    terms = torch.ops.fastnabla.residual_nabla_db_loss(
        *states, case["a"], case["b"], case["sigma"], case["terminal"].float(), weight(case.get("w_forward", 1.0)),
        weight(case.get("w_reverse", 1.0)), case.get("prior_strength", 1.0), lam, case.get("detach_reverse", True),
        case.get("forward_trains_flow", True),
    )
    return NablaDBTerms(*terms.unbind(0))


@pytest.mark.parametrize("entry", ["function", "custom-op"])
@pytest.mark.parametrize("options", OPTION_GRID)
def test_closed_forms_match_reference(options, entry):
    """Every option combination through the CPU fused path (the closed-form Function, run uncompiled here)
    and through the registered custom op (its closed-form implementation and autograd formula)."""
    case = make_case((5, 3, 4), options=options)
    upstream = upstream_for(5)
    if entry == "custom-op":
        assert producer(via_custom_op(**case).total).startswith("GeneratedBackwardFor_fastnabla_residual_nabla_db")
        assert_matches(run(via_custom_op, case, upstream), case, upstream, torch.float32)
        return
    with pytest.MonkeyPatch.context() as mp:
        closed_forms_uncompiled(mp)
        assert producer(residual_nabla_db_loss_fused(**case).total) == "ResidualNablaDbLossFunctionBackward"
        fused = run(residual_nabla_db_loss_fused, case, upstream)
    assert_matches(fused, case, upstream, torch.float32)


def test_opcheck_and_gradcheck_float64():
    """float64 gradcheck of the closed-form forward reference (autograd through it) and of the custom op's
    closed-form backward, plus ``torch.library.opcheck`` of the registration."""
    case = make_case((3, 2, 3), options=OPTIONS["second-order"])
    case.update(reverse_target=None)
    states = [case[k].detach().double().requires_grad_() if case[k] is not None else None for k in STATES]
    per_sample = [case["a"].double(), case["b"].double(), case["sigma"].double(), case["terminal"].double(),
                  case["w_forward"].double(), torch.full((3,), 0.8, dtype=torch.float64)]
    leaves = [s for s in states if s is not None]

    def with_states(fn):
        def call(*ts):
            it = iter(ts)
            return fn([next(it) if s is not None else None for s in states])
        return call

    ref = with_states(lambda s: nabla_db_loss_reference(*s, *per_sample, 0.7, 1.5))
    assert torch.autograd.gradcheck(ref, tuple(leaves))
    op = with_states(lambda s: torch.ops.fastnabla.residual_nabla_db_loss(*s, *per_sample, 0.7, 1.5, False, True))
    assert torch.autograd.gradcheck(op, tuple(leaves))
    args = [*states, *per_sample, 0.7, 1.5, False, True]
    torch.library.opcheck(torch.ops.fastnabla.residual_nabla_db_loss.default, args)


def test_saves_only_inputs_for_backward():
    """The fused path keeps nothing for backward but its inputs and [B] vectors; the reference keeps
    intermediates of the full state size."""
    case = make_case((4, 3, 8, 8), options=OPTIONS["release"])
    state_ptrs = {case[k].untyped_storage().data_ptr() for k in STATES if case[k] is not None}
    numel = case["x_t"].numel()

    def saved(fn, kw):
        kept = []

        def pack(t):
            kept.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(**kw)
        return [t for t in kept if t.untyped_storage().data_ptr() not in state_ptrs and t.numel() >= numel]

    with pytest.MonkeyPatch.context() as mp:
        closed_forms_uncompiled(mp)
        assert saved(residual_nabla_db_loss_fused, case) == []
    assert len(saved(residual_nabla_db_loss, to_reference_case(case))) >= 2


@pytest.mark.parametrize("entry", ["op", "public"])
def test_compile_fullgraph_through_op_aot_eager(entry):
    """Fake + autograd registration: fullgraph tracing of the op's forward and backward (no inductor), called
    directly or through the public entry (which calls the custom op while compiling)."""
    case = make_case((3, 4, 5, 2), options=OPTIONS["release"])
    fixed = {k: v for k, v in case.items() if k not in ("eps_theta", "flow_t", "flow_next")}
    leaves = {k: case[k] for k in ("eps_theta", "flow_t", "flow_next")}
    per_sample = [case["a"], case["b"], case["sigma"], case["terminal"].float(), case["w_forward"],
                  torch.full((3,), 0.5)]

    def loss(eps_theta, flow_t, flow_next):
        if entry == "public":
            terms = residual_nabla_db_loss_fused(eps_theta=eps_theta, flow_t=flow_t, flow_next=flow_next, **fixed)
            return terms.total.mean() + 0.1 * terms.forward.sum()
        s = {**case, "eps_theta": eps_theta, "flow_t": flow_t, "flow_next": flow_next}
        terms = torch.ops.fastnabla.residual_nabla_db_loss(*(s[k] for k in STATES), *per_sample, 1.0, 2.0, True, True)
        return terms[4].mean() + 0.1 * terms[0].sum()

    with pytest.MonkeyPatch.context() as mp:
        closed_forms_uncompiled(mp)
        got = torch.compile(loss, fullgraph=True, backend="aot_eager")(**leaves)
        grads = torch.autograd.grad(got, list(leaves.values()))
        want = loss(**leaves)
        want_grads = torch.autograd.grad(want, list(leaves.values()))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    reference_terms = residual_nabla_db_loss(**to_reference_case(case))
    torch.testing.assert_close(want, reference_terms.total.mean() + 0.1 * reference_terms.forward.sum(), rtol=1e-5,
                               atol=0)


@pytest.mark.slow
def test_compile_fullgraph_inductor_through_op():
    """Inductor (C++ on CPU) around the custom op: forward and registered backward run inside the compiled
    graph (~10 s with a cold inductor cache)."""
    case = make_case((3, 4, 5, 2), options=OPTIONS["second-order"])
    per_sample = [case["a"], case["b"], case["sigma"], case["terminal"].float(), case["w_forward"],
                  torch.full((3,), 1.0)]
    names = ("eps_theta", "vjp_theta", "flow_t", "flow_next")

    def loss(*leaves):
        s = {**case, **dict(zip(names, leaves, strict=True))}
        terms = torch.ops.fastnabla.residual_nabla_db_loss(*(s[k] for k in STATES), *per_sample, 0.7, 1.5, False,
                                                           True)
        return (terms[4] * torch.arange(1.0, 4.0)).sum() + terms[1].mean()

    leaves = [case[k] for k in names]
    got = torch.compile(loss, fullgraph=True)(*leaves)
    want = loss(*leaves)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    for g, w in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_cpu_path_dynamic_batches(monkeypatch):
    """``FASTNABLA_COMPILE=on``: the closed forms compiled by inductor, one graph per pass for every batch size
    > 1, nothing saved but the inputs (~25 s with a cold inductor cache, a few seconds warm)."""
    monkeypatch.setenv("FASTNABLA_COMPILE", "on")
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    for batch in (3, 5, 9):
        case = make_case((batch, 4, 6, 6), options=OPTIONS["release"])
        upstream = upstream_for(batch)
        assert_matches(run(residual_nabla_db_loss_fused, case, upstream), case, upstream, torch.float32)
    assert counters["stats"]["unique_graphs"] == 2  # forward + backward, reused for every batch size
    terms = residual_nabla_db_loss_fused(**case)  # backward twice through one graph
    first = torch.autograd.grad(terms.total.sum(), case["eps_theta"], retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(terms.total.sum(), case["eps_theta"])[0], first)
    state_ptrs = {case[k].untyped_storage().data_ptr() for k in STATES if case[k] is not None}
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        residual_nabla_db_loss_fused(**case)
    extra = [t for t in kept if t.untyped_storage().data_ptr() not in state_ptrs and t.numel() >= case["x_t"].numel()]
    assert kept and not extra


# ---------------------------------------------------------------- dispatch and input checks


def test_cpu_dispatch_routes(monkeypatch):
    case = make_case((2, 3), options=OPTIONS["release"])
    terms = residual_nabla_db_loss_fused(**case)  # small CPU tensors: the reference, inline
    assert producer(terms.total) == "AddBackward0"
    assert terms.total.dtype == torch.float32
    monkeypatch.setenv("FASTNABLA_COMPILE", "off")
    assert dispatch.use_compiled("cpu", 10**9, 1) is False
    monkeypatch.setenv("FASTNABLA_COMPILE", "on")
    assert dispatch.use_compiled("cpu", 1, 10) is True
    monkeypatch.setenv("FASTNABLA_COMPILE", "auto")
    assert dispatch.use_compiled("cpu", 10, 10) and not dispatch.use_compiled("cpu", 9, 10)
    assert not dispatch.use_compiled("cuda", 10**9, 10)
    monkeypatch.setenv("FASTNABLA_COMPILE", "sometimes")
    with pytest.raises(ValueError, match="FASTNABLA_COMPILE='sometimes' is not one of"):
        residual_nabla_db_loss_fused(**case)


def test_low_precision_reference_route_returns_fp32_terms():
    case = make_case((3, 5), dtype=torch.bfloat16, options=OPTIONS["release"])
    upstream = upstream_for(3)
    assert_matches(run(residual_nabla_db_loss_fused, case, upstream), case, upstream, torch.bfloat16)


BAD_INPUTS = [
    ("int-x", mutated(x_t=lambda c: c["x_t"].long()), TypeError, "x_t has dtype torch.int64"),
    ("fp64-x", mutated(x_t=lambda c: c["x_t"].double()), TypeError, "x_t has dtype torch.float64"),
    ("dtype-mix", mutated(fl_t=lambda c: c["fl_t"].half()), TypeError, "fl_t has dtype torch.float16 but x_t has"),
    ("shape-mix", mutated(flow_next=lambda c: c["flow_next"][:, :2]), ValueError, r"flow_next has shape \(3, 2\)"),
    ("device-mix", mutated(eps_pretrained=lambda c: c["eps_pretrained"].to("meta")), ValueError,
     "eps_pretrained is on meta"),
    ("none-state", mutated(fl_next=None), TypeError, "fl_next must be a torch.Tensor"),
    ("no-vjp", mutated(vjp_pretrained=None), ValueError, "vjp_theta and vjp_pretrained are needed"),
    ("terminal-int", mutated(terminal=lambda c: c["terminal"].long()), ValueError, r"terminal must be a bool"),
    ("terminal-len", mutated(terminal=torch.zeros(4, dtype=torch.bool)), ValueError, r"terminal must be a bool"),
    ("coef-len", mutated(a=torch.ones(4)), ValueError, r"a must have shape \[3\]"),
    ("coef-grad", mutated(sigma=lambda c: c["sigma"].clone().requires_grad_()), ValueError, "sigma requires grad"),
    ("weight-grad", mutated(w_forward=torch.ones(3, requires_grad=True)), ValueError, "w_forward requires grad"),
    ("weight-shape", mutated(w_reverse=torch.ones(2)), ValueError, r"w_reverse must have shape \[3\]"),
    ("weight-str", mutated(w_reverse="1"), TypeError, "w_reverse must be a Python number"),
    ("eta-tensor", mutated(prior_strength=torch.tensor(1.0)), TypeError, "prior_strength must be a Python number"),
]


@pytest.mark.parametrize("mutate, exc, match", [pytest.param(*b[1:], id=b[0]) for b in BAD_INPUTS])
def test_bad_inputs(mutate, exc, match):
    with pytest.raises(exc, match=match):
        residual_nabla_db_loss_fused(**mutate(make_case((3, 5), grad=False)))


def test_accepts_broadcast_coefficients_and_scalar_weights():
    """``DenoisingMDP.gather`` output ([B,1,...,1], float64), 0-d weight tensors, and a reverse target with
    no VJPs all work; the terms equal the reference's."""
    case = make_case((3, 2, 4, 4), options=OPTIONS["pathwise-target"], grad=False)
    steps = torch.tensor([49, 3, 20])
    gathered = MDP.gather(steps, 4, dtype=torch.float64)
    kw = {**case, **{k: gathered[k] for k in ("a", "b", "sigma")}, "w_forward": torch.tensor(0.3),
          "vjp_theta": None, "vjp_pretrained": None}
    got = residual_nabla_db_loss_fused(**kw)
    want = residual_nabla_db_loss(**{**case, **{k: gathered[k].float() for k in ("a", "b", "sigma")},
                                     "w_forward": 0.3})
    for t in TERMS:
        torch.testing.assert_close(getattr(got, t), getattr(want, t), rtol=1e-5, atol=1e-6)
