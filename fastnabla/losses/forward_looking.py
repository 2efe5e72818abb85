"""Forward-looking (FL) reward gradient ``beta gamma_t grad_{x_t} log R(decode(x_hat(x_t)))`` (eq. 15).

The paper smooths the reward (section 4.3): ``E_{e ~ N(0, c)} grad log R(decode(x_hat + e))`` with
``c = 2e-3`` and 3 samples, computed here as one batched decode-VJP over the samples, in fp32.

How the gradient treats the Jacobian of ``x_hat(x) = (x - sqrt(1 - abar) eps(x)) / sqrt(abar)``
(any choice is a valid FL baseline, the flow network absorbs the difference; DESIGN.md section 1):

* ``"full"``     backpropagate through ``eps(x)`` (the authors' release; one network VJP);
* ``"tweedie"``  treat ``eps`` as a constant: ``grad_x = grad_{x_hat} / sqrt(abar)`` (no network VJP);
* ``"identity"`` use ``grad_{x_hat} log R`` itself (no VJP, no scaling).

Terminal states (``x_hat(x_T) = x_T``, ``gamma_T = 1``) take ``beta grad log R(decode(x_T))``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastnabla.mdp.gaussian_policy import tweedie_x0
from fastnabla.utils.profiling import nvtx_range

Tensor = torch.Tensor
FL_JACOBIANS = ("full", "tweedie", "identity")
GAMMA_SCHEDULES = ("alpha_bar", "sqrt_alpha_bar", "one")


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
