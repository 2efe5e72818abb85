"""SD3 / SD3.5 and FLUX.1 behind the trainer's model interface (``fastnabla.training.interface.DiffusionTask``).

The MDP is the rectified-flow SDE of :mod:`fastnabla.mdp.flow_matching` in the rescaled state ``y = x / c_s``
(docs/flow-matching.md). Each network call maps the state to the flow's ``x = c_t y``, runs the transformer at the
scheduler's timestep and turns its velocity into the table's epsilon (affine, per step)::

    eps_theta(y_t) = eps_x[t] y_t + eps_v[t] v_theta(c_t y_t)

* **SD3** (MMDiT, ``SD3Transformer2DModel``): classifier-free guidance on the ``[2B]`` pair (negative prompt
  first, as the pipeline), ``v = v_u + w (v_c - v_u)`` when ``w > 1``; since the map to epsilon is affine with the
  same ``y`` coefficient for both halves, guidance in epsilon is guidance in velocity;
* **FLUX** (``FluxTransformer2DModel``): no CFG pair; the guidance embedding gets ``w`` (FLUX.1-dev's distilled
  guidance), the 16-channel latents are packed 2x2 into tokens with their ``img_ids`` (and zero ``txt_ids``) and
  the velocity unpacked again, so states, trajectories and the flow network see ``[B, 16, h, w]`` latents.

The pretrained model is the same transformer with its LoRA adapters off. Decoding: ``image = clamp(VAE_dec(x /
scaling_factor + shift_factor) / 2 + 1/2, 0, 1)`` (``c = 1`` at the data end, so ``x_hat`` needs no rescaling).
Conditioning: ``{"prompts": list[str], "prompt_embeds": [n, L, D], "pooled_embeds": [n, P]}``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastnabla.mdp.flow_matching import FlowMatchMDP, build_flow_mdp
from fastnabla.mdp.gaussian_policy import cfg_combine
from fastnabla.ops import image_postprocess
from fastnabla.rewards.base import Reward
from fastnabla.tasks.flow.config import FlowConfig
from fastnabla.tasks.flow.loading import FlowComponents
from fastnabla.tasks.flow.lora import export_transformer_lora
from fastnabla.tasks.flow.text import DEFAULT_MAX_SEQUENCE_LENGTH, encode_flux, encode_sd3
from fastnabla.tasks.sd import switches
from fastnabla.tasks.sd.flow_net import build_flow_net, flow_timesteps
from fastnabla.tasks.sd.lora import adapters_disabled, add_lora, lora_layers, named_lora_parameters
from fastnabla.tasks.sd.prompts import draw_prompts, load_task_prompts
from fastnabla.utils.profiling import nvtx_range

Tensor = torch.Tensor
EMBED_CACHE_SIZE = 1024
LORA_PREFIX, FLOW_PREFIX = "lora.", "flow."


def pack_latents(x: Tensor) -> Tensor:
    """FLUX's 2x2 packing ``[B, C, h, w] -> [B, (h/2)(w/2), 4C]`` (``FluxPipeline._pack_latents``)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, h: int, w: int) -> Tensor:
    """The inverse of :func:`pack_latents` (``FluxPipeline._unpack_latents`` at latent size ``h x w``)."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def latent_image_ids(h: int, w: int) -> Tensor:
    """FLUX's ``img_ids`` of ``(h/2) x (w/2)`` tokens: ``(0, row, column)`` (``_prepare_latent_image_ids``)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


