"""The Gaussian denoising policy ``P_F(x_{t+1} | x_t) = N(mu(x_t), sigma_t^2 I)`` and its scores.

With ``mu = a_t x_t + b_t eps(x_t)`` (see :mod:`fastnabla.mdp.schedule`) and ``r = x_{t+1} - mu``:

* forward score  ``grad_{x_{t+1}} log P_F = -r / sigma^2``                       (analytic)
* reverse score  ``grad_{x_t}     log P_F = (a r + b J_eps(x_t)^T r) / sigma^2``   (one VJP)

Residual scores (paper eqs. 11 and 13) subtract ``eta_p`` times the pretrained model's score at the
same transition. All coefficient arguments are broadcastable to ``x`` (``[B, 1, ..., 1]`` when a
batch mixes steps). Functions take tensors, not networks, except :func:`reverse_score`, which
owns the one VJP.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Tensor = torch.Tensor


def _flat_sum(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).sum(dim=1)


def cfg_combine(eps_uncond: Tensor, eps_cond: Tensor, guidance_scale: float) -> Tensor:
    """Classifier-free guidance: ``eps_u + w (eps_c - eps_u)`` (``w = 1`` returns ``eps_c``)."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def tweedie_x0(x: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    """One-step prediction ``x_hat = (x - sqrt(1 - abar) eps) / sqrt(abar)`` (paper eq. 2)."""
    return (x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


def step_mean(x: Tensor, eps: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Mean of the denoising step, ``mu = a x + b eps``."""
    return a * x + b * eps


def denoise_step(x: Tensor, eps: Tensor, a: Tensor, b: Tensor, sigma: Tensor, noise: Tensor) -> Tensor:
    """One sampler step ``x_{t+1} = a x + b eps + sigma z``."""
    return a * x + b * eps + sigma * noise


def _check_sigma(sigma: Tensor) -> None:
    if bool((sigma <= 0).any()):
        raise ValueError(
            "the transition has sigma_t = 0 (a deterministic step): its Gaussian log-density and "
            "scores are undefined; use a stochastic sampler step (eta > 0, abar_{t+1} < 1)"
        )


def transition_log_prob(x_next: Tensor, mean: Tensor, sigma: Tensor) -> Tensor:
    """``log N(x_{t+1}; mu, sigma^2 I)`` summed over all non-batch dims, shape ``[B]``."""
    _check_sigma(sigma)
    d = x_next[0].numel()
    sig = sigma.expand_as(x_next)
    quad = _flat_sum(((x_next - mean) / sig) ** 2)
    return -0.5 * quad - _flat_sum(sig.log()) - 0.5 * d * math.log(2 * math.pi)


def forward_score(x_next: Tensor, mean: Tensor, sigma: Tensor) -> Tensor:
    """``grad_{x_{t+1}} log P_F(x_{t+1} | x_t) = -(x_{t+1} - mu) / sigma^2``."""
    _check_sigma(sigma)
    return -(x_next - mean) / sigma**2


def residual_forward_score(
    x_next: Tensor, mean: Tensor, mean_pretrained: Tensor, sigma: Tensor, prior_strength: float = 1.0
) -> Tensor:
    """Residual forward score ``s~-> = grad_{x_{t+1}} [log P_F - eta_p log P_F#]`` (paper eq. 11).

    With ``eta_p = 1`` this is ``(mu - mu#) / sigma^2 = b (eps - eps#) / sigma^2``, independent of
    ``x_{t+1}``.
    """
    return forward_score(x_next, mean, sigma) - prior_strength * forward_score(x_next, mean_pretrained, sigma)


def reverse_score(
    eps_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    x_next: Tensor,
    a: Tensor,
    b: Tensor,
    sigma: Tensor,
    create_graph: bool = False,
) -> tuple[Tensor, Tensor]:
    """``grad_{x_t} log P_F(x_{t+1} | x_t) = (a r + b J_eps(x_t)^T r) / sigma^2`` with one VJP.

    Args:
        eps_fn: ``x_t -> eps_hat(x_t)`` (the network, CFG-combined where guidance is on).
        create_graph: keep the graph of the VJP (second-order terms w.r.t. the network's
            parameters); by default the score is a constant.

    Returns:
        ``(score, eps)`` where ``eps = eps_fn(x)`` is returned so callers need not recompute it.
    """
    _check_sigma(sigma)
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        eps = eps_fn(x_in)
        mean = step_mean(x_in, eps, a, b)
        r = x_next - mean
        cot = r if create_graph else r.detach()
        (vjp,) = torch.autograd.grad(eps, x_in, grad_outputs=b * cot / sigma**2, create_graph=create_graph)
    score = a * cot / sigma**2 + vjp
    if not create_graph:
        score, eps = score.detach(), eps.detach()
    return score, eps


def residual_reverse_score(
    score: Tensor, score_pretrained: Tensor, prior_strength: float = 1.0
) -> Tensor:
    """Residual reverse score ``s~<- = grad_{x_t} log P_F - eta_p grad_{x_t} log P_F#`` (eq. 13)."""
    return score - prior_strength * score_pretrained
