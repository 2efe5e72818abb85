"""Forward-looking (FL) reward gradient: peak memory of the fused chunked op, and its three kernels.

**Memory** (``op = forward_looking``, mode ``fwd+bwd``: K = 3 noisy decodes + their VJP, c = 2e-3):
providers on one case (decoder, ``B``, latent size), each checked against the per-draw loop's result:

* ``eager``      -- the one-graph reference (``forward_looking_pixel_gradient_reference``): all ``K * B``
  decoder graphs alive at once;
* ``loop``       -- a straightforward per-draw loop: ``for k in range(K)``: ``autograd.grad`` of
  ``log R(post(decode(x_hat + sqrt(c) e_k)))`` w.r.t. the latents (``B`` rows per graph);
* ``fused``      -- ``forward_looking_pixel_gradient`` with ``chunk_size`` = all ``K * B`` rows;
* ``fused-chunk-B`` / ``fused-chunk-half`` / ``fused-chunk-1`` -- chunks of ``B`` / ``B // 2`` / 1 rows;
* ``fused-ckpt-chunk-B`` / ``fused-ckpt-chunk-half`` -- the same with the VAE decoder's gradient
  checkpointing on (``vae.enable_gradient_checkpointing()``: mid and up blocks recomputed in backward).

Decoders: a small-but-real diffusers AutoencoderKL (``tiny-vae``: 3 blocks of 32/64/64 channels) and the
SD1.5 VAE architecture (``sd15-vae``: block_out_channels (128, 256, 512, 512), 2 layers per block,
random weights), at small latents on CPU and at SD latents (64x64) on CUDA. Peak memory: CUDA
``max_memory_allocated``, CPU allocator events of ``torch.profiler`` (``memory_utils``, self-checked).
``extra_info``: ``peak_bytes`` (CUDA) or ``cpu_peak_bytes``, ``peak_ratio_to_loop`` (this provider's peak
over the loop's, same run), ``max_rel_err_vs_loop``, ``chunk_size``, ``checkpointing``, ``num_noise``.

**Kernels** (providers ``eager`` / ``compiled`` (the reference under ``torch.compile``) / ``triton``
(CUDA only), ``bytes_min`` and ``ratio_to_copy`` as in ``bench/README.md``): ``fl_noisy_copies`` (fwd;
``triton-philox`` generates the noise in the kernel), ``fl_accumulate`` (fwd: one chunk of ``K * B``
rows into ``[B, ...]``) at latents ``[B, 4, 64, 64]``, ``B`` in {8, 32}; ``image_postprocess`` (fwd,
bwd, fwd+bwd) on the ``K * B`` decoded images ``[K * B, 3, 512, 512]``.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from bench_utils import MIN_ROUNDS, WARMUP_ROUNDS, cases, copy_median, peak_bytes, rounds_for, saved_bytes, timed_call
from memory_utils import check_cpu_peak_memory, peak_memory

from fastnabla.compat import prepare_third_party_imports
from fastnabla.ops import dispatch
from fastnabla.ops import forward_looking as fl
from fastnabla.ops.image_postprocess import image_postprocess, image_postprocess_reference

torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)

K = 3
NOISE_VAR = 2e-3
ON_CUDA = torch.cuda.is_available()

# decoder -> (VAE config, latent size, batch): small latents on CPU (a call takes seconds there), SD latents on CUDA
DECODERS = {
    "tiny-vae": (dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8), 64 if ON_CUDA else 32,
                 8 if ON_CUDA else 4),
    "sd15-vae": (dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
                 64 if ON_CUDA else 8, 4 if ON_CUDA else 2),
}
MEMORY_PROVIDERS = ["eager", "loop", "fused", "fused-chunk-B", "fused-chunk-half", "fused-chunk-1",
                    "fused-ckpt-chunk-B", "fused-ckpt-chunk-half"]
MEMORY_DTYPES = {"fp32": torch.float32, **({"bf16": torch.bfloat16} if ON_CUDA else {})}


@functools.cache
def vae(decoder: str, dtype: torch.dtype, device_str: str):
    prepare_third_party_imports()
    from diffusers import AutoencoderKL

    config, _, _ = DECODERS[decoder]
    n = len(config["block_out_channels"])
    torch.manual_seed(0)
    model = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                          latent_channels=4, **config)
    return model.eval().requires_grad_(False).to(device=device_str, dtype=dtype)


@functools.cache
def log_reward():
    from fastnabla.rewards.registry import build_reward

    model = build_reward("color-target")
    return lambda images: model.log_reward(images, [""] * images.shape[0])


@functools.cache
def memory_case(decoder: str, dtype_name: str, device_str: str) -> dict:
    _, hw, batch = DECODERS[decoder]
    device = torch.device(device_str)
    gen = torch.Generator(device=device).manual_seed(0)
    return {
        "x_hat": torch.randn(batch, 4, hw, hw, generator=gen, device=device),
        "scale": torch.rand(batch, generator=gen, device=device) * 1e3 + 1e2,  # beta gamma_t at beta ~ 1e3
        "noise": torch.randn(K, batch, 4, hw, hw, generator=gen, device=device),
        "dtype": MEMORY_DTYPES[dtype_name],
    }


def per_draw_loop(x_hat, scale, decode, log_reward_fn, noise, dtype) -> torch.Tensor:
    """The straightforward way: one decode-VJP per noise draw (``B`` rows each), summed."""
    total = torch.zeros(x_hat.shape, dtype=torch.float32, device=x_hat.device)
    for k in range(noise.shape[0]):
        with torch.enable_grad():
            y = (x_hat + noise[k] * math.sqrt(NOISE_VAR)).to(dtype).requires_grad_(True)
            log_r = log_reward_fn(image_postprocess_reference(decode(y))).float()
            (g,) = torch.autograd.grad(log_r.sum(), y)
        total += g.float()
    return scale.view(-1, 1, 1, 1) / noise.shape[0] * total


def memory_provider(provider: str, decoder: str, case: dict, device: torch.device):
    model = vae(decoder, case["dtype"], str(device))
    decode = lambda z: model.decode(z / model.config.scaling_factor).sample
    batch, dtype = case["x_hat"].shape[0], case["dtype"]
    args = (case["x_hat"], case["scale"], decode, log_reward())
    if provider == "loop":
        return lambda: per_draw_loop(*args, case["noise"], dtype), None
    if provider == "eager":
        return lambda: fl.forward_looking_pixel_gradient_reference(*args, case["noise"], NOISE_VAR, postprocess=True,
                                                                   decoder_dtype=dtype)[0], None
    chunk = {"fused": None, "B": batch, "half": max(1, batch // 2), "1": 1}[provider.rsplit("-", 1)[-1]]
    ckpt = "-ckpt-" in provider

    def fused():
        if ckpt:
            model.enable_gradient_checkpointing()
        try:
            return fl.forward_looking_pixel_gradient(*args, NOISE_VAR, K, noise=case["noise"], chunk_size=chunk,
                                                     decoder_dtype=dtype, postprocess=True)[0]
        finally:
            if ckpt:
                model.disable_gradient_checkpointing()

    return fused, chunk


@functools.cache
def loop_reference(decoder: str, dtype_name: str, device_str: str) -> tuple[torch.Tensor, int]:
    """The loop's result and peak (measured once per case, shared by every provider's ratio)."""
    device = torch.device(device_str)
    case = memory_case(decoder, dtype_name, device_str)
    fn, _ = memory_provider("loop", decoder, case, device)
    out = {}
    peak = peak_memory(lambda: out.setdefault("v", fn()), device).peak_bytes
    return out["v"], peak


@pytest.mark.parametrize("dtype_name", list(MEMORY_DTYPES))
@pytest.mark.parametrize("decoder", cases(DECODERS))
@pytest.mark.parametrize("provider", MEMORY_PROVIDERS)
def test_forward_looking_memory(benchmark, device, provider, decoder, dtype_name):
    if device.type == "cpu":
        check_cpu_peak_memory()
    case = memory_case(decoder, dtype_name, str(device))
    if provider == "fused-chunk-1" and case["x_hat"].shape[0] // 2 <= 1:
        pytest.skip("chunks of 1 row are fused-chunk-half at this batch size")
    fn, chunk = memory_provider(provider, decoder, case, device)
    want, loop_peak = loop_reference(decoder, dtype_name, str(device))
    out = {}
    measured = peak_memory(lambda: out.setdefault("v", fn()), device)  # also the warm-up call
    err = float((out["v"] - want).abs().max() / want.abs().max())
    assert err < (1e-4 if dtype_name == "fp32" else 5e-2), f"{provider}: result differs from the loop by {err:.3g}"

    call = timed_call(fn, device)
    rounds = 1 if device.type == "cpu" else max(MIN_ROUNDS, rounds_for(call))  # seconds per call on CPU
    batch, _, hw, _ = case["x_hat"].shape
    benchmark.group = f"forward_looking memory {decoder} {dtype_name}"
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=0 if device.type == "cpu" else WARMUP_ROUNDS)
    peak_key = "peak_bytes" if device.type == "cuda" else "cpu_peak_bytes"
    benchmark.extra_info.update({
        "op": "forward_looking", "provider": provider, "mode": "fwd+bwd", "shape": [batch, 4, hw, hw],
        "shape_name": f"{decoder}-{batch}x4x{hw}x{hw}-K{K}", "dtype": dtype_name, "device": str(device),
        "decoder": decoder, "num_noise": K, "chunk_size": chunk, "checkpointing": "-ckpt-" in provider,
        peak_key: measured.peak_bytes, "peak_method": measured.method, "loop_peak_bytes": loop_peak,
        "peak_ratio_to_loop": measured.peak_bytes / loop_peak, "max_rel_err_vs_loop": err,
    })


# ---------------------------------------------------------------- the kernels

LATENT_SHAPES = {"small-2x4x16x16": (2, 4, 16, 16), "sd-8x4x64x64": (8, 4, 64, 64), "sd-32x4x64x64": (32, 4, 64, 64)}
IMAGE_SHAPES = {"small-6x3x128x128": (6, 3, 128, 128), "sd-8-24x3x512x512": (24, 3, 512, 512)}
if ON_CUDA:
    IMAGE_SHAPES["sd-32-96x3x512x512"] = (96, 3, 512, 512)
KERNEL_DTYPES = {"fp32": torch.float32, **({"bf16": torch.bfloat16} if ON_CUDA else {})}


@functools.cache
def compiled(fn):
    return torch.compile(fn, dynamic=False)


def _kernel_provider(provider: str, device: torch.device, monkeypatch) -> None:
    if provider.startswith("triton"):
        if device.type != "cuda":
            pytest.skip("triton provider needs a CUDA device (the CPU Triton interpreter is a test tool)")
        if not dispatch.triton_available():
            pytest.skip("triton provider needs `triton` installed")
        monkeypatch.setenv("FASTNABLA_BACKEND", "triton")


def _record(benchmark, device, call, op, provider, mode, shape_name, shape, dtype_name, nbytes, **extra) -> None:
    for _ in range(WARMUP_ROUNDS + 1):  # the first call compiles the `compiled` provider
        call()
    benchmark.group = f"{op} {shape_name} {dtype_name} {mode}"
    benchmark.pedantic(call, rounds=max(MIN_ROUNDS, rounds_for(call)), warmup_rounds=WARMUP_ROUNDS)
    info = benchmark.extra_info
    info.update(op=op, provider=provider, mode=mode, shape=list(shape), shape_name=shape_name, dtype=dtype_name,
                device=str(device), bytes_min=nbytes, peak_bytes=peak_bytes(call, device), **extra)
    if benchmark.stats is not None:  # None under --benchmark-disable
        copy_s = copy_median(nbytes, device)
        info.update(copy_median_s=copy_s, ratio_to_copy=benchmark.stats.stats.median / copy_s)


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@pytest.mark.parametrize("dtype_name", list(KERNEL_DTYPES))
@pytest.mark.parametrize("shape_name", cases(LATENT_SHAPES))
@pytest.mark.parametrize("provider", ["eager", "compiled", "triton", "triton-philox"])
def test_fl_noisy_copies(benchmark, device, monkeypatch, provider, shape_name, dtype_name):
    """x_hat [B, ...] fp32 + sqrt(c) noise [K*B, ...] fp32 -> decoder input [K*B, ...] in the decoder dtype."""
    _kernel_provider(provider, device, monkeypatch)
    shape, dtype = LATENT_SHAPES[shape_name], KERNEL_DTYPES[dtype_name]
    gen = torch.Generator(device=device).manual_seed(0)
    x_hat = torch.randn(shape, generator=gen, device=device)
    noise = torch.randn((K * shape[0], *shape[1:]), generator=gen, device=device)
    rows, std = K * shape[0], math.sqrt(NOISE_VAR)
    if provider == "eager":
        call = lambda: fl.noisy_copies_reference(x_hat, noise, std, K, 0, rows, 0, dtype)
    elif provider == "compiled":
        call = lambda: compiled(fl.noisy_copies_reference)(x_hat, noise, std, K, 0, rows, 0, dtype)
    else:
        given = None if provider == "triton-philox" else noise
        call = lambda: torch.ops.fastnabla.fl_noisy_copies(x_hat, given, std, K, 0, rows, 5, dtype)
    numel = math.prod(shape)
    noise_bytes = 0 if provider == "triton-philox" else K * numel * 4
    nbytes = numel * 4 + noise_bytes + K * numel * _elem(dtype)
    _record(benchmark, device, timed_call(call, device), "fl_noisy_copies", provider, "fwd", shape_name, shape,
            dtype_name, nbytes, num_noise=K)


@pytest.mark.parametrize("dtype_name", list(KERNEL_DTYPES))
@pytest.mark.parametrize("shape_name", cases(LATENT_SHAPES))
@pytest.mark.parametrize("provider", ["eager", "compiled", "triton"])
def test_fl_accumulate(benchmark, device, monkeypatch, provider, shape_name, dtype_name):
    """K*B decoder-input gradients (decoder dtype) -> v = scale / K * sum_k, fp32 [B, ...] (one chunk)."""
    _kernel_provider(provider, device, monkeypatch)
    shape, dtype = LATENT_SHAPES[shape_name], KERNEL_DTYPES[dtype_name]
    gen = torch.Generator(device=device).manual_seed(0)
    grads = torch.randn((K * shape[0], *shape[1:]), generator=gen, device=device).to(dtype)
    scale = torch.rand(shape[0], generator=gen, device=device)
    acc = torch.empty(shape, device=device)
    fn = {"eager": fl.accumulate_reference, "compiled": compiled(fl.accumulate_reference),
          "triton": torch.ops.fastnabla.fl_accumulate}[provider]
    call = lambda: fn(acc, grads, scale, K, 0)
    numel = math.prod(shape)
    nbytes = K * numel * _elem(dtype) + numel * 4 + shape[0] * 4
    _record(benchmark, device, timed_call(call, device), "fl_accumulate", provider, "fwd", shape_name, shape,
            dtype_name, nbytes, num_noise=K)


@pytest.mark.parametrize("dtype_name", list(KERNEL_DTYPES))
@pytest.mark.parametrize("shape_name", list(IMAGE_SHAPES))
@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["eager", "compiled", "triton"])
def test_image_postprocess(benchmark, device, monkeypatch, provider, mode, shape_name, dtype_name):
    """Decoder output (decoder dtype) -> clamp(d / 2 + 1/2, 0, 1) in fp32; backward 1/2 * grad * in-range."""
    _kernel_provider(provider, device, monkeypatch)
    shape, dtype = IMAGE_SHAPES[shape_name], KERNEL_DTYPES[dtype_name]
    gen = torch.Generator(device=device).manual_seed(0)
    grad_mode = mode != "fwd"
    raw = (1.2 * torch.randn(shape, generator=gen, device=device)).to(dtype).requires_grad_(grad_mode)
    upstream = torch.randn(shape, generator=gen, device=device)
    fn = {"eager": image_postprocess_reference, "compiled": compiled(image_postprocess_reference),
          "triton": image_postprocess}[provider]

    def forward():
        with torch.set_grad_enabled(grad_mode):
            return fn(raw)

    if mode == "fwd":
        target = forward
    elif mode == "bwd":
        out = forward()
        target = lambda: torch.autograd.grad(out, raw, upstream, retain_graph=True)
    else:
        target = lambda: torch.autograd.grad(forward(), raw, upstream)
    numel, elem = math.prod(shape), _elem(dtype)
    nbytes = (numel * (elem + 4)) * (mode != "bwd") + (numel * (4 + 2 * elem)) * (mode != "fwd")
    _record(benchmark, device, timed_call(target, device), "image_postprocess", provider, mode, shape_name, shape,
            dtype_name, nbytes, saved_bytes=saved_bytes(forward) if grad_mode else 0)


def test_cpu_peak_memory_measure_is_exact():
    """The CPU measure used above, on allocations of known sizes (runs without --benchmark-only)."""
    check_cpu_peak_memory()
