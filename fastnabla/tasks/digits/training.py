"""Training the digits pipeline's VAE and UNet (deterministic, CPU, minutes).

* :func:`train_vae`: a small ``AutoencoderKL`` on the images with ``L1 + L2`` reconstruction and a small KL weight
  (Stable Diffusion's VAE adds perceptual and GAN terms; on 16x16 grey digits plain pixel losses suffice).
* :func:`latent_scaling_factor`: ``1 / std`` of the posterior latents, so the UNet sees unit-variance latents
  (Stable Diffusion's ``scaling_factor = 0.18215`` plays the same role).
* :func:`train_unet`: a ``UNet2DConditionModel`` on the VAE latents with the epsilon-prediction DDPM loss under the
  Stable Diffusion 1.5 noise schedule, prompt embeddings from the frozen text encoder, prompt dropout to ``""`` for
  classifier-free guidance, and an exponential moving average of the weights (what is saved).

Every random draw comes from CPU generators seeded by the caller, so a build is a function of its settings.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from fastnabla.tasks.digits.data import PROMPT_KIND_WEIGHTS, draw_training_prompts, shift_augment

Tensor = torch.Tensor
Progress = Callable[[int], None] | None


def train_vae(vae: Any, images: Tensor, steps: int, seed: int, batch_size: int = 64, lr: float = 2e-3,
              kl_weight: float = 1e-3, progress: Progress = None) -> Any:
    """Train ``vae`` (an ``AutoencoderKL``) in place on ``images`` (``[N, 3, R, R]`` in ``[-1, 1]``, +-1 pixel
    shifts as augmentation); returns it in eval mode, frozen. ``kl_weight`` multiplies the mean KL per latent
    element against the mean per-pixel ``|e| + e^2``."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(steps, 1), pct_start=0.05)
    vae.train()
    for _ in range(steps):
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        x = shift_augment(images[idx], 1, gen)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        err = vae.decode(z).sample - x
        kl = 0.5 * (post.mean**2 + post.var - 1 - post.logvar).mean()
        loss = err.abs().mean() + err.pow(2).mean() + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress(1)
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_posterior(vae: Any, images: Tensor, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """``(mean, std)`` ``[N, 4, h, w]`` of the VAE posterior of ``images`` (unscaled latents)."""
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        post = vae.encode(images[i : i + batch_size]).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def latent_scaling_factor(mean: Tensor, std: Tensor) -> float:
    """``1 / sqrt(Var[z])`` of posterior samples ``z = mean + std * n`` over all elements (unit-std latents)."""
    return float(1.0 / torch.sqrt(mean.double().var() + std.double().pow(2).mean()))


@torch.no_grad()
def reconstruction_mse(vae: Any, images: Tensor, batch_size: int = 256) -> float:
    """Mean squared error (images in ``[-1, 1]``) of decoding the posterior mean."""
    total = 0.0
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size]
        total += float((vae.decode(vae.encode(x).latent_dist.mean).sample - x).pow(2).sum())
    return total / images.numel()


def train_unet(
    unet: Any,
    latent_mean: Tensor,
    latent_std: Tensor,
    labels: Tensor,
    prompt_embeds: dict[str, Tensor],
    alphas_cumprod: Tensor,
    steps: int,
    seed: int,
    scaling_factor: float,
    batch_size: int = 128,
    lr: float = 1e-3,
    ema_decay: float = 0.999,
    p_uncond: float = 0.1,
    kind_weights: tuple[float, ...] = PROMPT_KIND_WEIGHTS,
    progress: Progress = None,
) -> Any:
    """Train ``unet`` on scaled posterior samples with ``||eps_theta(x_tau, tau, e) - eps||^2``, ``tau`` uniform in
    ``0..999``, ``x_tau = sqrt(abar) z + sqrt(1 - abar) eps``; returns the EMA copy (eval mode, frozen).

    Args:
        prompt_embeds: ``{prompt: [77, D]}`` for every training prompt and ``""``.
        alphas_cumprod: ``[1000]`` of the noise schedule.
    """
    gen = torch.Generator().manual_seed(seed)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    names = list(prompt_embeds)
    table = torch.stack([prompt_embeds[p] for p in names])
    row = {p: i for i, p in enumerate(names)}
    abar = alphas_cumprod.float()
    opt = torch.optim.AdamW(unet.parameters(), lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(steps, 1), pct_start=0.05)
    unet.train()
    for i in range(steps):
        idx = torch.randint(0, len(latent_mean), (batch_size,), generator=gen)
        z0 = (latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=gen)) * scaling_factor
        prompts = draw_training_prompts(labels[idx], p_uncond, gen, kind_weights)
        tau = torch.randint(0, len(abar), (batch_size,), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        a = abar[tau].view(-1, 1, 1, 1)
        x = a.sqrt() * z0 + (1 - a).sqrt() * eps
        embeds = table[torch.tensor([row[p] for p in prompts])]
        loss = (unet(x, tau, encoder_hidden_states=embeds).sample - eps).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(ema_decay, (1 + i) / (10 + i))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), unet.parameters(), strict=True):
                p_ema.lerp_(p, 1 - decay)
        if progress is not None:
            progress(1)
    return ema
