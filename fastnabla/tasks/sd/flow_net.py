"""The flow network ``g_phi``: a small prompt-conditioned ``UNet2DConditionModel`` (the release's design).

``g_phi(x_s, s, c)`` is the learned *residual* log-flow gradient of the forward-looking
parametrisation (paper eq. 15 and section 4.3)::

    grad_x log F~(x_s) = beta gamma_s grad_x log R(x_hat(x_s)) + g_phi(x_s)

so its output has the latents' shape ``[B, 4, h, w]``. Release defaults: ``block_out_channels =
(64, 128, 256, 256)``, one layer per block, cross-attention on the prompt embeddings
(``cross_attention_dim`` = the text encoder's width). The last convolution starts with "tiny weights"
(paper section 4.3: its default initialisation times ``output_init_scale``, 1e-3 by default; bias
zero), so ``g_phi ~ 0`` at initialisation -- the flow starts at the forward-looking baseline alone --
while every layer already gets gradients; ``output_init_scale = 0`` makes it exactly zero.

SDXL (ours): g_phi cross-attends to the same prompt embeddings as the UNet, both text encoders' penultimate states
concatenated (``cross_attention_dim`` 768 + 1280 = 2048), and gets neither the pooled embedding nor the size / crop
time ids -- the pooled embedding is a function of the same prompt tokens, and the time ids are constant in a run.

Which timestep the flow sees: states are numbered ``s = 0 .. T`` (``x_0`` noise, ``x_T`` the
sample). The flow is a new network, so it needs no scheduler semantics, only an injective, smooth
time input; it gets the continuous timestep::

    tau_flow(s) = num_train_timesteps * (T - s) / T

i.e. 1000 for pure noise and 0 for the terminal sample, evenly spaced in between (for SD 1.5 with
50 steps: within 19 of the sampler's own timesteps 981, 961, ..., 1, which are offset by
``steps_offset``). Unlike the sampler's timesteps this also gives the terminal state ``x_T`` its
own value.
"""

from __future__ import annotations

import torch
from torch import nn

from fastnabla.compat import prepare_third_party_imports
from fastnabla.tasks.sd.config import FlowNetConfig

Tensor = torch.Tensor


def flow_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> Tensor:
    """``tau_flow(s)`` for ``s = 0 .. T`` (float32 ``[T + 1]``): ``num_train_timesteps * (T - s) / T``."""
    s = torch.arange(num_steps + 1, dtype=torch.float64)
    return (num_train_timesteps * (num_steps - s) / num_steps).float()


def build_flow_net(
    cfg: FlowNetConfig, latent_channels: int, latent_size: int, cross_attention_dim: int, seed: int | None = None
) -> nn.Module:
    """The flow UNet (fp32, train mode) with its last convolution zero-initialised.

    Args:
        latent_channels: channels of the latents (4 for Stable Diffusion); input and output.
        latent_size: latent height/width (recorded as ``sample_size``; any size works).
        cross_attention_dim: width of the prompt embeddings.
        seed: draw the initial weights from this seed without touching the global RNG (None: global RNG).
    """
    prepare_third_party_imports()
    from diffusers import UNet2DConditionModel

    levels = len(cfg.block_out_channels)
    down = ("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1)
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        net = UNet2DConditionModel(
            sample_size=latent_size,
            in_channels=latent_channels,
            out_channels=latent_channels,
            block_out_channels=tuple(cfg.block_out_channels),
            layers_per_block=cfg.layers_per_block,
            down_block_types=down,
            up_block_types=up,
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=cfg.attention_head_dim,
            norm_num_groups=cfg.norm_num_groups,
        )
    with torch.no_grad():
        net.conv_out.weight.mul_(cfg.output_init_scale)
        net.conv_out.bias.zero_()
    return net.float().train()
