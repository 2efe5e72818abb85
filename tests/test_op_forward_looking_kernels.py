"""Triton kernels of the forward-looking reward gradient (``fastnabla.kernels.forward_looking``,
``fastnabla.kernels.image_postprocess``) against their pure-torch references in
``fastnabla.ops.forward_looking`` and ``fastnabla.ops.image_postprocess``, under ``TRITON_INTERPRET=1`` (set
per test with monkeypatch, as in ``tests/test_op_denoise_step.py``), plus imports without triton. The op built on
them is tested in ``tests/test_op_forward_looking.py``.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from fastnabla.ops import dispatch
from fastnabla.ops import forward_looking as fl
from fastnabla.ops.image_postprocess import (
    image_postprocess,
    image_postprocess_backward_reference,
    image_postprocess_reference,
)

HAS_TRITON = dispatch.triton_available()
LOW = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
DTYPES = [pytest.param(torch.float32, id="fp32"), *LOW]
NOISE_VAR = 2e-3


pytestmark = pytest.mark.usefixtures("clean_backend_env")


def assert_faithfully_rounded(got: torch.Tensor, want_fp32: torch.Tensor) -> None:
    """``got`` (any float dtype) is one of the two ``got.dtype`` values bracketing the fp32 result.

    Exact for fp32/fp16. For bf16 it also admits truncation: Triton's CPU interpreter truncates
    fp32 -> bf16 casts (measured: ~half the elements 1 ulp below round-to-nearest-even), while the GPU
    compiler rounds to nearest even.
    """
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want_fp32, rtol=0, atol=0)
        return
    _, exponent = torch.frexp(want_fp32)
    info = torch.finfo(got.dtype)
    ulp = torch.ldexp(torch.full_like(want_fp32, info.eps), exponent - 1).clamp(min=info.smallest_normal * info.eps)
    err = (got.float() - want_fp32).abs()
    assert bool((err < ulp).all()), f"not a faithful rounding: max error {float((err / ulp).max()):.2f} ulp"




# ---------------------------------------------------------------- kernels vs references (interpreter)

ROW_RANGES = [pytest.param(None, id="all-rows"), pytest.param((1, 5), id="rows1-5"), pytest.param(-2, id="last2")]


@pytest.mark.parametrize("rows", ROW_RANGES)
@pytest.mark.parametrize("num_noise", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_noisy_copies_kernel_matches_reference(interpret, dtype, num_noise, rows):
    from fastnabla.kernels.forward_looking import noisy_copies

    gen = torch.Generator().manual_seed(2)
    x_hat = torch.randn(3, 4, 5, 7, generator=gen).to(dtype)
    noise = torch.randn(num_noise * 3, 4, 5, 7, generator=gen)
    total = num_noise * 3
    start, stop = (0, total) if rows is None else ((total + rows, total) if isinstance(rows, int) else rows)
    stop = min(stop, total)
    std = math.sqrt(NOISE_VAR)
    got = noisy_copies(x_hat, noise, std, start, stop, 0, dtype)
    want = fl.noisy_copies_reference(x_hat, noise, std, num_noise, start, stop, 0, torch.float32)
    assert got.dtype == dtype and got.shape == (stop - start, 4, 5, 7)
    assert_faithfully_rounded(got, want)  # same fp32 maths and rounding, then one cast to the decoder dtype


PHILOX_SCRIPT = r"""
import math
import torch
from fastnabla.kernels.forward_looking import noisy_copies
from fastnabla.ops import dispatch, forward_looking as fl

assert dispatch.select_backend("cpu") == "triton"
zeros = torch.zeros(3, 4, 17, 33)
draws = noisy_copies(zeros, None, 1.0, 0, 9, 7, torch.float32)  # x_hat = 0, std = 1: the noise itself
assert abs(float(draws.mean())) < 0.03 and abs(float(draws.std()) - 1) < 0.03, "N(0, 1) moments"
assert abs(float((draws.flatten(1) * draws.roll(1, 0).flatten(1)).mean())) < 0.03, "rows uncorrelated"
assert torch.equal(noisy_copies(zeros, None, 1.0, 0, 9, 7, torch.float32), draws), "reproducible"
assert torch.equal(noisy_copies(zeros, None, 1.0, 4, 7, 7, torch.float32), draws[4:7]), "chunk-independent"
assert not torch.equal(noisy_copies(zeros, None, 1.0, 0, 9, 8, torch.float32), draws), "seed matters"
x_hat = torch.randn(3, 4, 17, 33)
std = math.sqrt(2e-3)
assert torch.equal(noisy_copies(x_hat, None, std, 2, 8, 7, torch.float32),
                   noisy_copies(x_hat, draws, std, 2, 8, 0, torch.float32)), "same as the draws passed in"