def sampler_mdp(parts: FlowComponents, cfg: FlowConfig, latent_hw: tuple[int, int], noise_level: float
                ) -> FlowMatchMDP:
    """The SDE table the pipeline's scheduler implies at this size: SD3's own sigmas; FLUX's
    ``linspace(1, 1 / T, T)`` with its resolution-dependent shift ``mu`` (``image_seq_len`` packed tokens)."""
    h, w = latent_hw
    sched = parts.scheduler_config
    if parts.family == "flux":
        sigmas = None if sched.get("use_flow_sigmas") else np.linspace(1.0, 1 / cfg.num_steps, cfg.num_steps)
        seq_len = (h // 2) * (w // 2)
    else:
        sigmas, p = None, parts.patch_multiple
        seq_len = (h // p) * (w // p)
    return build_flow_mdp(sched, cfg.num_steps, noise_level, image_seq_len=seq_len, sigmas=sigmas)


class FlowTask(nn.Module):
    """An SD3 or FLUX pipeline + LoRA policy + flow network + reward, as a ``DiffusionTask``.

    Args:
        parts: frozen pipeline parts on ``device`` (:func:`fastnabla.tasks.flow.loading.load_components` or
            :func:`fastnabla.tasks.flow.tiny.build_tiny_components`); the transformer gets LoRA adapters here.
        cfg: the task config (validated here). reward: moved to ``device``.
        seed: seed of the initial LoRA and flow-network weights (drawn on the CPU; the global RNG is not touched).
    """

    def __init__(self, parts: FlowComponents, cfg: FlowConfig, reward: Reward, device: torch.device | str,
                 seed: int = 0):
        super().__init__()
        cfg.validate()
        if parts.family != cfg.family:
            raise ValueError(f"flow.family={cfg.family!r} but the pipeline {parts.source} is {parts.family!r}")
        self.cfg, self.family, self.device = cfg, parts.family, torch.device(device)
        self.parts = parts  # text encoders and tokenizers (frozen; not registered as submodules)
        self.transformer, self.vae = parts.transformer, parts.vae
        self.reward = reward.to(self.device)
        factor, multiple = parts.vae_scale_factor, parts.patch_multiple
        self.resolution = cfg.resolution or parts.default_sample_size * factor
        if self.resolution % (factor * multiple):
            raise ValueError(f"flow.resolution={self.resolution} must be a multiple of {factor * multiple} (VAE factor "
                             f"{factor} x {'patch size' if self.family == 'sd3' else '2x2 packing'} {multiple})")
        h = self.resolution // factor
        self.latent_shape = (parts.latent_channels, h, h)
        self.max_sequence_length = cfg.max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH[self.family]
        if self.family == "sd3":
            self.guided = cfg.guidance_scale > 1  # StableDiffusion3Pipeline.do_classifier_free_guidance
            self.guidance_embed = None
        else:
            self.guided = False
            self.guidance_embed = float(cfg.guidance_scale) if parts.transformer.config.guidance_embeds else None
        self.guidance_scale = float(cfg.guidance_scale) if self.guided else 1.0
        try:
            self.mdp = sampler_mdp(parts, cfg, (h, h), cfg.noise_level)
        except ValueError as err:
            raise ValueError(f"flow.num_steps/noise_level with the scheduler of {parts.source}: {err}") from err

        with torch.random.fork_rng(devices=[]):  # LoRA A init from `seed` (peft draws it on the CPU)
            torch.manual_seed(seed)
            try:
                self._lora_params = add_lora(self.transformer, cfg.lora)
            except ValueError as err:
                raise ValueError(str(err).replace("sd.lora", "flow.lora").replace("UNet", "transformer")) from err
        self._lora_layers = lora_layers(self.transformer)
        self.flow_net = build_flow_net(cfg.flow, self.latent_shape[0], h, parts.text_width, seed).to(self.device)
        num_train = int(parts.scheduler_config.get("num_train_timesteps", 1000))
        self.register_buffer("flow_time", flow_timesteps(self.mdp.num_steps, num_train).to(self.device),
                             persistent=False)
        for name, values in (("model_timesteps", self.mdp.model_timesteps), ("scale", self.mdp.scale[:-1]),
                             ("eps_x", self.mdp.eps_x), ("eps_v", self.mdp.eps_v)):
            self.register_buffer(name, values.float().to(self.device), persistent=False)
        self.register_buffer("img_ids", latent_image_ids(h, h).to(self.device, self.frozen_dtype), persistent=False)

        self.prompts, self.default_eval_prompts = load_task_prompts(cfg.prompts)
        self._embed_cache: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()
        if self.guided:
            embeds, pooled = self.encode_prompts([cfg.negative_prompt])
            self.register_buffer("negative_embeds", embeds, persistent=False)
            self.register_buffer("negative_pooled", pooled, persistent=False)
        self._apply_speed_switches()

    def _apply_speed_switches(self) -> None:
        speed, device = self.cfg.speed, self.device
        switches.set_tf32(speed.tf32, device)
        if speed.gradient_checkpointing:  # each block recomputed under the adapter state of its forward
            switches.enable_unet_checkpointing(self.transformer, self._lora_layers)
        if speed.vae_slicing:
            self.vae.enable_slicing()
        for flag, module in ((speed.compile_transformer, self.transformer), (speed.compile_vae_decoder,
                             self.vae.decoder), (speed.compile_flow, self.flow_net)):
            if flag:
                switches.compile_in_place(module, speed.compile_mode)

    @property
    def frozen_dtype(self) -> torch.dtype:
        """Dtype of the frozen transformer weights (not of the fp32 LoRA weights)."""
        return next(p for n, p in self.transformer.named_parameters() if "lora_" not in n).dtype

    # --- prompts -------------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """``(prompt_embeds [n, L, D], pooled_embeds [n, P])`` in the frozen dtype (:mod:`.text`), cached."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._embed_cache]
        if missing:
            enc, tok = self.parts.text_encoders, self.parts.tokenizers
            if self.family == "sd3":
                embeds, pooled = encode_sd3(enc, tok, missing, self.max_sequence_length,
                                            self.parts.text_width, self.device)
            else:
                embeds, pooled = encode_flux(enc, tok, missing, self.max_sequence_length, self.device)
            for i, p in enumerate(missing):
                self._embed_cache[p] = (embeds[i].clone(), pooled[i].clone())
        out = []
        for p in prompts:
            self._embed_cache.move_to_end(p)
            out.append(self._embed_cache[p])
        while len(self._embed_cache) > EMBED_CACHE_SIZE:
            self._embed_cache.popitem(last=False)
        return torch.stack([e for e, _ in out]), torch.stack([q for _, q in out])

    def conditions_for(self, prompts: Sequence[str]) -> dict[str, Any]:
        prompts = list(prompts)
        embeds, pooled = self.encode_prompts(prompts)
        return {"prompts": prompts, "prompt_embeds": embeds, "pooled_embeds": pooled}

    # --- DiffusionTask -------------------------------------------------------------------------
    def initial_noise(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``x_0 ~ N(0, I)`` ``[n, C, h, w]`` fp32 drawn on the CPU (``c = 1`` at pure noise: ``y_0 = x_0``)."""
        return torch.randn((n, *self.latent_shape), generator=generator, dtype=torch.float32).to(self.device)

    def sample_conditions(self, n: int, generator: torch.Generator | None = None) -> dict[str, Any]:
        return self.conditions_for(draw_prompts(self.prompts, n, generator))

    def _transformer(self, x: Tensor, timesteps: Tensor, embeds: Tensor, pooled: Tensor) -> Tensor:
        """The transformer's velocity ``[B, C, h, w]`` (fp32) at flow state ``x`` (frozen dtype)."""
        with switches.autocast_bf16(self.cfg.speed.autocast_bf16, self.device):
            if self.family == "sd3":
                out = self.transformer(hidden_states=x, timestep=timesteps, encoder_hidden_states=embeds,
                                       pooled_projections=pooled, return_dict=False)[0]
                return out.float()
            h, w = x.shape[-2:]
            guidance = None
            if self.guidance_embed is not None:
                guidance = torch.full((x.shape[0],), self.guidance_embed, device=x.device, dtype=torch.float32)
            txt_ids = torch.zeros(embeds.shape[1], 3, device=x.device, dtype=self.img_ids.dtype)
            out = self.transformer(hidden_states=pack_latents(x), timestep=timesteps.to(x.dtype) / 1000,
                                   guidance=guidance, pooled_projections=pooled, encoder_hidden_states=embeds,
                                   txt_ids=txt_ids, img_ids=self.img_ids, return_dict=False)[0]
        return unpack_latents(out.float(), h, w)

    def velocity_pair(self, y: Tensor, step: Tensor, cond: dict[str, Any], pretrained: bool = False):
        """``(v_u, v_c)`` at state ``y`` (``v_u`` None without CFG), fp32, differentiable w.r.t. ``y`` (and the
        LoRA weights unless ``pretrained``)."""
        step = step.to(self.device)
        shape = (-1,) + (1,) * (y.dim() - 1)
        x = (y.float() * self.scale[step].reshape(shape)).to(self.frozen_dtype)
        ts = self.model_timesteps[step]
        embeds = cond["prompt_embeds"].to(device=self.device, dtype=self.frozen_dtype)
        pooled = cond["pooled_embeds"].to(device=self.device, dtype=self.frozen_dtype)
        if self.guided:
            b = y.shape[0]
            x, ts = torch.cat([x, x]), torch.cat([ts, ts])
            embeds = torch.cat([self.negative_embeds.to(embeds.dtype).expand(b, -1, -1), embeds])
            pooled = torch.cat([self.negative_pooled.to(pooled.dtype).expand(b, -1), pooled])
        if pretrained:
            with adapters_disabled(self._lora_layers):
                out = self._transformer(x, ts, embeds, pooled)
        else:
            out = self._transformer(x, ts, embeds, pooled)
        return tuple(out.chunk(2)) if self.guided else (None, out)

    def eps_pair(self, y: Tensor, step: Tensor, cond: dict[str, Any], pretrained: bool = False):
        """``(eps_u, eps_c)`` of the table (``eps_u`` None without CFG): each half's velocity mapped to epsilon."""
        v_u, v_c = self.velocity_pair(y, step, cond, pretrained)
        shape = (-1,) + (1,) * (y.dim() - 1)
        step = step.to(self.device)
        u, w, yf = self.eps_x[step].reshape(shape), self.eps_v[step].reshape(shape), y.float()
        return (None if v_u is None else u * yf + w * v_u), u * yf + w * v_c

    def _combined(self, y: Tensor, step: Tensor, cond: dict[str, Any], pretrained: bool) -> Tensor:
        eps_u, eps_c = self.eps_pair(y, step, cond, pretrained)
        return eps_c if eps_u is None else cfg_combine(eps_u, eps_c, self.guidance_scale)

    def policy_eps(self, x: Tensor, step: Tensor, cond: dict[str, Any]) -> Tensor:
        with nvtx_range("policy"):
            return self._combined(x, step, cond, pretrained=False)

    def pretrained_eps(self, x: Tensor, step: Tensor, cond: dict[str, Any]) -> Tensor:
        with nvtx_range("pretrained"):
            return self._combined(x, step, cond, pretrained=True)

    def flow(self, x: Tensor, state: Tensor, cond: dict[str, Any]) -> Tensor:
        """``g_phi(y_s)`` (fp32, the latents' shape): the flow UNet cross-attending the prompt's token states."""
        tau = self.flow_time[state.to(self.device)]
        embeds = cond["prompt_embeds"].to(device=self.device, dtype=torch.float32)
        with nvtx_range("flow"), switches.autocast_bf16(self.cfg.speed.autocast_bf16, self.device):
            out = self.flow_net(x.float(), tau, encoder_hidden_states=embeds, return_dict=False)[0]
        return out.float()

    @property
    def decoder_dtype(self) -> torch.dtype:
        return self.vae.dtype

    def decode_raw(self, x: Tensor) -> Tensor:
        """The VAE decoder's output (about ``[-1, 1]``) of latents ``x``: ``VAE_dec(x / scaling + shift)``."""
        vae_cfg = self.vae.config
        z = x.to(self.vae.dtype) / vae_cfg.scaling_factor + (vae_cfg.shift_factor or 0.0)
        return self.vae.decode(z, return_dict=False)[0]

    def decode(self, x: Tensor) -> Tensor:
        return image_postprocess(self.decode_raw(x))

    def log_reward(self, images: Tensor, cond: dict[str, Any]) -> Tensor:
        """``log R`` ``[B]`` of each image with its own prompt (``k`` images per prompt stacked noise-major)."""
        prompts = list(cond["prompts"])
        n, total = len(prompts), images.shape[0]
        if n == 0 or total % n:
            raise ValueError(f"log_reward got {total} images for {n} prompts (needs a multiple: k images per prompt)")
        return self.reward.log_reward(images, prompts * (total // n))

    def policy_parameters(self) -> list[nn.Parameter]:
        return list(self._lora_params)

    def flow_parameters(self) -> list[nn.Parameter]:
        return list(self.flow_net.parameters())

    # --- checkpoints and export ----------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, Tensor]:
        out = {LORA_PREFIX + n: p.detach() for n, p in named_lora_parameters(self.transformer)}
        out.update({FLOW_PREFIX + k: v for k, v in self.flow_net.state_dict().items()})
        return out

    @torch.no_grad()
    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        own = self.trainable_state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(f"trainable state dict does not match the task: {len(missing)} missing (first: "
                           f"{missing[:5]}), {len(unexpected)} unexpected (first: {unexpected[:5]})")
        for k, target in own.items():
            if target.shape != state[k].shape:
                raise ValueError(f"trainable state dict: {k} has shape {tuple(state[k].shape)}, the task expects "
                                 f"{tuple(target.shape)}")
            target.copy_(state[k])

    def with_noise_level(self, noise_level: float) -> FlowMatchMDP:
        """The table of this task's scheduler and size at another noise level (0: the pipelines' ODE)."""
        h, w = self.latent_shape[1:]
        return sampler_mdp(self.parts, self.cfg, (h, w), noise_level)

    def export_lora(self, directory: str | Path) -> Path:
        """The trained LoRA as a diffusers LoRA directory (``StableDiffusion3Pipeline`` / ``FluxPipeline``
        ``load_lora_weights`` reads it)."""
        return export_transformer_lora(self.transformer, self.family, directory)
