"""Triton kernels of the forward-looking reward gradient's latent side (``fastnabla.kernels.forward_looking``).

The FL gradient (paper eq. 15, smoothed as in section 4.2) decodes ``K`` noisy copies of each
one-step prediction ``x_hat_b`` as one batch of ``K * B`` rows, row ``r = k * B + b``, processed in
chunks of rows ``[row_start, row_stop)``. Two kernels bracket each chunk's decode-VJP:

* **noisy copies** (pre-processing), per row ``r`` of the chunk::

      y_r = x_hat_b + sqrt(c) e_r          e_r ~ N(0, I), written in the decoder's dtype

  ``e`` is read from a ``[K * B, N]`` tensor, or generated in the kernel with Triton's Philox
  (``tl.randn(seed, r * N + n)``: the draw of an element depends only on ``(seed, r, n)``, so any
  chunking gives the same noise).
* **accumulate** (reduction + scaling), per sample ``b``, over the rows of ``b`` in the chunk::

      acc_b  = sum_{k: k B + b in chunk} g_{kB+b}   (+ acc_b if b's draw k = 0 was in an earlier chunk)
      v_b    = scale_b / K * acc_b                  once b's last draw (k = K - 1) is in the chunk

  where ``g_r = grad_{y_r} log R(post(decode(y_r)))`` is the chunk's decode-VJP and
  ``scale_b = beta gamma_t`` (``beta`` at terminal states; the host folds ``1 / sqrt(abar)`` in for
  the Tweedie Jacobian). ``acc`` is fp32 and may start uninitialised: a sample's first contribution
  overwrites it. Rows arrive in increasing order, so after the last chunk ``acc = v``. Each sample's
  ``K`` rows are summed by one program in ``k`` order: deterministic, no atomics.

Grids are ``(rows or B, cdiv(N, BLOCK))``: axis 0 (up to 2^31 - 1) is the row / sample, axis 1 the
block of the sample's ``N`` elements. Offsets are int64, loads masked, arithmetic fp32, FMA
contraction off (``x_hat + sqrt(c) e`` rounds like the eager reference). Tensors are ``[B, N]`` /
``[rows, N]`` in memory order (contiguous, or channels_last 4-D: batch outermost either way). Kernels are
jitted lazily, once per ``TRITON_INTERPRET`` mode (:mod:`.triton_utils`).
"""

from __future__ import annotations

import torch

from .triton_utils import (
    MAX_GRID_Y,
    cdiv,
    import_triton,
    interpreter_block,
    kernel_memory_format,
    lazy_jit,
    next_power_of_2,
    triton_interpret,
    warps_for,
)

triton, tl = import_triton()
HAS_TRITON = triton is not None


