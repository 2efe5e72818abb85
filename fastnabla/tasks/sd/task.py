"""Stable Diffusion behind the trainer's model interface (``fastnabla.training.interface.DiffusionTask``).

Policy (docs/maths.md, docs/fidelity.md; every UNet call is the classifier-free-guidance pair, so all scores
are scores of the CFG policy)::

    eps_theta(x_t) = eps_u + w (eps_c - eps_u),    [eps_u, eps_c] = UNet_theta([x_t, x_t], tau_t, [e_neg, e_c])

with one batched UNet call on the ``[2B]`` pair (``w = 1``: the conditional half only), ``UNet_theta``
the frozen UNet plus LoRA (:mod:`fastnabla.tasks.sd.lora`), ``e_neg`` the negative-prompt embedding
(a buffer) and ``e_c`` each sample's prompt embedding. Model outputs of ``v_prediction`` / ``sample``
UNets are converted to ``eps`` first (affine in ``x_t``, ``DenoisingMDP.to_epsilon``). The pretrained
``eps#`` is the same with the adapters off. Both are differentiable w.r.t. ``x_t`` (the trainer takes
VJPs through them); ``eps`` is returned in fp32 whatever the frozen dtype.

Flow ``g_phi(x_s)``: :mod:`fastnabla.tasks.sd.flow_net` (which timestep it sees is documented there).
Decoding: ``image = clamp(VAE_dec(x / scaling_factor) / 2 + 1/2, 0, 1)`` in fp32 (diffusers'
post-processing; the clamp zeroes pixel gradients outside ``[0, 1]``). Rewards: ``log R`` of each
image scored with its *own* prompt (the release scored against the wrong prompts).

Conditioning ``cond`` is ``{"prompts": list[str], "prompt_embeds": [n, 77, D]}`` (embeddings in the
frozen dtype, on the task's device); ``select_cond`` indexes it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastnabla.mdp.gaussian_policy import cfg_combine
from fastnabla.mdp.schedule import build_mdp
from fastnabla.ops import image_postprocess
from fastnabla.rewards.base import Reward
from fastnabla.tasks.sd import switches
from fastnabla.tasks.sd.config import SDConfig
from fastnabla.tasks.sd.flow_net import build_flow_net, flow_timesteps
from fastnabla.tasks.sd.loading import SDComponents
from fastnabla.tasks.sd.lora import (
    adapters_disabled,
    add_lora,
    export_lora,
    lora_layers,
    named_lora_parameters,
)
from fastnabla.tasks.sd.prompts import draw_prompts, load_task_prompts
from fastnabla.utils.profiling import nvtx_range

Tensor = torch.Tensor
EMBED_CACHE_SIZE = 1024  # prompt embeddings kept on the device (a prompt set is usually far smaller)
LORA_PREFIX, FLOW_PREFIX = "lora.", "flow."


class SDTask(nn.Module):
    """A Stable Diffusion pipeline + LoRA policy + flow network + reward, as a ``DiffusionTask``.

    Args:
        parts: frozen pipeline parts on ``device`` (:func:`fastnabla.tasks.sd.loading.load_components`
            or :func:`fastnabla.tasks.sd.tiny.build_tiny_components`); the UNet gets LoRA adapters here.
        cfg: the task config (validated here).
        reward: the reward (``fastnabla.rewards.build_reward``), moved to ``device``.
        device: where everything runs.
        seed: seed of the initial LoRA and flow-network weights (drawn on the CPU, so identical on every
            device and rank; the global RNG is not touched).
    """

    def __init__(self, parts: SDComponents, cfg: SDConfig, reward: Reward, device: torch.device | str, seed: int = 0):
        super().__init__()
        cfg.validate()
        device = torch.device(device)
        switches.check_speed_config(cfg.speed, device)
        self.cfg = cfg
        self.device = device
        self.guidance_scale = float(cfg.guidance_scale)
        self.unet, self.vae, self.text_encoder = parts.unet, parts.vae, parts.text_encoder
        self.tokenizer = parts.tokenizer
        self.reward = reward.to(device)
        try:
            self.mdp = build_mdp(parts.scheduler_config, cfg.num_steps, cfg.sampler, cfg.eta)
        except ValueError as err:
            raise ValueError(f"sd.sampler/num_steps/eta with the scheduler of {parts.source}: {err}") from err

        factor = parts.vae_scale_factor
        resolution = cfg.resolution or int(self.unet.config.sample_size) * factor
        if resolution % factor:
            raise ValueError(f"sd.resolution={cfg.resolution} must be a multiple of the VAE factor {factor}")
        channels = int(self.unet.config.in_channels)
        self.latent_shape = (channels, resolution // factor, resolution // factor)
        self.resolution = resolution

        with torch.random.fork_rng(devices=[]):  # LoRA A init from `seed` (peft draws it on the CPU)
            torch.manual_seed(seed)
            self._lora_params = add_lora(self.unet, cfg.lora)
        self._lora_layers = lora_layers(self.unet)
        self.flow_net = build_flow_net(cfg.flow, channels, self.latent_shape[1], parts.text_width, seed).to(device)
        num_train = int(parts.scheduler_config.get("num_train_timesteps", 1000))
        self.register_buffer("flow_time", flow_timesteps(self.mdp.num_steps, num_train).to(device), persistent=False)
        self.register_buffer("timesteps", self.mdp.timesteps.to(device), persistent=False)
        self.register_buffer("alpha_bar", self.mdp.alpha_bar.float().to(device), persistent=False)

        self.prompts, self.default_eval_prompts = load_task_prompts(cfg.prompts)
        self._embed_cache: OrderedDict[str, Tensor] = OrderedDict()
        self.register_buffer("negative_embeds", self.encode_prompts([cfg.negative_prompt]), persistent=False)
        self._apply_speed_switches()

    # --- speed switches ------------------------------------------------------------------------
    def _apply_speed_switches(self) -> None:
        speed, device = self.cfg.speed, self.device
        for module in (self.unet, self.vae, self.flow_net):
            switches.set_attention_backend(module, speed.attention)
        switches.set_tf32(speed.tf32, device)
        if speed.channels_last:
            for module in (self.unet, self.vae, self.flow_net):
                switches.to_channels_last(module)
        if speed.vae_slicing:
            self.vae.enable_slicing()
        if speed.compile_unet:
            switches.compile_in_place(self.unet, speed.compile_mode)
        if speed.compile_vae_decoder:
            switches.compile_in_place(self.vae.decoder, speed.compile_mode)
        if speed.compile_flow:
            switches.compile_in_place(self.flow_net, speed.compile_mode)
        self._graphed_unet = switches.graphed(self._unet_forward) if speed.cuda_graphs else None

    @property
    def frozen_dtype(self) -> torch.dtype:
        """Dtype of the frozen UNet weights (the UNet's own ``dtype`` may report the fp32 LoRA weights)."""
        return self.unet.conv_in.weight.dtype

    def _layout(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.speed.channels_last else x

    # --- prompts -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Text-encoder embeddings ``[n, 77, D]`` (last hidden state, as the diffusers pipelines use),
        in the frozen dtype on the task's device; cached per prompt."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._embed_cache]
        if missing:
            tok = self.tokenizer
            max_len = min(int(tok.model_max_length), int(self.text_encoder.config.max_position_embeddings))
            ids = tok(list(missing), padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
            hidden = self.text_encoder(ids.input_ids.to(self.device))[0]  # [m, 77, D]
            for p, h in zip(missing, hidden, strict=True):
                self._embed_cache[p] = h.clone()
        out = []
        for p in prompts:
            self._embed_cache.move_to_end(p)
            out.append(self._embed_cache[p])
        while len(self._embed_cache) > EMBED_CACHE_SIZE:
            self._embed_cache.popitem(last=False)
        return torch.stack(out)

    def conditions_for(self, prompts: Sequence[str]) -> dict[str, Any]:
        """The conditioning dict of given prompts (evaluation, tests)."""
        prompts = list(prompts)
        return {"prompts": prompts, "prompt_embeds": self.encode_prompts(prompts)}

    # --- DiffusionTask -------------------------------------------------------------------------
    def initial_noise(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``x_0 ~ N(0, I)``, ``[n, 4, h, w]`` fp32, drawn on the CPU (reproducible across devices and ranks)."""
        return torch.randn((n, *self.latent_shape), generator=generator, dtype=torch.float32).to(self.device)

    def sample_conditions(self, n: int, generator: torch.Generator | None = None) -> dict[str, Any]:
        """``n`` prompts drawn from the prompt set with ``generator`` and their embeddings."""
        return self.conditions_for(draw_prompts(self.prompts, n, generator))

    def _unet_forward(self, x: Tensor, timesteps: Tensor, embeds: Tensor) -> Tensor:
        with switches.autocast_bf16(self.cfg.speed.autocast_bf16, self.device):
            out = self.unet(self._layout(x), timesteps, encoder_hidden_states=embeds, return_dict=False)[0]
        return out.float()

    def eps_pair(self, x: Tensor, step: Tensor, cond: dict[str, Any], pretrained: bool = False):
        """``(eps_u, eps_c)`` of the policy (or the pretrained model) from one UNet call on the ``[2B]`` pair.

        ``eps_u`` is ``None`` when ``guidance_scale == 1`` (the conditional half alone is the policy).
        Both fp32, differentiable w.r.t. ``x`` (and the LoRA weights unless ``pretrained``).
        """
        b = x.shape[0]
        step = step.to(self.device)
        ts = self.timesteps[step]
        embeds = cond["prompt_embeds"].to(device=self.device, dtype=self.frozen_dtype)
        x_in = x.to(self.frozen_dtype)
        guided = self.guidance_scale != 1.0
        if guided:
            negative = self.negative_embeds.to(embeds.dtype).expand(b, -1, -1)
            x_in, ts, embeds = torch.cat([x_in, x_in]), torch.cat([ts, ts]), torch.cat([negative, embeds])
        run = self._unet_forward
        if self._graphed_unet is not None and not torch.is_grad_enabled():
            run = self._graphed_unet
        if pretrained:
            with adapters_disabled(self._lora_layers):
                out = run(x_in, ts, embeds)
        else:
            out = run(x_in, ts, embeds)
        if run is self._graphed_unet:
            out = out.clone()  # CUDA-graph outputs are overwritten by the next replay
        abar = self.alpha_bar[step].reshape(-1, *([1] * (x.dim() - 1)))
        xf = x.float()
        if not guided:
            return None, self.mdp.to_epsilon(out, xf, abar)
        out_u, out_c = out.chunk(2)
        return self.mdp.to_epsilon(out_u, xf, abar), self.mdp.to_epsilon(out_c, xf, abar)

    def _combined(self, x: Tensor, step: Tensor, cond: dict[str, Any], pretrained: bool) -> Tensor:
        eps_u, eps_c = self.eps_pair(x, step, cond, pretrained)
        return eps_c if eps_u is None else cfg_combine(eps_u, eps_c, self.guidance_scale)

    def policy_eps(self, x: Tensor, step: Tensor, cond: dict[str, Any]) -> Tensor:
        """CFG-combined ``eps_theta(x_t)`` (fp32), differentiable w.r.t. the LoRA weights and ``x``."""
        with nvtx_range("policy"):
            return self._combined(x, step, cond, pretrained=False)

    def pretrained_eps(self, x: Tensor, step: Tensor, cond: dict[str, Any]) -> Tensor:
        """CFG-combined ``eps#(x_t)`` of the pretrained UNet (adapters off), differentiable w.r.t. ``x``."""
        with nvtx_range("pretrained"):
            return self._combined(x, step, cond, pretrained=True)

    def flow(self, x: Tensor, state: Tensor, cond: dict[str, Any]) -> Tensor:
        """``g_phi(x_s)`` (fp32, the latents' shape); ``state`` int64 ``[B]`` in ``0 .. T``."""
        tau = self.flow_time[state.to(self.device)]
        embeds = cond["prompt_embeds"].to(device=self.device, dtype=torch.float32)
        with nvtx_range("flow"), switches.autocast_bf16(self.cfg.speed.autocast_bf16, self.device):
            out = self.flow_net(self._layout(x.float()), tau, encoder_hidden_states=embeds, return_dict=False)[0]
        return out.float()

    @property
    def decoder_dtype(self) -> torch.dtype:
        """Dtype of the VAE decoder's input (the frozen dtype)."""
        return self.vae.dtype

    def decode_raw(self, x: Tensor) -> Tensor:
        """The VAE decoder's output ``[B, 3, H, W]`` (about ``[-1, 1]``, in the VAE's dtype), before post-processing."""
        vae_cfg = self.vae.config
        z = x.to(self.vae.dtype) / vae_cfg.scaling_factor
        if getattr(vae_cfg, "shift_factor", None):
            z = z + vae_cfg.shift_factor
        return self.vae.decode(self._layout(z), return_dict=False)[0]

    def decode(self, x: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]`` (fp32) from latents, differentiable w.r.t. ``x``:
        ``clamp(decode_raw(x) / 2 + 1/2, 0, 1)`` (:func:`fastnabla.ops.image_postprocess`)."""
        return image_postprocess(self.decode_raw(x))

    def log_reward(self, images: Tensor, cond: dict[str, Any]) -> Tensor:
        """``log R`` ``[B]`` (fp32) of each image with its own prompt.

        ``images`` may hold ``k`` images per prompt stacked noise-major (``[k * n]`` from ``[k, n]``,
        as the smoothed forward-looking gradient batches them); prompt ``i`` then scores images
        ``i, n + i, 2n + i, ...``.
        """
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
        """LoRA and flow weights by name (``lora.<unet param name>``, ``flow.<flow state-dict key>``)."""
        out = {LORA_PREFIX + n: p.detach() for n, p in named_lora_parameters(self.unet)}
        out.update({FLOW_PREFIX + k: v for k, v in self.flow_net.state_dict().items()})
        return out

    @torch.no_grad()
    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load what :meth:`trainable_state_dict` wrote; every key must match (errors list the differences)."""
        own = self.trainable_state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(
                f"trainable state dict does not match the task: {len(missing)} missing (first: {missing[:5]}), "
                f"{len(unexpected)} unexpected (first: {unexpected[:5]})"
            )
        for k, target in own.items():
            if target.shape != state[k].shape:
                raise ValueError(f"trainable state dict: {k} has shape {tuple(state[k].shape)}, "
                                 f"the task expects {tuple(target.shape)}")
            target.copy_(state[k])

    def export_lora(self, directory: str | Path) -> Path:
        """Write the trained LoRA as a diffusers LoRA directory (``StableDiffusionPipeline.load_lora_weights``)."""
        return export_lora(self.unet, directory)
