"""Fused denoising step + Tweedie (``fastnabla.ops.denoise_step``): Triton vs reference, registration,
dispatch and input checks.

How the Triton kernels run here (CPU, no GPU): triton 3.9 reads ``TRITON_INTERPRET`` when a function
is jitted, and ``fastnabla.kernels.denoise_step`` jits lazily, caching one set of kernels per value.
So the ``interpret`` fixture (tests/conftest.py) sets the variable with ``monkeypatch`` for the Triton tests only.
That is cheaper than a subprocess (no second ~1.5 s torch import, per-case pytest reporting kept)
and, unlike setting it in ``tests/conftest.py``, it does not route other tests' CPU calls through
the ~1.5 ms-per-program interpreter (the dispatch rule reads the variable at call time).
"""

from __future__ import annotations

import pytest
import torch
from conftest import mutated

from fastnabla.mdp import gaussian_policy as gp
from fastnabla.mdp.schedule import SD15_SCHEDULER_CONFIG, build_mdp
from fastnabla.ops import dispatch
from fastnabla.ops.denoise_step import denoise_step_fused, denoise_step_reference

HAS_TRITON = dispatch.triton_available()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
MDP = build_mdp(SD15_SCHEDULER_CONFIG, 50, "ddim", 1.0)
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
]
SHAPES = [
    pytest.param((3, 4, 17, 9), id="odd3x4x17x9"),
    pytest.param((5, 4, 8, 8), id="latent5x4x8x8"),
    pytest.param((4, 7), id="flat4x7"),
]
CFG = [pytest.param(False, id="nocfg"), pytest.param(True, id="cfg")]


pytestmark = pytest.mark.usefixtures("clean_backend_env")


def make_case(shape, dtype=torch.float32, cfg=False, seed=0, requires_grad=True) -> dict:
    """Inputs with real SD1.5 DDIM coefficients, a different timestep per sample."""
    gen = torch.Generator().manual_seed(seed)
    steps = torch.linspace(0, MDP.num_steps - 1, shape[0]).round().long()
    case = {k: torch.randn(shape, generator=gen).to(dtype) for k in ("x", "eps", "noise")}
    case["eps_cond"] = torch.randn(shape, generator=gen).to(dtype) if cfg else None
    for k in ("x", "eps", "noise", "eps_cond"):
        if case[k] is not None:
            case[k].requires_grad_(requires_grad)
    coeffs = {k: getattr(MDP, k)[steps].float() for k in ("a", "b", "sigma", "alpha_bar")}
    return {**case, **coeffs, "guidance_scale": 5.0 if cfg else None}


def grad_inputs(case: dict) -> list[str]:
    return [k for k in ("x", "eps", "eps_cond", "noise") if case[k] is not None and case[k].requires_grad]


