"""Fused forward-looking reward gradient (``fastnabla.ops.forward_looking``): the pixel-side op vs its
one-graph reference and the drop-in vs the reference ``forward_looking_gradient``, with tiny real networks
(an MLP eps-net, a tiny diffusers AutoencoderKL decoder, analytic rewards); chunking, a finite-difference
check, registration / compile, dispatch and input checks. The kernels alone are tested against their
references in ``tests/test_op_forward_looking_kernels.py``.

The ``backend`` fixture runs a test on the reference backend (plain CPU) and on the Triton kernels
through the interpreter (``TRITON_INTERPRET=1`` set per test with monkeypatch, as in
``tests/test_op_denoise_step.py``).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from fastnabla.mdp.schedule import SD15_SCHEDULER_CONFIG, build_mdp
from fastnabla.ops import dispatch
from fastnabla.ops import forward_looking as fl
from fastnabla.ops.forward_looking import forward_looking_gradient
from fastnabla.ops.image_postprocess import image_postprocess_backward_reference, image_postprocess_reference
from fastnabla.rewards.registry import build_reward

HAS_TRITON = dispatch.triton_available()
MDP = build_mdp(SD15_SCHEDULER_CONFIG, 50, "ddim", 1.0)
LOW = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
DTYPES = [pytest.param(torch.float32, id="fp32"), *LOW]
BACKENDS = ["reference", "triton"]
NOISE_VAR = 2e-3


pytestmark = pytest.mark.usefixtures("clean_backend_env")


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch) -> str:
    if request.param == "triton":
        request.getfixturevalue("interpret")
    else:
        assert dispatch.select_backend("cpu") == "reference"
    return request.param


# ---------------------------------------------------------------- tiny real networks


@functools.cache
def tiny_vae(dtype: torch.dtype = torch.float32):
    """A tiny diffusers AutoencoderKL (latents 4 x h x w -> images 3 x 2h x 2w), frozen, same weights per dtype."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_size=16,
    )
    return vae.eval().requires_grad_(False).to(dtype)


def raw_decoder(dtype: torch.dtype = torch.float32):
    vae = tiny_vae(dtype)
    return lambda z: vae.decode(z / vae.config.scaling_factor).sample


def postprocessed_decoder(dtype: torch.dtype = torch.float32):
    """What the reference gets as ``decode``: the VAE decode followed by the standard post-processing."""
    raw = raw_decoder(dtype)
    return lambda z: (raw(z) / 2 + 0.5).clamp(0, 1)


@functools.cache
def reward(name: str = "color-target"):
    model = build_reward(name)
    return lambda images: model.log_reward(images, [""] * images.shape[0])


class TinyEpsNet(torch.nn.Module):
    """A per-sample MLP eps-network on ``[B, 4, h, w]`` latents."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        n = math.prod(shape)
        torch.manual_seed(1)
        self.net = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(n, 32), torch.nn.Tanh(), torch.nn.Linear(32, n),
            torch.nn.Unflatten(1, shape),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def latent_case(batch: int = 3, hw: tuple[int, int] = (8, 6), seed: int = 0, dtype=torch.float32) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "x_hat": (0.8 * torch.randn(batch, 4, *hw, generator=gen)).to(dtype),
        "scale": torch.rand(batch, generator=gen) * 3 + 0.5,
        "noise": torch.randn(3, batch, 4, *hw, generator=gen),
    }


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp(min=1e-30))


# ---------------------------------------------------------------- the pixel-side op end to end


@pytest.mark.parametrize("num_noise", [1, 3])
@pytest.mark.parametrize("chunk", [None, 1, 4])
def test_pixel_gradient_matches_reference(backend, chunk, num_noise):
    """Tiny VAE + fused post-processing + colour reward, terminal-like scales mixed in."""
    case = latent_case(batch=3)
    case["scale"][1] = 1.0  # terminal: scale = beta (here 1)
    noise = case["noise"][:num_noise]
    decode, log_r = raw_decoder(), reward()
    v, lr = fl.forward_looking_pixel_gradient(case["x_hat"], case["scale"], decode, log_r, NOISE_VAR, num_noise,
                                              noise=noise, chunk_size=chunk, postprocess=True)
    want_v, want_lr = fl.forward_looking_pixel_gradient_reference(case["x_hat"], case["scale"], decode, log_r,
                                                                  noise, NOISE_VAR, postprocess=True)
    assert v.dtype == torch.float32 and v.shape == case["x_hat"].shape and lr.shape == (3,)
    torch.testing.assert_close(v, want_v, rtol=1e-5, atol=1e-6 * float(want_v.abs().max()))
    torch.testing.assert_close(lr, want_lr, rtol=1e-6, atol=1e-6)


def naive_low_precision_pixel_gradient(x_hat, scale, decode, log_reward_fn, noise, dtype):
    """Torch's own low-precision composition: noisy latents, decoder and post-processing all in ``dtype``."""
    with torch.enable_grad():
        y = (x_hat.unsqueeze(0) + noise * math.sqrt(NOISE_VAR)).flatten(0, 1).to(dtype).requires_grad_(True)
        log_r = log_reward_fn((decode(y) / 2 + 0.5).clamp(0, 1)).float()
        (g,) = torch.autograd.grad(log_r.sum(), y)
    return scale.view(-1, 1, 1, 1) * g.float().view(noise.shape).mean(0)