# the op: seeded noise is the kernel's stream, whatever the chunking
x_hat, scale = torch.randn(3, 4, 6, 5), torch.rand(3) + 0.5
conv = torch.nn.Conv2d(4, 3, 3, padding=1).requires_grad_(False)
decode = lambda z: 1.5 * torch.tanh(conv(z))
log_r = lambda im: -(im - 0.3).square().mean((1, 2, 3))
args = (x_hat, scale, decode, log_r, 2e-3, 3)
seeded = [fl.forward_looking_pixel_gradient(*args, seed=11, chunk_size=c, postprocess=True)[0] for c in (None, 4)]
draws = noisy_copies(torch.zeros_like(x_hat), None, 1.0, 0, 9, 11, torch.float32).view(3, *x_hat.shape)
given = fl.forward_looking_pixel_gradient(*args, noise=draws, postprocess=True)[0]
scale_v = float(given.abs().max())
torch.testing.assert_close(seeded[0], given, rtol=1e-5, atol=1e-6 * scale_v)
torch.testing.assert_close(seeded[1], given, rtol=1e-5, atol=1e-6 * scale_v)
print("philox ok")
"""


def test_noisy_copies_kernel_philox():
    """In-kernel noise: N(0, 1) moments, reproducible per seed, independent of chunking, equal to the same
    draws passed in as a tensor, and the op's ``seed=`` path. In a subprocess started with
    ``TRITON_INTERPRET=1``: triton builds ``tl.randn`` in the interpreter's mode only if the variable is set
    before triton is first imported, which in this process depends on test order."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "FASTNABLA_BACKEND"}
    env.update(TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", PHILOX_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "philox ok" in done.stdout, done.stderr[-3000:]


def test_in_kernel_noise_needs_interpreter_mode_randn(interpret, monkeypatch):
    from fastnabla.kernels import forward_looking as flk

    monkeypatch.setattr(flk, "_interpretable", lambda fn: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 set before triton is first imported"):
        flk.noisy_copies(torch.zeros(2, 3), None, 1.0, 0, 2, 0, torch.float32)
    out = flk.noisy_copies(torch.ones(2, 3), None, 0.0, 0, 4, 0, torch.bfloat16)  # std = 0: nothing is drawn
    assert out.dtype == torch.bfloat16 and torch.equal(out.float(), torch.ones(4, 3))


def _raw_images(dtype: torch.dtype, channels_last: bool = False) -> torch.Tensor:
    """Decoder-like output in ``[-1.6, 1.6]`` with the clamp boundaries -1 and 1 hit exactly."""
    raw = torch.linspace(-1.6, 1.6, 2 * 3 * 7 * 9).reshape(2, 3, 7, 9)
    raw.view(-1)[::17] = -1.0
    raw.view(-1)[5::17] = 1.0
    raw = raw.to(dtype)
    return raw.contiguous(memory_format=torch.channels_last) if channels_last else raw


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_image_postprocess_kernel_matches_reference(interpret, dtype, channels_last):
    raw = _raw_images(dtype, channels_last).requires_grad_(True)
    upstream = torch.randn(raw.shape)
    image = image_postprocess(raw)
    assert image.grad_fn.name() == "ImagePostprocessFunctionBackward"  # the op's eager twin, over the kernels
    assert image.dtype == torch.float32
    assert image.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    (grad,) = torch.autograd.grad(image, raw, upstream)
    assert grad.dtype == dtype
    want = image_postprocess_reference(raw)
    (want_grad,) = torch.autograd.grad(want, raw, upstream)
    # both compute in fp32 from the same inputs (the gradient is then cast to raw's dtype); the reference's
    # autograd checks the closed-form backward
    torch.testing.assert_close(image, want, rtol=0, atol=0)
    assert_faithfully_rounded(grad, image_postprocess_backward_reference(upstream, raw.detach().float()))
    torch.testing.assert_close(image_postprocess_backward_reference(upstream, raw.detach()), want_grad.to(dtype))
    inside = ((raw.detach().double() / 2 + 0.5) >= 0) & ((raw.detach().double() / 2 + 0.5) <= 1)
    assert bool((grad[inside] != 0).any()) and bool((grad[~inside] == 0).all())
    assert bool(inside[raw.detach() == 1].all()) and bool(inside[raw.detach() == -1].all())  # inclusive bounds
    if dtype != torch.float32:  # vs torch's own low-precision post-processing (diffusers computes in the VAE dtype)
        exact = image_postprocess_reference(raw.detach().double())
        torch_lp = (raw.detach() / 2 + 0.5).clamp(0, 1).float()
        bound = 2 * float((torch_lp.double() - exact).abs().max()) + torch.finfo(dtype).eps
        assert float((image.detach().double() - exact).abs().max()) <= bound


ACCUMULATE_CASES = [
    pytest.param(1, 3, None, id="K1-B3-one-chunk"),
    pytest.param(3, 3, None, id="K3-B3-one-chunk"),
    pytest.param(3, 3, 3, id="K3-B3-chunk3-divides"),
    pytest.param(3, 5, 4, id="K3-B5-chunk4"),
    pytest.param(3, 5, 7, id="K3-B5-chunk7"),
    pytest.param(3, 4, 1, id="K3-B4-chunk1"),
    pytest.param(2, 2, 3, id="K2-B2-chunk3"),
]


@pytest.mark.parametrize("grad_dtype", [pytest.param(torch.float32, id="fp32"), LOW[0]])
@pytest.mark.parametrize("num_noise, batch, chunk", ACCUMULATE_CASES)
def test_accumulate_kernel_matches_reference(interpret, num_noise, batch, chunk, grad_dtype):
    from fastnabla.kernels.forward_looking import accumulate

    gen = torch.Generator().manual_seed(3)
    rows = num_noise * batch
    grads = torch.randn(rows, 2, 5, 3, generator=gen).to(grad_dtype)
    scale = torch.rand(batch, generator=gen) + 0.5
    chunk = chunk or rows
    acc_kernel = torch.full((batch, 2, 5, 3), float("nan"))  # uninitialised memory must never leak through
    acc_ref = acc_kernel.clone()
    for start in range(0, rows, chunk):
        accumulate(acc_kernel, grads[start:start + chunk], scale, num_noise, start)
        fl.accumulate_reference(acc_ref, grads[start:start + chunk], scale, num_noise, start)
    closed_form = scale.view(-1, 1, 1, 1) / num_noise * grads.float().view(num_noise, batch, 2, 5, 3).sum(0)
    torch.testing.assert_close(acc_kernel, acc_ref, rtol=0, atol=0)
    torch.testing.assert_close(acc_kernel, closed_form, rtol=1e-6, atol=1e-6)


def test_accumulate_kernel_rejects_bad_accumulator(interpret):
    from fastnabla.kernels.forward_looking import accumulate

    grads, scale = torch.randn(6, 2, 3), torch.ones(2)
    with pytest.raises(ValueError, match="acc must be a dense fp32 tensor"):
        accumulate(torch.empty(3, 2, 2).transpose(0, 1)[:, :3], grads, scale, 3, 0)
    with pytest.raises(ValueError, match="acc must be a dense fp32 tensor"):
        accumulate(torch.empty(2, 2, 3, dtype=torch.bfloat16), grads, scale, 3, 0)


@pytest.mark.parametrize("module", ["forward_looking", "image_postprocess"])
def test_kernel_modules_import_without_triton(kernels_without_triton, module):
    mod = kernels_without_triton(module)
    assert mod.HAS_TRITON is False
    with pytest.raises(RuntimeError, match="needs `triton`"):
        if module == "forward_looking":
            mod.noisy_copies(torch.zeros(2, 3), torch.zeros(4, 3), 0.1, 0, 4, 0, torch.float32)
        else:
            mod.image_postprocess_forward(torch.zeros(2, 3))