def run(fn, case: dict, upstream: tuple[torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
    """``[x_next, x_hat, grads...]`` of ``fn`` under random upstream grads for both outputs."""
    outs = fn(**case)
    names = grad_inputs(case)
    grads = torch.autograd.grad(outs, [case[k] for k in names], upstream)
    return [o.detach() for o in outs] + list(grads)


def cast_case(case: dict, dtype: torch.dtype) -> dict:
    out = {}
    for k, v in case.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().to(dtype).requires_grad_(v.requires_grad)
        out[k] = v
    return out


def naive_low_precision(x, eps, noise, a, b, sigma, alpha_bar, eps_cond=None, guidance_scale=None):
    """Torch's own low-precision composition: every op, coefficients included, in x.dtype."""
    c = {k: v.to(x.dtype).view(-1, *[1] * (x.dim() - 1)) for k, v in dict(a=a, b=b, s=sigma, ab=alpha_bar).items()}
    e = gp.cfg_combine(eps, eps_cond, guidance_scale) if eps_cond is not None else eps
    return gp.denoise_step(x, e, c["a"], c["b"], c["s"], noise), gp.tweedie_x0(x, e, c["ab"])


def max_err(t: torch.Tensor, ref: torch.Tensor) -> float:
    return float((t.double() - ref.double()).abs().max()) if t.numel() else 0.0


def assert_matches(fused: list, case: dict, upstream: tuple, dtype: torch.dtype) -> None:
    labels = ["x_next", "x_hat"] + [f"grad_{k}" for k in grad_inputs(case)]
    if dtype == torch.float32:
        ref = run(denoise_step_reference, case, upstream)
        for name, got, want in zip(labels, fused, ref, strict=True):
            torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6, msg=lambda m, n=name: f"{n}: {m}")
        return
    # Low precision: the fused error vs an fp64 reference must be <= 2x torch's own low-precision error
    # (plus one ulp of the output scale, so an exactly-rounded torch result cannot fail the test).
    exact = run(denoise_step_reference, cast_case(case, torch.float64), tuple(u.double() for u in upstream))
    torch_lp = run(naive_low_precision, case, upstream)
    eps = torch.finfo(dtype).eps
    for name, got, want, lp in zip(labels, fused, exact, torch_lp, strict=True):
        assert got.dtype == dtype, name
        bound = 2 * max_err(lp, want) + eps * float(want.abs().max())
        assert max_err(got, want) <= bound, f"{name}: fused error {max_err(got, want):.3g} > {bound:.3g}"


# ---------------------------------------------------------------- Triton (interpreter) vs reference


@pytest.mark.parametrize("cfg", CFG)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_matches_reference(interpret, dtype, shape, cfg):
    case = make_case(shape, dtype, cfg)
    gen = torch.Generator().manual_seed(1)
    upstream = tuple(torch.randn(shape, generator=gen).to(dtype) for _ in range(2))
    fused = run(denoise_step_fused, case, upstream)
    assert denoise_step_fused(**case)[0].grad_fn.name() == "DenoiseStepFunctionBackward"  # the eager twin
    assert_matches(fused, case, upstream, dtype)


@pytest.mark.parametrize("cfg", CFG)
def test_triton_partial_grads(interpret, cfg):
    """Only the requested gradients are computed; the others stay None."""
    case = make_case((3, 2, 5, 7), cfg=cfg, requires_grad=False)
    grad_of = "eps_cond" if cfg else "eps"
    case[grad_of].requires_grad_(True)
    upstream = (torch.randn(3, 2, 5, 7), torch.randn(3, 2, 5, 7))
    fused = run(denoise_step_fused, case, upstream)
    assert len(fused) == 3
    assert_matches(fused, case, upstream, torch.float32)


def test_triton_channels_last_and_mixed_layouts(interpret):
    case = make_case((2, 3, 5, 4))
    upstream = (torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4))
    ref = run(denoise_step_reference, case, upstream)
    cl = {k: (v.detach().to(memory_format=torch.channels_last).requires_grad_() if k in ("x", "noise") else v)
          for k, v in case.items()}
    out = denoise_step_fused(**cl)
    assert all(o.is_contiguous(memory_format=torch.channels_last) for o in out)
    fused = run(denoise_step_fused, cl, upstream)
    for got, want in zip(fused, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)


def test_triton_empty_and_batch_slicing(interpret, monkeypatch):
    for shape in [(0, 3), (2, 0)]:
        xn, xh = denoise_step_fused(**make_case(shape, requires_grad=False))
        assert xn.shape == xh.shape == shape
    from fastnabla.kernels import triton_utils

    monkeypatch.setattr(triton_utils, "MAX_GRID_Y", 2)  # batch 5 -> three launches over batch slices
    case = make_case((5, 3, 4))
    upstream = (torch.randn(5, 3, 4), torch.randn(5, 3, 4))
    assert_matches(run(denoise_step_fused, case, upstream), case, upstream, torch.float32)


# ---------------------------------------------------------------- registration, autograd, compile


@pytest.mark.parametrize("cfg", CFG)
def test_custom_op_reference_impl_and_opcheck(cfg):
    """The custom op on CPU (reference impl + closed-form backward) against autograd, plus opcheck."""
    case = make_case((2, 3, 4, 5), cfg=cfg)
    upstream = (torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5))
    keys = ("x", "eps", "noise", "a", "b", "sigma", "alpha_bar", "eps_cond")
    args = [case[k] for k in keys] + [case["guidance_scale"] or 1.0]
    op = torch.ops.fastnabla.denoise_step
    fused = run(lambda **c: op(*[c[k] for k in keys], c["guidance_scale"] or 1.0), case, upstream)
    assert_matches(fused, case, upstream, torch.float32)
    torch.library.opcheck(op.default, args)


