"""The fused, memory-bounded forward-looking (FL) reward gradient: entry points and ``torch.library`` ops.

The FL term of the flow score (paper eq. 15, smoothed as in section 4.3; maths and the split at ``x_hat`` in
:mod:`fastnabla.ops.forward_looking.reference`) is computed by :func:`forward_looking_pixel_gradient` (the
latent/pixel side ``v``, fused and bounded in memory) and :func:`forward_looking_gradient_fused` (plus the
map to ``x_t``: the drop-in for the reference
:func:`~fastnabla.ops.forward_looking.reference.forward_looking_gradient`; or a caller folds ``J^T v`` into
a VJP it already runs, e.g. the reverse score's). ``post`` is the diffusers VAE post-processing
``clamp(d / 2 + 1/2, 0, 1)`` (:func:`fastnabla.ops.image_postprocess`) when ``postprocess=True``.

The ``K * B`` noisy copies (row ``k * B + b``) go through ONE batched decode-VJP, cut into chunks of
``chunk_size`` rows; each chunk's decoder and reward graphs are freed before the next chunk runs, so
peak memory is one chunk's graph (plus ``O(B)`` latent-sized buffers), whatever ``K`` and ``B``. Per
chunk: noisy copies (pre kernel, written straight in the decoder's dtype) -> ``decode`` ->
post-processing (kernel; fp32 out) -> ``log R`` -> one ``autograd.grad`` to the chunk's latents ->
accumulate (kernel: sum over draws, ``scale_b / K``, fp32). ``beta gamma_t`` is applied in fp32 after
the decoder VJP, so large ``beta`` cannot overflow a bf16/fp16 decoder backward.

Noise, in order of precedence: ``noise`` given (``[K, B, ...]``); ``seed`` given: generated in the
kernel with Philox on the Triton backend (``seed`` and element index only: chunking does not change
it) or drawn with a ``torch.Generator`` seeded with ``seed`` on the reference backend (each backend
is reproducible, the two streams differ); otherwise ``torch.randn((K, B, ...), generator=generator)``
in fp32 on the generator's device (``x_hat``'s without one) -- on CPU exactly the reference's draw, so
fused and reference results can be compared bit for bit.

Boundary with ``torch.library``: the kernels are custom ops with fake registrations, registered through
:class:`fastnabla.ops.dispatch.FusedOp` (``fastnabla::fl_noisy_copies``, ``fastnabla::fl_accumulate``, which
mutates its accumulator, and ``fastnabla::image_postprocess``), so code around them compiles with
``torch.compile(fullgraph=True)``. The chunk loop is plain Python: it calls user callables (``decode``,
``log_reward_fn``) and ``torch.autograd.grad``, which no custom op can contain; compile those callables
themselves if it pays. The result is a constant (the FL term is detached by design, docs/maths.md):
no backward through the op. The path (Triton kernels, or the pure-torch reference pieces) is chosen once
per call and every piece runs on it.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable

import torch

from fastnabla.mdp.gaussian_policy import tweedie_x0
from fastnabla.ops.checks import FLOAT_DTYPES
from fastnabla.ops.dispatch import FusedOp, Pass, kernel_memory_format
from fastnabla.ops.forward_looking.reference import (
    FL_JACOBIANS,
    accumulate_reference,
    gamma_schedule,
    noisy_copies_reference,
    seeded_normal,
)
from fastnabla.ops.image_postprocess.op import image_postprocess
from fastnabla.utils.profiling import nvtx_range

Tensor = torch.Tensor
REFERENCE_DTYPES = (*FLOAT_DTYPES, torch.float64)

__all__ = ["FL_ACCUMULATE", "FL_NOISY_COPIES", "forward_looking_gradient_fused", "forward_looking_pixel_gradient"]

FL_NOISY_COPIES = FusedOp(
    "fl_noisy_copies",
    kernels="forward_looking",
    # op args (x_hat, noise, std, num_noise, row_start, row_stop, seed, out_dtype); the kernel needs no K
    forward=Pass(noisy_copies_reference, "noisy_copies", triton_args=lambda a: (*a[:3], *a[4:])),
)
FL_ACCUMULATE = FusedOp(
    "fl_accumulate",
    kernels="forward_looking",
    forward=Pass(accumulate_reference, "accumulate"),  # op args (acc, grad_rows, scale, num_noise, row_start)
)


@torch.library.custom_op("fastnabla::fl_noisy_copies", mutates_args=())
def _noisy_copies_op(
    x_hat: Tensor, noise: Tensor | None, std: float, num_noise: int, row_start: int, row_stop: int, seed: int,
    out_dtype: torch.dtype, path: str = "auto",
) -> Tensor:
    return FL_NOISY_COPIES.forward(path, x_hat, noise, std, num_noise, row_start, row_stop, seed, out_dtype)


@_noisy_copies_op.register_fake
def _(x_hat, noise, std, num_noise, row_start, row_stop, seed, out_dtype, path="auto"):
    out = x_hat.new_empty((row_stop - row_start, *x_hat.shape[1:]), dtype=out_dtype)
    return out.contiguous(memory_format=kernel_memory_format(x_hat))


@torch.library.custom_op("fastnabla::fl_accumulate", mutates_args=("acc",))
def _accumulate_op(acc: Tensor, grad_rows: Tensor, scale: Tensor, num_noise: int, row_start: int,
                   path: str = "auto") -> None:
    FL_ACCUMULATE.forward(path, acc, grad_rows, scale, num_noise, row_start)


@_accumulate_op.register_fake
def _(acc, grad_rows, scale, num_noise, row_start, path="auto"):
    return None


FL_NOISY_COPIES.register(_noisy_copies_op)
FL_ACCUMULATE.register(_accumulate_op)


def _check_pixel_inputs(x_hat, scale, noise_var, num_noise, noise, seed, chunk_size, decoder_dtype, dtypes) -> Tensor:
    if not isinstance(x_hat, Tensor):
        raise TypeError(f"x_hat must be a torch.Tensor, got {type(x_hat).__name__}")
    if x_hat.dtype not in dtypes:
        raise TypeError(f"x_hat has dtype {x_hat.dtype}; supported: {dtypes}")
    if x_hat.dim() < 2 or x_hat.shape[0] == 0:
        raise ValueError(f"x_hat must be [B, ...] with B >= 1 and a sample dimension, got {tuple(x_hat.shape)}")
    batch = x_hat.shape[0]
    if not isinstance(scale, Tensor) or not scale.is_floating_point():
        got = getattr(scale, "dtype", type(scale).__name__)
        raise TypeError(f"scale must be a floating torch.Tensor of shape [{batch}], got {got}")
    if scale.numel() != batch or scale.dim() == 0 or any(s != 1 for s in scale.shape[1:]):
        raise ValueError(f"scale must have shape [{batch}] (or [{batch}, 1, ..., 1]), got {tuple(scale.shape)}")
    if scale.device != x_hat.device:
        raise ValueError(f"scale is on {scale.device} but x_hat is on {x_hat.device}")
    if isinstance(noise_var, bool) or not isinstance(noise_var, numbers.Real) or not (0 <= noise_var < math.inf):
        raise ValueError(f"noise_var must be a finite number >= 0, got {noise_var!r}")
    if isinstance(num_noise, bool) or not isinstance(num_noise, numbers.Integral) or num_noise < 1:
        raise ValueError(f"num_noise must be an integer >= 1, got {num_noise!r}")
    if chunk_size is not None and (not isinstance(chunk_size, numbers.Integral) or chunk_size < 1):
        raise ValueError(f"chunk_size must be an integer >= 1 (rows of the K*B batch) or None, got {chunk_size!r}")
    if decoder_dtype is not None and decoder_dtype not in dtypes:
        raise TypeError(f"decoder_dtype {decoder_dtype} is not supported; use one of {dtypes}")
    if noise is not None:
        if seed is not None:
            raise ValueError("give either noise or seed, not both")
        want = (num_noise, *x_hat.shape)
        if not isinstance(noise, Tensor) or not noise.is_floating_point():
            raise TypeError(f"noise must be a floating torch.Tensor of shape {want}, got {type(noise).__name__}")
        if tuple(noise.shape) != want:
            raise ValueError(f"noise must have shape [num_noise, *x_hat.shape] = {want}, got {tuple(noise.shape)}")
        if noise.device != x_hat.device:
            raise ValueError(f"noise is on {noise.device} but x_hat is on {x_hat.device}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0):
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return scale.detach().reshape(batch).to(torch.float32).contiguous()


def forward_looking_pixel_gradient(
    x_hat: Tensor,
    scale: Tensor,
    decode: Callable[[Tensor], Tensor] | None,
    log_reward_fn: Callable[[Tensor], Tensor],
    noise_var: float = 2e-3,
    num_noise: int = 3,
    *,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    chunk_size: int | None = None,
    decoder_dtype: torch.dtype | None = None,
    postprocess: bool = False,
    reward_sample_index: bool = False,
) -> tuple[Tensor, Tensor]:
    """``v_b = scale_b / K sum_k grad_{x_hat_b} log R(post(decode(x_hat_b + sqrt(c) e_kb)))`` (eq. 15, section 4.2).

    Args:
        x_hat: one-step predictions ``[B, ...]`` (fp32/bf16/fp16), treated as constants.
        scale: ``[B]`` per-sample weights (``beta gamma_t``, ``beta`` at terminal states), used in fp32.
        decode: latents ``[rows, ...]`` in ``decoder_dtype`` -> decoder output ``[rows, ...]`` (``None``:
            identity), e.g. ``lambda z: vae.decode(z / vae.config.scaling_factor).sample``.
        log_reward_fn: images -> ``log R`` ``[rows]`` (cast to fp32), differentiable w.r.t. the images.
        noise_var: ``c``; 0 means no smoothing (then ``K = 1`` and nothing is drawn).
        num_noise: ``K``, draws per sample.
        noise: ``[K, B, ...]`` draws of ``N(0, 1)`` to use (see the module docstring for the others).
        generator: draws ``noise`` as the reference does when neither ``noise`` nor ``seed`` is given.
        seed: generate the noise from this seed (in the kernel on the Triton backend).
        chunk_size: rows of the ``K * B`` decoder batch per decode-VJP (``None``: all at once).
        decoder_dtype: dtype of the decoder input (default ``x_hat.dtype``).
        postprocess: apply ``clamp(d / 2 + 1/2, 0, 1)`` (fused, fp32 out) to the decoder output.
        reward_sample_index: call ``log_reward_fn(images, sample_index)`` with the sample ``b`` (int64
            ``[rows]``) of each row, for rewards with per-sample conditioning (prompts) when chunks do
            not hold whole ``[K, B]`` blocks. Otherwise ``log_reward_fn(images)`` sees rows ``start..stop``
            of the noise-major ``K * B`` batch (all of it when ``chunk_size`` is ``None``).

    Returns:
        ``(v, log_r)``: ``v`` fp32 like ``x_hat`` (a constant), ``log_r`` fp32 ``[B]`` = mean over draws.

    Raises:
        TypeError / ValueError: a bad argument (named in the message), or ``decode`` / ``log_reward_fn``
        returning the wrong number of rows.
    """
    scale = _check_pixel_inputs(x_hat, scale, noise_var, num_noise, noise, seed, chunk_size, decoder_dtype,
                                FLOAT_DTYPES)
    path = FL_NOISY_COPIES.select(x_hat)  # once for the call: every piece runs on it
    batch = x_hat.shape[0]
    k = int(num_noise) if noise_var > 0 else 1
    std = math.sqrt(noise_var)
    x_hat = x_hat.detach()
    if noise_var > 0 and noise is None and seed is None:
        device = generator.device if generator is not None else x_hat.device
        noise = torch.randn((k, *x_hat.shape), generator=generator, dtype=torch.float32, device=device)
    if noise is not None:
        noise = noise.detach().to(x_hat.device).flatten(0, 1)  # [K * B, ...], row k * B + b
    elif path == "reference" and noise_var > 0:  # draw the seeded stream once, not per chunk
        noise = seeded_normal((k * batch, *x_hat.shape[1:]), seed, x_hat.device)
    seed = 0 if seed is None else int(seed)
    dtype = decoder_dtype or x_hat.dtype
    decode = decode or (lambda z: z)
    rows = k * batch
    chunk = min(chunk_size or rows, rows)
    acc = torch.empty(x_hat.shape, dtype=torch.float32, device=x_hat.device)
    acc = acc.contiguous(memory_format=kernel_memory_format(x_hat))
    log_r_sum = torch.zeros(batch, dtype=torch.float32, device=x_hat.device)
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        with torch.no_grad():
            copies = (x_hat, noise, std, k, start, stop, seed, dtype)
            y = FL_NOISY_COPIES(*copies, reference=functools.partial(noisy_copies_reference, *copies), path=path)
        b_idx = torch.arange(start, stop, device=x_hat.device) % batch
        with torch.enable_grad():
            y.requires_grad_(True)
            with nvtx_range("decode"):
                out = decode(y)
            if not isinstance(out, Tensor) or out.shape[:1] != (stop - start,):
                raise ValueError(f"decode returned {_describe(out)} for {stop - start} latent rows (need one per row)")
            image = image_postprocess(out) if postprocess else out
            with nvtx_range("reward"):
                log_r = log_reward_fn(image, b_idx) if reward_sample_index else log_reward_fn(image)
            if not isinstance(log_r, Tensor) or tuple(log_r.shape) != (stop - start,):
                raise ValueError(f"log_reward_fn returned {_describe(log_r)} for {stop - start} images (need [rows])")
            with nvtx_range("reward_vjp"):
                (grad,) = torch.autograd.grad(log_r.float().sum(), y)
        del out, image  # the chunk's graph is gone; drop its outputs before the next chunk decodes
        FL_ACCUMULATE(acc, grad, scale, k, start, path=path,
                      reference=functools.partial(accumulate_reference, acc, grad, scale, k, start))
        del grad
        log_r_sum.index_add_(0, b_idx, log_r.detach().float())
    return acc, log_r_sum / k


def _describe(t: object) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__


def forward_looking_gradient_fused(
    x: Tensor,
    alpha_bar: Tensor,
    terminal: Tensor,
    eps_fn: Callable[[Tensor], Tensor],
    log_reward_fn: Callable[[Tensor], Tensor],
    beta: float,
    gamma: str = "alpha_bar",
    jacobian: str = "full",
    decode: Callable[[Tensor], Tensor] | None = None,
    noise_var: float = 0.0,
    num_noise: int = 1,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    *,
    postprocess: bool = False,
    chunk_size: int | None = None,
    decoder_dtype: torch.dtype | None = None,
    seed: int | None = None,
    reward_sample_index: bool = False,
    return_log_reward: bool = False,
    network_cotangent: Tensor | None = None,
) -> Tensor | tuple[Tensor, ...]:
    """Drop-in for :func:`~fastnabla.ops.forward_looking.reference.forward_looking_gradient` (same arguments and
    result: ``beta gamma_t E_e grad_x log R(decode(x_hat(x) + e))``, a constant like ``x``), computed as
    :func:`forward_looking_pixel_gradient` plus the map to ``x`` (one network VJP for ``"full"``).

    ``noise`` (``[K, B, ...]`` standard normal draws) and ``generator`` act as in the reference: with
    the same ``generator`` state the noise equals the reference's on CPU. Extra keyword arguments:
    ``postprocess`` (``decode`` is then the raw VAE decoder and the post-processing is fused),
    ``chunk_size``, ``decoder_dtype`` (default fp32, as the reference), ``seed``, ``reward_sample_index``
    (see :func:`forward_looking_pixel_gradient`), ``return_log_reward`` (also return the mean ``log R``
    over draws, ``[B]`` fp32), ``network_cotangent`` (``w`` like ``x``: also return ``J_eps(x)^T w``, the network's
    VJP of another cotangent from the same forward, appended to the result; every row non-terminal; the pathwise
    targets' VJP, :mod:`fastnabla.methods.nabla_gfn.pathwise`). Assumes ``eps_fn`` treats samples independently (the
    per-sample scale is applied before the network VJP, the reference applies it after).
    """
    if jacobian not in FL_JACOBIANS:
        raise ValueError(f"FL jacobian {jacobian!r} is not one of {FL_JACOBIANS}")
    if not isinstance(x, Tensor) or x.dtype not in REFERENCE_DTYPES or x.dim() < 2:
        raise TypeError(f"x must be a floating torch.Tensor [B, ...], got {_describe(x)} {getattr(x, 'dtype', '')}")
    bshape = (x.shape[0],) + (1,) * (x.ndim - 1)
    if not isinstance(alpha_bar, Tensor) or alpha_bar.shape != bshape:
        raise ValueError(f"alpha_bar must have shape {bshape}, got {_describe(alpha_bar)}")
    if not isinstance(terminal, Tensor) or terminal.dtype != torch.bool or terminal.shape != (x.shape[0],):
        raise ValueError(f"terminal must be a bool tensor of shape [{x.shape[0]}], got {_describe(terminal)}")
    if network_cotangent is not None and (network_cotangent.shape != x.shape or bool(terminal.any())):
        raise ValueError(f"network_cotangent must have x's shape {tuple(x.shape)} and every row non-terminal, got "
                         f"{_describe(network_cotangent)} with {int(terminal.sum())} terminal rows")
    t_mask = terminal.reshape(bshape)
    ab = torch.where(t_mask, torch.ones_like(alpha_bar), alpha_bar).float()
    all_terminal = bool(terminal.all())
    eps = None
    with torch.enable_grad():
        keep_graph = network_cotangent is not None or jacobian == "full"
        x_in = x.detach().float().requires_grad_(keep_graph and not all_terminal)
        if all_terminal:
            x_hat = x_in
        elif keep_graph:
            eps = eps_fn(x_in).float()
            x_hat = torch.where(t_mask, x_in, tweedie_x0(x_in, eps, ab))
        else:
            with torch.no_grad():
                x_hat = torch.where(t_mask, x_in, tweedie_x0(x_in, eps_fn(x_in).float(), ab))
    scale = beta * torch.where(t_mask, torch.ones_like(ab), gamma_schedule(ab, gamma))
    if jacobian == "tweedie":
        scale = scale / ab.sqrt()  # d x_hat / d x = 1 / sqrt(abar) (1 at terminal states)
    v, log_r = forward_looking_pixel_gradient(
        x_hat.detach(), scale.reshape(-1), decode, log_reward_fn, noise_var, num_noise,
        noise=noise.to(x.device) if isinstance(noise, Tensor) else noise,
        generator=generator, seed=seed, chunk_size=chunk_size, decoder_dtype=decoder_dtype or torch.float32,
        postprocess=postprocess, reward_sample_index=reward_sample_index,
    )
    if jacobian == "full" and not all_terminal:
        with nvtx_range("fl_network_vjp"):
            (v,) = torch.autograd.grad(x_hat, x_in, v, retain_graph=network_cotangent is not None)
    grad = v.to(x.dtype).detach()
    out = (grad, log_r) if return_log_reward else (grad,)
    if network_cotangent is not None:
        with nvtx_range("fl_extra_network_vjp"):
            (w,) = torch.autograd.grad(eps, x_in, network_cotangent.float())
        out = (*out, w.to(x.dtype).detach())
    return out if len(out) > 1 else grad