@pytest.mark.parametrize("latent_dtype", [pytest.param(torch.float32, id="fp32-latents"), *LOW])
@pytest.mark.parametrize("decoder_dtype", LOW)
def test_pixel_gradient_low_precision_decoder(backend, decoder_dtype, latent_dtype):
    """bf16/fp16 VAE: error vs an fp64 reference, averaged over 4 independent cases, <= 2x that of torch's own
    low-precision composition. One case alone is a coin flip: the fused bf16 path rounds the noisy latents once
    (fp32 sum, one cast) where torch rounds twice, and per case the ratio measured 0.4 to 2.1."""
    log_r = reward()
    errors, naive_errors = [], []
    for seed in range(4):
        case = latent_case(batch=3, seed=seed)
        x_hat = case["x_hat"].to(latent_dtype)
        v, _ = fl.forward_looking_pixel_gradient(x_hat, case["scale"], raw_decoder(decoder_dtype), log_r, NOISE_VAR,
                                                 3, noise=case["noise"], chunk_size=4, decoder_dtype=decoder_dtype,
                                                 postprocess=True)
        exact, _ = fl.forward_looking_pixel_gradient_reference(x_hat.double(), case["scale"],
                                                                raw_decoder(torch.float64), log_r, case["noise"],
                                                                NOISE_VAR, postprocess=True)
        naive = naive_low_precision_pixel_gradient(x_hat.float(), case["scale"], raw_decoder(decoder_dtype), log_r,
                                                   case["noise"], decoder_dtype)
        errors.append(rel_err(v, exact))
        naive_errors.append(rel_err(naive, exact))
    err, naive_err = sum(errors) / 4, sum(naive_errors) / 4
    assert err <= 2 * naive_err + 1e-6, f"fused mean relative error {err:.3g} > 2 x torch's {naive_err:.3g}"


def test_chunking_does_not_change_result(backend):
    case = latent_case(batch=4)
    args = (case["x_hat"], case["scale"], raw_decoder(), reward("brightness"), NOISE_VAR, 3)
    whole, whole_lr = fl.forward_looking_pixel_gradient(*args, noise=case["noise"], postprocess=True)
    for chunk in (1, 2, 5, 7, 12, 100):
        v, lr = fl.forward_looking_pixel_gradient(*args, noise=case["noise"], chunk_size=chunk, postprocess=True)
        torch.testing.assert_close(v, whole, rtol=1e-5, atol=1e-6 * float(whole.abs().max()))
        torch.testing.assert_close(lr, whole_lr, rtol=1e-6, atol=1e-6)
    if backend == "reference":  # the Triton backend's in-kernel noise: tests/test_op_forward_looking_kernels.py
        seeded = [fl.forward_looking_pixel_gradient(*args, seed=11, chunk_size=c, postprocess=True)[0]
                  for c in (None, 5)]
        torch.testing.assert_close(seeded[1], seeded[0], rtol=1e-5, atol=1e-6 * float(seeded[0].abs().max()))
        assert rel_err(seeded[0], whole) > 1e-3  # a different draw of the noise