def test_gradcheck_float64():
    case = cast_case(make_case((2, 3, 4), cfg=True), torch.float64)
    for k in ("a", "b", "sigma", "alpha_bar"):  # the reference also differentiates the coefficients
        case[k].requires_grad_(True)
    names = ["x", "eps", "noise", "a", "b", "sigma", "alpha_bar", "eps_cond"]
    fn = lambda *t: denoise_step_reference(*t, guidance_scale=5.0)
    assert torch.autograd.gradcheck(fn, tuple(case[k] for k in names))
    # the custom op's closed-form backward (reference impl on CPU) in float64
    op = lambda x, e, z, ec: torch.ops.fastnabla.denoise_step(
        x, e, z, *(case[k].detach() for k in names[3:7]), ec, 5.0
    )
    assert torch.autograd.gradcheck(op, tuple(case[k] for k in ("x", "eps", "noise", "eps_cond")))


def test_compile_fullgraph_through_op_aot_eager():
    """Fake + autograd registration: fullgraph tracing of the op's forward and backward (no inductor)."""
    case = make_case((2, 4, 6, 5), cfg=True)
    keys = ("x", "eps", "noise", "a", "b", "sigma", "alpha_bar", "eps_cond")

    def loss(x, eps, noise, eps_cond):
        x_next, x_hat = torch.ops.fastnabla.denoise_step(x, eps, noise, *(case[k] for k in keys[3:7]), eps_cond, 5.0)
        return (x_next.square() + 0.5 * x_hat).sum()

    inputs = [case[k] for k in ("x", "eps", "noise", "eps_cond")]
    got = torch.compile(loss, fullgraph=True, backend="aot_eager")(*inputs)
    grads = torch.autograd.grad(got, inputs)
    want = loss(*inputs)
    torch.testing.assert_close(got, want)
    for g, w in zip(grads, torch.autograd.grad(want, inputs), strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["op", "public"])