@lazy_jit
def _noisy_copies_kernel(
    x_hat_ptr, noise_ptr, out_ptr,  # [B, N], [K * B, N] (read only when NOISE == 1), [rows, N]
    n_per_sample, batch, row_start, std, seed,
    NOISE: tl.constexpr, BLOCK: tl.constexpr,  # NOISE: 0 none (a cast copy), 1 read from noise_ptr, 2 Philox
):
    row = row_start + tl.program_id(0).to(tl.int64)  # global row k * B + b
    b = row % batch
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_per_sample
    y = tl.load(x_hat_ptr + b * n_per_sample + cols, mask=mask, other=0.0).to(tl.float32)
    if NOISE == 1:
        y = y + tl.load(noise_ptr + row * n_per_sample + cols, mask=mask, other=0.0).to(tl.float32) * std
    elif NOISE == 2:
        y = y + tl.randn(seed, row * n_per_sample + cols) * std
    out_offs = tl.program_id(0).to(tl.int64) * n_per_sample + cols
    tl.store(out_ptr + out_offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@lazy_jit
def _accumulate_kernel(
    grad_ptr, acc_ptr, scale_ptr,  # chunk grads [rows, N] (any float), fp32 acc [B, N], fp32 scale [B]
    n_per_sample, batch, num_noise, row_start, row_stop, inv_k,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_per_sample
    # draws k of sample b whose row k * B + b lies in [row_start, row_stop)
    before = row_start - b
    k_lo = tl.where(before > 0, (before + batch - 1) // batch, 0)
    until = row_stop - b
    k_hi = tl.minimum(tl.where(until > 0, (until + batch - 1) // batch, 0), num_noise)
    offs = b * n_per_sample + cols
    # masks as vector compares: the loaded partial sum exists only if draw k = 0 came in an earlier chunk
    acc = tl.load(acc_ptr + offs, mask=cols < tl.where(k_lo > 0, n_per_sample, 0), other=0.0)
    for k in range(k_lo, k_hi):
        row = k * batch + b - row_start
        acc += tl.load(grad_ptr + row * n_per_sample + cols, mask=mask, other=0.0).to(tl.float32)
    weight = tl.load(scale_ptr + b) * inv_k
    acc = tl.where(k_hi == num_noise, acc * weight, acc)
    tl.store(acc_ptr + offs, acc, mask=cols < tl.where(k_lo < k_hi, n_per_sample, 0))


def _interpretable(fn) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(fn, InterpretedFunction)


def _launch_config(n: int, interpret: bool) -> tuple[int, int]:
    # memory-bound: 1-2K elements per program; SD latents (N = 16384) give 8 blocks per row
    block = interpreter_block(n) if interpret else max(128, min(next_power_of_2(n), 2048))
    if cdiv(n, block) > MAX_GRID_Y:  # the blocks of a row are grid axis 1
        block = next_power_of_2(cdiv(n, MAX_GRID_Y))
    return block, warps_for(block)


def noisy_copies(
    x_hat: torch.Tensor,
    noise: torch.Tensor | None,
    std: float,
    row_start: int,
    row_stop: int,
    seed: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Rows ``[row_start, row_stop)`` of ``x_hat.repeat(K) + std * noise`` as ``[rows, *x_hat.shape[1:]]``.

    ``noise`` is ``[K * B, ...]`` (flattened draws, row ``k * B + b``) or ``None`` to generate it with
    Philox from ``seed`` (nothing is drawn when ``std == 0``). Output in ``out_dtype`` and ``x_hat``'s layout.

    Under ``TRITON_INTERPRET=1``, in-kernel generation needs the variable set before triton is first
    imported: triton builds ``tl.randn`` in the mode of that moment, and the interpreter cannot call a
    compiled-mode ``tl.randn`` (a ``RuntimeError`` says so).
    """
    interpret = triton_interpret()
    fmt = kernel_memory_format(x_hat)
    x_hat = x_hat.contiguous(memory_format=fmt)
    mode = 0 if std == 0 else (2 if noise is None else 1)
    if mode == 2 and interpret and HAS_TRITON and not _interpretable(tl.randn):
        raise RuntimeError(
            "in-kernel noise (seed) under TRITON_INTERPRET=1 needs TRITON_INTERPRET=1 set before triton is first "
            "imported (tl.randn was built for the GPU compiler); pass the noise as a tensor instead"
        )
    noise = x_hat if mode != 1 else noise.contiguous(memory_format=fmt)  # unused pointer unless mode 1
    rows = row_stop - row_start
    out = torch.empty((rows, *x_hat.shape[1:]), dtype=out_dtype, device=x_hat.device)
    out = out.contiguous(memory_format=fmt)
    batch = x_hat.shape[0]
    n = x_hat[0].numel() if batch else 0
    if rows and n:
        block, num_warps = _launch_config(n, interpret)
        _noisy_copies_kernel[(rows, cdiv(n, block))](
            x_hat, noise, out, n, batch, row_start, float(std), int(seed),
            NOISE=mode, BLOCK=block, num_warps=num_warps, enable_fp_fusion=False,
        )
    return out


def accumulate(acc: torch.Tensor, grad_rows: torch.Tensor, scale: torch.Tensor, num_noise: int, row_start: int) -> None:
    """Add the chunk's per-row gradients ``grad_rows`` (rows ``row_start ...``) into the fp32 ``acc``
    ``[B, ...]`` in place, scaling sample ``b`` by ``scale[b] / num_noise`` when its last draw lands
    (see the module docstring). ``acc``: fp32, contiguous or channels_last."""
    fmt = kernel_memory_format(acc)
    if acc.dtype != torch.float32 or not acc.is_contiguous(memory_format=fmt):
        raise ValueError(f"acc must be a dense fp32 tensor (updated in place), got {acc.dtype} strides {acc.stride()}")
    grad_rows = grad_rows.contiguous(memory_format=fmt)
    batch = acc.shape[0]
    n = acc[0].numel() if batch else 0
    rows = grad_rows.shape[0]
    if rows and n:
        block, num_warps = _launch_config(n, triton_interpret())
        _accumulate_kernel[(batch, cdiv(n, block))](
            grad_rows, acc, scale, n, batch, num_noise, row_start, row_start + rows, 1.0 / num_noise,
            BLOCK=block, num_warps=num_warps,
        )
