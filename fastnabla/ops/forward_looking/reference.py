"""Pure-torch reference of the forward-looking (FL) reward gradient (paper eq. 15, smoothed as in section 4.3).

:func:`forward_looking_gradient` computes ``beta gamma_t grad_{x_t} log R(decode(x_hat(x_t)))``, with
``gamma_t`` from :func:`gamma_schedule` (the paper's ``abar_t`` by default, section 3.2). The paper smooths
the reward (section 4.3): ``E_{e ~ N(0, c)} grad log R(decode(x_hat + e))`` with
``c = 2e-3`` and 3 samples, computed here as one batched decode-VJP over the samples, in fp32.

How the gradient treats the Jacobian of ``x_hat(x) = (x - sqrt(1 - abar) eps(x)) / sqrt(abar)``
(any choice is a valid FL baseline, the flow network absorbs the difference; docs/maths.md):

* ``"full"``     backpropagate through ``eps(x)`` (the authors' release; one network VJP);
* ``"tweedie"``  treat ``eps`` as a constant: ``grad_x = grad_{x_hat} / sqrt(abar)`` (no network VJP);
* ``"identity"`` use ``grad_{x_hat} log R`` itself (no VJP, no scaling).

Terminal states (``x_hat(x_T) = x_T``, ``gamma_T = 1``) take ``beta grad log R(decode(x_T))``.

**The fused op's pieces.** :mod:`fastnabla.ops.forward_looking.op` splits the gradient at ``x_hat``::

    v_b      = scale_b / K  sum_k  grad_{x_hat_b} log R(post(decode(x_hat_b + sqrt(c) e_kb)))      [B, C, h, w]
    scale_b  = beta gamma_t   (beta at terminal states; also / sqrt(abar_t) for the "tweedie" Jacobian)
    FL(x_t)  = J_{x_hat}(x_t)^T v   ("full": one network VJP)  |  v  ("tweedie", "identity")

and runs the ``K * B`` noisy copies (row ``k * B + b``) through chunked decode-VJPs. The pure-torch
references of its pieces live here: :func:`noisy_copies_reference` (rows of ``x_hat_b + sqrt(c) e_r``),
:func:`accumulate_reference` (the per-chunk sum over draws with the final ``scale_b / K``),
:func:`smoothed_log_reward_reference` and :func:`forward_looking_pixel_gradient_reference` (the unchunked
one-graph reference of ``v``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from fastnabla.mdp.gaussian_policy import tweedie_x0
from fastnabla.ops.image_postprocess.reference import image_postprocess_reference
from fastnabla.utils.profiling import nvtx_range

Tensor = torch.Tensor
FL_JACOBIANS = ("full", "tweedie", "identity")
GAMMA_SCHEDULES = ("alpha_bar", "sqrt_alpha_bar", "one")

__all__ = [
    "FL_JACOBIANS",
    "GAMMA_SCHEDULES",
    "accumulate_reference",
    "forward_looking_gradient",
    "forward_looking_pixel_gradient_reference",
    "gamma_schedule",
    "noisy_copies_reference",
    "seeded_normal",
    "smoothed_log_reward_reference",
]


def gamma_schedule(alpha_bar: Tensor, kind: str) -> Tensor:
    """FL strength ``gamma_t``: ``abar_t`` (paper default), ``sqrt(abar_t)`` or ``1``."""
    if kind == "alpha_bar":
        return alpha_bar
    if kind == "sqrt_alpha_bar":
        return alpha_bar.sqrt()
    if kind == "one":
        return torch.ones_like(alpha_bar)
    raise ValueError(f"gamma schedule {kind!r} is not one of {GAMMA_SCHEDULES}")


def forward_looking_gradient(
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
) -> Tensor:
    """``beta gamma_t E_e grad_x log R(decode(x_hat(x) + e))``, a constant tensor like ``x``.

    Args:
        x: states ``[B, ...]``.
        alpha_bar: ``abar`` of each state, shape ``[B, 1, ...]`` (as from ``DenoisingMDP.gather``).
        terminal: bool ``[B]``: ``x_hat = x`` and ``gamma = 1`` there (``eps_fn`` is not needed).
        eps_fn: ``x -> eps(x)`` at the states' timesteps.
        log_reward_fn: ``decoded -> log R`` per sample ``[B]`` (evaluated in fp32).
        noise_var: ``c``, variance of the smoothing noise added to ``x_hat`` (0: no smoothing).
        num_noise: number of noise samples ``K`` (batched into one decode-VJP).
        generator: draws the smoothing noise (ignored when ``noise`` is given).
        noise: standard normal draws ``[K, B, ...]`` to use instead (scaled by ``sqrt(c)`` here).
    """
    if jacobian not in FL_JACOBIANS:
        raise ValueError(f"FL jacobian {jacobian!r} is not one of {FL_JACOBIANS}")
    if num_noise < 1:
        raise ValueError(f"num_noise must be >= 1, got {num_noise}")
    decode = decode or (lambda y: y)
    bshape = (x.shape[0],) + (1,) * (x.ndim - 1)
    if alpha_bar.shape != bshape or terminal.shape != (x.shape[0],):
        raise ValueError(
            f"alpha_bar must have shape {bshape} and terminal [{x.shape[0]}], "
            f"got {tuple(alpha_bar.shape)} and {tuple(terminal.shape)}"
        )
    t_mask = terminal.reshape(bshape)
    ab = torch.where(t_mask, torch.ones_like(alpha_bar), alpha_bar)
    with torch.enable_grad():
        x_in = x.detach().float().requires_grad_(True)
        if bool(terminal.all()):
            x_hat = x_in
        elif jacobian == "full":
            x_hat = torch.where(t_mask, x_in, tweedie_x0(x_in, eps_fn(x_in).float(), ab.float()))
        else:
            with torch.no_grad():
                eps = eps_fn(x_in.detach()).float()
            x_hat = torch.where(t_mask, x_in, tweedie_x0(x_in, eps, ab.float()))
            if jacobian == "identity":
                x_hat = torch.where(t_mask, x_hat, x_hat.detach() + (x_in - x_in.detach()))
            else:  # tweedie: d x_hat / d x = 1 / sqrt(abar)
                x_hat = torch.where(
                    t_mask, x_hat, x_hat.detach() + (x_in - x_in.detach()) / ab.float().sqrt()
                )
        if noise_var > 0:
            k = num_noise
            if noise is None:
                noise = torch.randn((k,) + tuple(x_hat.shape), generator=generator, dtype=x_hat.dtype)
            elif tuple(noise.shape) != (k,) + tuple(x_hat.shape):
                raise ValueError(f"noise must have shape {(k,) + tuple(x_hat.shape)}, got {tuple(noise.shape)}")
            y = (x_hat.unsqueeze(0) + noise.to(x_hat.device, x_hat.dtype) * noise_var**0.5).flatten(0, 1)
        else:
            k = 1
            y = x_hat
        with nvtx_range("decode"):
            image = decode(y)
        with nvtx_range("reward"):
            log_r = log_reward_fn(image).float()
        with nvtx_range("reward_vjp"):
            (grad,) = torch.autograd.grad(log_r.sum() / k, x_in)
    scale = beta * torch.where(t_mask, torch.ones_like(ab), gamma_schedule(ab, gamma))
    return (scale * grad).to(x.dtype).detach()


# ---------------------------------------------------------------- pieces of the fused op


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _per_sample(c: Tensor, ndim: int) -> Tensor:
    return c.reshape((-1,) + (1,) * (ndim - 1))


def seeded_normal(shape: tuple[int, ...], seed: int, device: torch.device) -> Tensor:
    """fp32 ``N(0, 1)`` draws from a ``torch.Generator(device)`` seeded with ``seed`` (reference backend)."""
    gen = torch.Generator(device=device).manual_seed(int(seed))
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32)


def noisy_copies_reference(
    x_hat: Tensor, noise: Tensor | None, std: float, num_noise: int, row_start: int, row_stop: int, seed: int,
    out_dtype: torch.dtype,
) -> Tensor:
    """Rows ``[row_start, row_stop)`` of ``y_{kB+b} = x_hat_b + std * e_{kB+b}`` in ``out_dtype``.

    ``noise`` is ``[K * B, ...]``; ``None`` draws it with :func:`seeded_normal` from ``seed``. With
    ``std == 0`` the rows are copies of ``x_hat`` (nothing drawn or read). Computes in
    ``promote(x_hat.dtype, fp32)``.
    """
    compute = _compute_dtype(x_hat.dtype)
    batch = x_hat.shape[0]
    rows = torch.arange(row_start, row_stop, device=x_hat.device)
    base = x_hat.to(compute)[rows % batch]
    if std == 0:
        return base.to(out_dtype)
    if noise is None:
        noise = seeded_normal((num_noise * batch, *x_hat.shape[1:]), seed, x_hat.device)
    return (base + noise[row_start:row_stop].to(compute) * std).to(out_dtype)


def accumulate_reference(acc: Tensor, grad_rows: Tensor, scale: Tensor, num_noise: int, row_start: int) -> None:
    """In place, the chunk step of ``v_b = scale_b / K sum_k g_{kB+b}`` (rows ``row_start ...``).

    A sample's first draw (``k = 0``) overwrites ``acc`` (which may start uninitialised); its last
    (``k = K - 1``) applies ``scale_b / K``. After all chunks in row order, ``acc = v``.
    """
    batch = acc.shape[0]
    rows = torch.arange(row_start, row_start + grad_rows.shape[0], device=acc.device)
    b, k = rows % batch, rows // batch
    acc[b[k == 0]] = 0
    acc.index_add_(0, b, grad_rows.to(acc.dtype))
    last = b[k == num_noise - 1]
    acc[last] *= _per_sample(scale.to(acc.dtype)[last] * (1.0 / num_noise), acc.dim())


def smoothed_log_reward_reference(
    x_hat: Tensor,
    decode: Callable[[Tensor], Tensor] | None,
    log_reward_fn: Callable[[Tensor], Tensor],
    noise: Tensor | None = None,
    noise_var: float = 0.0,
    postprocess: bool = False,
    decoder_dtype: torch.dtype | None = None,
) -> Tensor:
    """``(1/K) sum_k log R(post(decode(x_hat + sqrt(c) e_k)))`` per sample ``[B]``, one graph over ``K * B`` rows.

    ``noise`` is ``[K, B, ...]`` (``None``: no smoothing, ``K = 1``); differentiable w.r.t. ``x_hat``.
    """
    compute = _compute_dtype(x_hat.dtype)
    x = x_hat.to(compute)
    y = x if noise is None else (x.unsqueeze(0) + noise.to(compute) * math.sqrt(noise_var)).flatten(0, 1)
    out = (decode or (lambda z: z))(y.to(decoder_dtype or x_hat.dtype))
    image = image_postprocess_reference(out) if postprocess else out
    log_r = log_reward_fn(image).to(compute)
    return log_r.reshape(-1, x_hat.shape[0]).mean(0)


def forward_looking_pixel_gradient_reference(
    x_hat: Tensor,
    scale: Tensor,
    decode: Callable[[Tensor], Tensor] | None,
    log_reward_fn: Callable[[Tensor], Tensor],
    noise: Tensor | None = None,
    noise_var: float = 0.0,
    postprocess: bool = False,
    decoder_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """``(v, mean_k log R)``: ``v = scale_b grad_{x_hat_b} smoothed_log_reward`` in ``promote(dtype, fp32)``.

    The unchunked one-graph reference (the reference of the fused op): all ``K * B`` decoder graphs are
    alive at once. ``scale`` is ``[B]``, applied after the VJP.
    """
    compute = _compute_dtype(x_hat.dtype)
    with torch.enable_grad():
        x = x_hat.detach().to(compute).requires_grad_(True)
        log_r = smoothed_log_reward_reference(x, decode, log_reward_fn, noise, noise_var, postprocess,
                                              decoder_dtype or x_hat.dtype)
        (grad,) = torch.autograd.grad(log_r.sum(), x)
    return _per_sample(scale.to(compute), x.dim()) * grad, log_r.detach()