def test_compile_fullgraph_inductor(entry):
    """Inductor (C++ on CPU) through the custom op and the public function: ~14 s for both with a
    cold inductor cache (the first compile of a process pays the warm-up), ~4 s each warm."""
    case = make_case((2, 4, 6, 5), cfg=True)
    coeffs = [case[k] for k in ("a", "b", "sigma", "alpha_bar")]

    def loss(x, eps, noise, eps_cond):
        if entry == "op":
            x_next, x_hat = torch.ops.fastnabla.denoise_step(x, eps, noise, *coeffs, eps_cond, 5.0)
        else:
            x_next, x_hat = denoise_step_fused(x, eps, noise, *coeffs, eps_cond=eps_cond, guidance_scale=5.0)
        return (x_next.square() + 0.5 * x_hat).sum()

    inputs = [case[k] for k in ("x", "eps", "noise", "eps_cond")]
    got = torch.compile(loss, fullgraph=True)(*inputs)
    grads = torch.autograd.grad(got, inputs)
    want = loss(*inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    for g, w in zip(grads, torch.autograd.grad(want, inputs), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- dispatch and input checks


@pytest.mark.parametrize(
    "env, device, expected",
    [
        ({}, "cpu", "reference"),
        ({"FASTNABLA_BACKEND": "auto"}, "cpu", "reference"),
        ({"FASTNABLA_BACKEND": "Reference", "TRITON_INTERPRET": "1"}, "cpu", "reference"),
        ({"TRITON_INTERPRET": "1"}, "cpu", "triton"),
        ({"FASTNABLA_BACKEND": "triton", "TRITON_INTERPRET": "1"}, "cpu", "triton"),
        ({"TRITON_INTERPRET": "1"}, "cuda", "reference"),  # the interpreter runs CPU tensors only
        ({}, "cuda", "triton"),
        ({}, "mps", "reference"),
    ],
    ids=["cpu", "auto", "override-ref", "interpret", "override-triton", "cuda-interpret", "cuda", "mps"],
)
def test_select_backend(monkeypatch, env, device, expected):
    if not HAS_TRITON and expected == "triton":
        pytest.skip("triton is not installed")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert dispatch.select_backend(device) == expected


def test_select_backend_errors(monkeypatch):
    case = make_case((2, 3), requires_grad=False)
    monkeypatch.setenv("FASTNABLA_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTNABLA_BACKEND='cuda' is not one of"):
        denoise_step_fused(**case)
    monkeypatch.setenv("FASTNABLA_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        denoise_step_fused(**case)
    monkeypatch.setattr(dispatch, "_TRITON_FOUND", False)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        dispatch.select_backend("cuda")
    monkeypatch.setenv("FASTNABLA_BACKEND", "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.select_backend("cpu") == dispatch.select_backend("cuda") == "reference"


def test_kernel_module_imports_without_triton(kernels_without_triton):
    """``fastnabla.kernels.denoise_step`` imports where triton is missing; a launch explains why it fails."""
    module = kernels_without_triton("denoise_step")
    assert module.HAS_TRITON is False
    case = make_case((2, 3), requires_grad=False)
    with pytest.raises(RuntimeError, match="needs `triton`"):
        module.denoise_step_forward(*(case[k] for k in ("x", "eps", "noise", "a", "b", "sigma", "alpha_bar")))


BAD_INPUTS = [
    ("int-x", mutated(x=lambda c: c["x"].long()), TypeError, "x has dtype torch.int64"),
    ("fp64-x", mutated(x=lambda c: c["x"].double()), TypeError, "x has dtype torch.float64"),
    ("dtype-mix", mutated(eps=lambda c: c["eps"].half()), TypeError, "eps has dtype torch.float16 but x has"),
    ("shape-mix", mutated(noise=lambda c: c["noise"][:, :2]), ValueError, r"noise has shape \(3, 2\)"),
    ("device-mix", mutated(noise=lambda c: c["noise"].to("meta")), ValueError, "noise is on meta"),
    ("not-tensor", mutated(noise=1.0), TypeError, "noise must be a torch.Tensor"),
    ("scalar-x", mutated(x=lambda c: c["x"][0, 0]), ValueError, "leading batch dimension"),
    ("coef-len", mutated(a=lambda c: torch.ones(4)), ValueError, r"a must have shape \[3\]"),
    ("coef-2d", mutated(sigma=lambda c: torch.ones(3, 2)), ValueError, r"sigma must have shape \[3\]"),
    ("coef-0d", mutated(b=lambda c: torch.tensor(1.0)), ValueError, r"b must have shape \[3\]"),
    ("coef-int", mutated(alpha_bar=lambda c: torch.ones(3, dtype=torch.long)), TypeError,
     "alpha_bar must be a floating"),
    ("coef-device", mutated(a=lambda c: c["a"].to("meta")), ValueError, "a is on meta"),
    ("coef-float", mutated(a=0.5), TypeError, r"a must be a torch.Tensor of shape \[3\]"),
    ("coef-grad", mutated(b=lambda c: c["b"].clone().requires_grad_()), ValueError, "b requires grad"),
    ("cfg-no-scale", mutated(eps_cond=lambda c: c["eps"].clone()), ValueError,
     "needs both eps_cond and guidance_scale"),
    ("scale-no-cfg", mutated(guidance_scale=5.0), ValueError, "needs both eps_cond and guidance_scale"),
    ("scale-tensor", mutated(eps_cond=lambda c: c["eps"].clone(), guidance_scale=torch.tensor(5.0)), TypeError,
     "guidance_scale must be a Python number"),
]


@pytest.mark.parametrize("mutate, exc, match", [pytest.param(*b[1:], id=b[0]) for b in BAD_INPUTS])
def test_bad_inputs(mutate, exc, match):
    with pytest.raises(exc, match=match):
        denoise_step_fused(**mutate(make_case((3, 5), requires_grad=False)))


def test_accepts_broadcast_coefficients_and_float64_schedule():
    """``DenoisingMDP.gather`` output ([B,1,...,1], any float dtype) is accepted and used in fp32."""
    case = make_case((3, 2, 4, 4), requires_grad=False)
    steps = torch.linspace(0, MDP.num_steps - 1, 3).round().long()
    gathered = MDP.gather(steps, 4, dtype=torch.float64)
    coeffs = {k: gathered[k] for k in ("a", "b", "sigma", "alpha_bar")}
    got = denoise_step_fused(**{**case, **coeffs})
    for g, w in zip(got, denoise_step_reference(**case), strict=True):
        torch.testing.assert_close(g, w)