def test_per_sample_reward_with_chunks(backend):
    """A reward conditioned per sample (a target brightness per ``b``): with chunks that cut the ``[K, B]``
    blocks, ``reward_sample_index=True`` hands the reward each row's sample."""
    case = latent_case(batch=3)
    targets = torch.tensor([0.2, 0.5, 0.8])
    by_index = lambda im, b: -(im.float().mean((1, 2, 3)) - targets[b]).square() * 50
    noise_major = lambda im: by_index(im, torch.arange(im.shape[0]) % 3)  # the whole K * B batch at once
    want, want_lr = fl.forward_looking_pixel_gradient_reference(case["x_hat"], case["scale"], raw_decoder(),
                                                                noise_major, case["noise"], NOISE_VAR, postprocess=True)
    got, got_lr = fl.forward_looking_pixel_gradient(case["x_hat"], case["scale"], raw_decoder(), by_index, NOISE_VAR, 3,
                                                    noise=case["noise"], chunk_size=4, postprocess=True,
                                                    reward_sample_index=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    torch.testing.assert_close(got_lr, want_lr, rtol=1e-6, atol=1e-6)


def test_pixel_gradient_finite_difference(backend):
    """Directional derivatives of ``F(x_hat) = sum_b scale_b mean_k log R(post(decode(x_hat_b + sqrt(c) e_kb)))``
    by central differences in float64 against the fused fp32 gradient."""
    case = latent_case(batch=2, hw=(4, 4))
    noise, scale = case["noise"].double(), case["scale"].double()
    decode64 = raw_decoder(torch.float64)
    log_r = lambda im: -(im - 0.3).square().mean((1, 2, 3))  # in the image's dtype (the Reward wrapper casts to fp32)
    v, _ = fl.forward_looking_pixel_gradient(case["x_hat"], case["scale"], raw_decoder(), log_r, NOISE_VAR, 3,
                                             noise=case["noise"], chunk_size=4, postprocess=True)

    def objective(x: torch.Tensor) -> float:
        values = fl.smoothed_log_reward_reference(x, decode64, log_r, noise, NOISE_VAR, postprocess=True)
        return float((scale * values).sum())

    x0, h = case["x_hat"].double(), 1e-4
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        d = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        d /= d.norm()
        fd = (objective(x0 + h * d) - objective(x0 - h * d)) / (2 * h)
        assert float((v.double() * d).sum()) == pytest.approx(fd, rel=2e-3, abs=1e-4 * float(v.abs().max()))


# ---------------------------------------------------------------- the fused FL gradient vs the reference


def fl_case(batch: int = 4, hw: tuple[int, int] = (8, 6)) -> dict:
    gen = torch.Generator().manual_seed(4)
    steps = torch.tensor([3, 40, 49, 20][:batch])
    return {
        "x": torch.randn(batch, 4, *hw, generator=gen),
        "alpha_bar": MDP.alpha_bar[steps].float().view(-1, 1, 1, 1),
        "terminal": torch.tensor([False, False, True, False][:batch]),
        "eps_fn": TinyEpsNet((4, *hw)),
        "beta": 7.0,
    }


@pytest.mark.parametrize("gamma", ["alpha_bar", "sqrt_alpha_bar"])
@pytest.mark.parametrize("jacobian", ["full", "tweedie", "identity"])
def test_fused_matches_reference_forward_looking_gradient(backend, jacobian, gamma):
    """Same generator seed -> same noise; mixed timesteps and a terminal state; K = 3, c = 2e-3."""
    case = fl_case()
    log_r = reward()
    common = dict(beta=case["beta"], gamma=gamma, jacobian=jacobian, noise_var=NOISE_VAR, num_noise=3)
    args = (case["x"], case["alpha_bar"], case["terminal"], case["eps_fn"], log_r)
    want = forward_looking_gradient(*args, decode=postprocessed_decoder(), **common,
                                    generator=torch.Generator().manual_seed(9))
    got, log_rewards = fl.forward_looking_gradient_fused(
        *args, decode=raw_decoder(), **common, generator=torch.Generator().manual_seed(9), postprocess=True,
        chunk_size=5, return_log_reward=True,
    )
    assert got.shape == want.shape and got.dtype == want.dtype and not got.requires_grad
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert log_rewards.shape == (4,) and bool(torch.isfinite(log_rewards).all())


@pytest.mark.parametrize(
    "terminal, noise_var, num_noise",
    [
        pytest.param((True, True), NOISE_VAR, 3, id="all-terminal"),
        pytest.param((False, True), 0.0, 1, id="no-smoothing"),
        pytest.param((False, False), NOISE_VAR, 1, id="K1"),
    ],
)
def test_fused_matches_reference_edge_cases(backend, terminal, noise_var, num_noise):
    case = fl_case(batch=2)
    args = (case["x"], case["alpha_bar"], torch.tensor(terminal), case["eps_fn"], reward("brightness"), 3.0)
    common = dict(noise_var=noise_var, num_noise=num_noise)
    gen_state = torch.Generator().manual_seed(3)
    want = forward_looking_gradient(*args, decode=postprocessed_decoder(), **common, generator=gen_state)
    gen_fused = torch.Generator().manual_seed(3)
    got = fl.forward_looking_gradient_fused(*args, decode=raw_decoder(), postprocess=True, **common,
                                            generator=gen_fused)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert torch.equal(gen_fused.get_state(), gen_state.get_state())  # the same random numbers were consumed


def test_fused_noise_argument_is_the_generator_draw(backend):
    """``noise=`` takes the reference's draws (``[K, B, ...]``, scaled by ``sqrt(c)`` inside)."""
    case = fl_case(batch=2)
    args = (case["x"], case["alpha_bar"], case["terminal"][:2], case["eps_fn"], reward(), 3.0)
    common = dict(decode=postprocessed_decoder(), noise_var=NOISE_VAR, num_noise=3, jacobian="tweedie")
    want = forward_looking_gradient(*args, **common, generator=torch.Generator().manual_seed(8))
    draws = torch.randn((3, *case["x"].shape), generator=torch.Generator().manual_seed(8))
    got = fl.forward_looking_gradient_fused(*args, **common, noise=draws, chunk_size=2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_fused_without_decoder_matches_reference():
    """The analytic-task form: no decoder, no post-processing, a reward on the latents themselves."""
    case = fl_case(batch=3, hw=(3, 2))
    log_r = lambda x: -0.5 * (x.float() - 0.3).square().flatten(1).sum(1)
    args = (case["x"], case["alpha_bar"], case["terminal"][:3], case["eps_fn"], log_r, 2.0)
    common = dict(noise_var=0.1, num_noise=3)
    want = forward_looking_gradient(*args, **common, generator=torch.Generator().manual_seed(1))
    got = fl.forward_looking_gradient_fused(*args, **common, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("jacobian", ["full", "tweedie", "identity"])
def test_fused_network_cotangent_is_the_vjp_of_the_same_forward(jacobian):
    """``network_cotangent=w`` (the pathwise sweep's VJP): the FL gradient and log R unchanged, plus ``J_eps(x)^T w``
    equal to a plain autograd VJP of the network, from one network forward."""
    case = fl_case(batch=3, hw=(5, 3))
    net, calls = case["eps_fn"], []
    args = (case["x"], case["alpha_bar"], torch.zeros(3, dtype=torch.bool),
            lambda y: calls.append(y.shape[0]) or net(y), reward(), 3.0)
    common = dict(decode=raw_decoder(), postprocess=True, jacobian=jacobian, noise_var=NOISE_VAR, num_noise=2,
                  return_log_reward=True)
    want, want_log_r = fl.forward_looking_gradient_fused(*args, **common, generator=torch.Generator().manual_seed(2))
    w = torch.randn(case["x"].shape, generator=torch.Generator().manual_seed(3))
    calls.clear()
    got, got_log_r, vjp = fl.forward_looking_gradient_fused(*args, **common, network_cotangent=w,
                                                            generator=torch.Generator().manual_seed(2))
    assert calls == [3]  # one network forward for both VJPs
    assert torch.equal(got, want) and torch.equal(got_log_r, want_log_r)
    x_in = case["x"].clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(net(x_in), x_in, w)
    assert vjp.shape == ref.shape and not vjp.requires_grad
    torch.testing.assert_close(vjp, ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))
    assert float(ref.abs().max()) > 1e-3
    without_log_r = fl.forward_looking_gradient_fused(*args, **{**common, "return_log_reward": False},
                                                      network_cotangent=w, generator=torch.Generator().manual_seed(2))
    assert len(without_log_r) == 2 and torch.equal(without_log_r[1], vjp)


# ---------------------------------------------------------------- registration, compile, PTX


def _op_args() -> dict:
    gen = torch.Generator().manual_seed(6)
    x_hat = torch.randn(3, 2, 4, 5, generator=gen)
    return {
        "x_hat": x_hat, "noise": torch.randn(6, 2, 4, 5, generator=gen), "scale": torch.rand(3, generator=gen) + 1,
        "raw": 1.5 * torch.randn(4, 3, 4, 5, generator=gen), "grads": torch.randn(6, 2, 4, 5, generator=gen),
    }


def test_custom_ops_opcheck():
    a = _op_args()
    ops = torch.ops.fastnabla
    torch.library.opcheck(ops.fl_noisy_copies.default, (a["x_hat"], a["noise"], 0.05, 2, 1, 5, 0, torch.bfloat16))
    torch.library.opcheck(ops.fl_noisy_copies.default, (a["x_hat"], None, 0.05, 2, 0, 6, 3, torch.float32))
    torch.library.opcheck(ops.image_postprocess.default, (a["raw"].requires_grad_(),))
    torch.library.opcheck(ops.image_postprocess_backward.default, (torch.randn(4, 3, 4, 5), a["raw"].detach()))
    torch.library.opcheck(ops.fl_accumulate.default, (torch.zeros(3, 2, 4, 5), a["grads"][:4], a["scale"], 2, 0,
                                                       "reference"))  # a path chosen by the caller
    torch.library.opcheck(ops.fl_accumulate.default, (torch.zeros(3, 2, 4, 5), a["grads"][:4], a["scale"], 2, 0))


def test_gradcheck_float64_references():
    raw = torch.tensor([-2.5, -1.3, -0.7, 0.0, 0.4, 0.99, 1.6], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(image_postprocess_reference, (raw,))
    upstream = torch.randn(7, dtype=torch.float64)
    (want,) = torch.autograd.grad(image_postprocess_reference(raw), raw, upstream)
    torch.testing.assert_close(image_postprocess_backward_reference(upstream, raw.detach()), want)
    raw32 = raw.detach().float().requires_grad_(True)  # the custom op (fp32 out) with its closed-form backward
    (got,) = torch.autograd.grad(torch.ops.fastnabla.image_postprocess(raw32), raw32, upstream.float())
    torch.testing.assert_close(got, want.float())
    case = latent_case(batch=2, hw=(2, 2))
    x = case["x_hat"].double().requires_grad_(True)
    log_r = lambda im: im.square().mean((1, 2, 3))
    fn = lambda z: fl.smoothed_log_reward_reference(z, raw_decoder(torch.float64), log_r, case["noise"].double(),
                                                    NOISE_VAR, postprocess=True)
    assert torch.autograd.gradcheck(fn, (x,))


@pytest.mark.parametrize("with_interpreter", [False, True], ids=["reference-impl", "triton-interpret"])
def test_compile_fullgraph_through_ops(monkeypatch, with_interpreter):
    """Fake (+ autograd) registrations: noisy copies, post-processing forward and backward, and the in-place
    accumulation trace with ``fullgraph=True`` (``autograd.grad`` itself stays outside, as in the op's loop)."""
    if with_interpreter:
        if not HAS_TRITON:
            pytest.skip("triton is not installed")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    a = _op_args()

    def pre_and_post(x_hat, noise, raw):
        y = torch.ops.fastnabla.fl_noisy_copies(x_hat, noise, 0.05, 2, 1, 6, 0, torch.float32)
        image = torch.ops.fastnabla.image_postprocess(raw)
        return y, (image.square() * torch.linspace(0, 1, image.shape[-1])).sum()

    def accumulate(acc, grads, scale):
        torch.ops.fastnabla.fl_accumulate(acc, grads, scale, 2, 0)
        return acc * 1.0

    raw = a["raw"].requires_grad_(True)
    compiled = torch.compile(pre_and_post, fullgraph=True, backend="aot_eager")
    (y, loss), (y_want, loss_want) = compiled(a["x_hat"], a["noise"], raw), pre_and_post(a["x_hat"], a["noise"], raw)
    torch.testing.assert_close(y, y_want)
    torch.testing.assert_close(loss, loss_want)
    torch.testing.assert_close(torch.autograd.grad(loss, raw)[0], torch.autograd.grad(loss_want, raw)[0])
    compiled_acc = torch.compile(accumulate, fullgraph=True, backend="aot_eager")
    got = compiled_acc(torch.empty(3, 2, 4, 5), a["grads"], a["scale"])
    torch.testing.assert_close(got, accumulate(torch.empty(3, 2, 4, 5), a["grads"], a["scale"]))


@pytest.mark.slow
def test_compile_fullgraph_inductor():
    """Inductor (C++ on CPU) around the custom ops: pre kernel + post-processing forward and backward."""
    a = _op_args()

    def pre_and_post(x_hat, noise, raw):
        y = torch.ops.fastnabla.fl_noisy_copies(x_hat, noise, 0.05, 2, 0, 6, 0, torch.float32)
        image = torch.ops.fastnabla.image_postprocess(raw * 1.5)
        return y * 2, (image.square() * y[:4, :1, :, :1].mean()).sum()

    raw = a["raw"].requires_grad_(True)
    got = torch.compile(pre_and_post, fullgraph=True)(a["x_hat"], a["noise"], raw)
    want = pre_and_post(a["x_hat"], a["noise"], raw)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(got[1], raw)[0], torch.autograd.grad(want[1], raw)[0])


# ---------------------------------------------------------------- dispatch and input checks


def test_cpu_default_runs_reference_pieces(monkeypatch):
    from fastnabla.kernels import forward_looking as flk
    from fastnabla.kernels import image_postprocess as ipk

    def boom(*args, **kwargs):
        raise AssertionError("a Triton kernel was launched on the reference backend")

    for module, name in [(flk, "noisy_copies"), (flk, "accumulate"), (ipk, "image_postprocess_forward")]:
        monkeypatch.setattr(module, name, boom)
    case = latent_case(batch=2)
    fl.forward_looking_pixel_gradient(case["x_hat"], case["scale"], raw_decoder(), reward(), seed=1, postprocess=True)
    monkeypatch.setenv("FASTNABLA_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fl.forward_looking_pixel_gradient(case["x_hat"], case["scale"], raw_decoder(), reward(), seed=1)


def _bad(**changes):
    def mutate(kw):
        kw = dict(kw)
        for k, v in changes.items():
            kw[k] = v(kw) if callable(v) and k not in ("decode", "log_reward_fn") else v
        return kw

    return mutate


BAD_PIXEL_INPUTS = [
    ("int-x_hat", _bad(x_hat=lambda k: k["x_hat"].long()), TypeError, "x_hat has dtype torch.int64"),
    ("fp64-x_hat", _bad(x_hat=lambda k: k["x_hat"].double()), TypeError, "x_hat has dtype torch.float64"),
    ("flat-x_hat", _bad(x_hat=lambda k: k["x_hat"][0, 0, 0]), ValueError, "x_hat must be"),
    ("scale-len", _bad(scale=lambda k: torch.ones(4)), ValueError, r"scale must have shape \[3\]"),
    ("scale-int", _bad(scale=lambda k: torch.ones(3, dtype=torch.long)), TypeError, "scale must be a floating"),
    ("scale-device", _bad(scale=lambda k: k["scale"].to("meta")), ValueError, "scale is on meta"),
    ("noise-shape", _bad(noise=lambda k: torch.randn(2, 3, 4, 8, 6)), ValueError, "noise must have shape"),
    ("noise-and-seed", _bad(noise=lambda k: torch.randn(3, 3, 4, 8, 6), seed=3), ValueError, "either noise or seed"),
    ("seed-negative", _bad(seed=-1), ValueError, "seed must be a non-negative integer"),
    ("chunk-zero", _bad(chunk_size=0), ValueError, "chunk_size must be an integer >= 1"),
    ("num-noise-zero", _bad(num_noise=0), ValueError, "num_noise must be an integer >= 1"),
    ("noise-var-negative", _bad(noise_var=-1e-3), ValueError, "noise_var must be a finite number >= 0"),
    ("noise-var-nan", _bad(noise_var=float("nan")), ValueError, "noise_var must be a finite number >= 0"),
    ("decoder-dtype", _bad(decoder_dtype=torch.int32), TypeError, "decoder_dtype torch.int32 is not supported"),
    ("decode-rows", _bad(decode=lambda z: z[:1]), ValueError, "decode returned shape"),
    ("reward-shape", _bad(log_reward_fn=lambda im: im.mean((2, 3))), ValueError, r"log_reward_fn returned shape"),
    ("decode-not-float", _bad(decode=lambda z: z.long(), postprocess=True), TypeError, "decoder output must be a"),
]


@pytest.mark.parametrize("mutate, exc, match", [pytest.param(*b[1:], id=b[0]) for b in BAD_PIXEL_INPUTS])
def test_pixel_gradient_bad_inputs(mutate, exc, match):
    case = latent_case(batch=3)
    kw = {"x_hat": case["x_hat"], "scale": case["scale"], "decode": None, "num_noise": 3,
          "log_reward_fn": lambda im: im.float().mean((1, 2, 3))}
    with pytest.raises(exc, match=match):
        fl.forward_looking_pixel_gradient(**mutate(kw))


BAD_FL_INPUTS = [
    ("jacobian", {"jacobian": "exact"}, ValueError, "FL jacobian 'exact' is not one of"),
    ("gamma", {"gamma": "linear"}, ValueError, "gamma schedule 'linear' is not one of"),
    ("alpha-bar-shape", {"alpha_bar": torch.ones(2)}, ValueError, r"alpha_bar must have shape \(2, 1, 1, 1\)"),
    ("terminal-dtype", {"terminal": torch.zeros(2)}, ValueError, r"terminal must be a bool tensor of shape \[2\]"),
    ("x-int", {"x": torch.zeros(2, 4, 8, 6, dtype=torch.long)}, TypeError, "x must be a floating"),
    ("cotangent-shape", {"network_cotangent": torch.zeros(2, 4, 8, 5)}, ValueError,
     r"network_cotangent must have x's shape \(2, 4, 8, 6\)"),
    ("cotangent-terminal-row", {"network_cotangent": torch.zeros(2, 4, 8, 6), "terminal": torch.tensor([True, False])},
     ValueError, "every row non-terminal, got shape .* with 1 terminal rows"),
]


@pytest.mark.parametrize("change, exc, match", [pytest.param(*b[1:], id=b[0]) for b in BAD_FL_INPUTS])
def test_fused_bad_inputs(change, exc, match):
    case = fl_case(batch=2)
    kw = {"x": case["x"], "alpha_bar": case["alpha_bar"], "terminal": case["terminal"][:2], "eps_fn": case["eps_fn"],
          "log_reward_fn": reward(), "beta": 1.0, "decode": raw_decoder(), "postprocess": True, **change}
    with pytest.raises(exc, match=match):
        fl.forward_looking_gradient_fused(**kw)
