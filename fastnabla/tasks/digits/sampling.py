"""Sampling the pretrained digits pipeline exactly as the trainer's reference sampler does.

The trainer's pretrained sampler (``fastnabla.tasks.sd``) is the MDP of :func:`fastnabla.mdp.schedule.build_mdp`
(DDIM with ``eta`` from the pipeline's scheduler config), one batched UNet call on the classifier-free-guidance pair
``[negative, prompt]`` per step, the fused step ``x_{t+1} = a_t x_t + b_t eps + sigma_t z_t``
(:func:`fastnabla.ops.denoise_step_fused`), then ``clamp(VAE_dec(x / scaling_factor) / 2 + 1/2, 0, 1)``. This
module runs the same maths on plain :class:`~fastnabla.tasks.sd.loading.SDComponents` (no LoRA, no flow network,
no reward), batched, for the thousands of samples the importance-weighted target needs. Batch ``b`` draws its
initial noise and step noise from a CPU generator seeded ``(seed, b)``, so a sample set depends only on
``(seed, n, batch_size)`` and the settings.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastnabla.mdp.schedule import build_mdp
from fastnabla.ops import denoise_step_fused, image_postprocess
from fastnabla.tasks.sd.loading import SDComponents

Tensor = torch.Tensor


@torch.no_grad()
def encode_prompts(parts: SDComponents, prompts: list[str]) -> Tensor:
    """Last hidden states ``[n, 77, D]`` of the text encoder (padding to 77 tokens, as the SD task does)."""
    tok = parts.tokenizer
    max_len = min(int(tok.model_max_length), int(parts.text_encoder.config.max_position_embeddings))
    ids = tok(list(prompts), padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
    device = next(parts.text_encoder.parameters()).device
    return parts.text_encoder(ids.input_ids.to(device))[0]


@torch.no_grad()
def decode_latents(parts: SDComponents, latents: Tensor) -> Tensor:
    """Images ``[B, 3, H, W]`` in ``[0, 1]`` (fp32) from latents, as ``SDTask.decode`` computes them."""
    z = latents.to(parts.vae.dtype) / parts.vae.config.scaling_factor
    return image_postprocess(parts.vae.decode(z, return_dict=False)[0]).float()


@torch.no_grad()
def sample_pretrained(
    parts: SDComponents,
    prompt: str,
    n: int,
    guidance_scale: float = 5.0,
    num_steps: int = 50,
    eta: float = 1.0,
    seed: int = 0,
    batch_size: int = 500,
    negative_prompt: str = "",
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    """``n`` images ``[n, 3, H, W]`` in ``[0, 1]`` (fp32, CPU) of the pretrained pipeline for ``prompt``.

    Args:
        guidance_scale: CFG scale ``w`` (1: the conditional prediction alone, one UNet row per sample).
        num_steps, eta: the DDIM sampler (the trainer's ``sd.num_steps`` / ``sd.eta``).
        batch_size: samples per batch (each batch is one ``[2 b]`` UNet call per step with CFG).
        progress: called with the number of samples finished after each batch.
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"sample_pretrained: n and batch_size must be >= 1, got n={n}, batch_size={batch_size}")
    mdp = build_mdp(parts.scheduler_config, num_steps, "ddim", eta)
    unet = parts.unet
    device, dtype = unet.conv_in.weight.device, unet.conv_in.weight.dtype
    latent = int(unet.config.sample_size)
    shape = (int(unet.config.in_channels), latent, latent)
    embeds = encode_prompts(parts, [negative_prompt, prompt]).to(dtype)
    guided = guidance_scale != 1.0
    timesteps = mdp.timesteps.to(device)
    out = []
    for b, start in enumerate(range(0, n, batch_size)):
        size = min(batch_size, n - start)
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + b)
        x = torch.randn((size, *shape), generator=gen).to(device)
        cond = embeds[1:].expand(size, -1, -1)
        if guided:
            cond = torch.cat([embeds[:1].expand(size, -1, -1), cond])
        for t in range(mdp.num_steps):
            step = torch.full((size,), t, dtype=torch.int64, device=device)
            c = mdp.gather(step, x.dim(), torch.float32)
            noise = torch.randn((size, *shape), generator=gen).to(device)
            x_in = torch.cat([x, x]) if guided else x
            ts = timesteps[t].expand(x_in.shape[0])
            pred = unet(x_in.to(dtype), ts, encoder_hidden_states=cond, return_dict=False)[0].float()
            eps = mdp.to_epsilon(pred, torch.cat([x, x]) if guided else x, c["alpha_bar"])
            coeffs = (c["a"], c["b"], c["sigma"], c["alpha_bar"])
            if guided:
                eps_u, eps_c = eps.chunk(2)
                x, _ = denoise_step_fused(x, eps_u, noise, *coeffs, eps_cond=eps_c, guidance_scale=guidance_scale)
            else:
                x, _ = denoise_step_fused(x, eps, noise, *coeffs)
        out.append(decode_latents(parts, x).cpu())
        if progress is not None:
            progress(size)
    return torch.cat(out)
