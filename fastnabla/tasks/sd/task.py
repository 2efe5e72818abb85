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
frozen dtype, on the task's device); ``select_cond`` indexes it. SDXL (:mod:`fastnabla.tasks.sd.text`) adds
``"pooled_embeds": [n, P]``, and every UNet call gets ``added_cond_kwargs = {"text_embeds": [p_neg, p_c],
"time_ids": [ids, ids]}`` beside ``[e_neg, e_c]`` -- the negative pooled embedding for the unconditional half, the
same size / crop ids for both (the pipeline's defaults).
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
from fastnabla.rewards.checkpointing import checkpoint_reward_blocks
from fastnabla.tasks.sd import switches
from fastnabla.tasks.sd.config import SDConfig
from fastnabla.tasks.sd.flow_net import build_flow_net, flow_timesteps
from fastnabla.tasks.sd.loading import SDComponents
from fastnabla.tasks.sd.lora import (
    adapters_disabled,
    add_lora,
    export_lora,
    load_lora_file,
    lora_layers,
    named_lora_parameters,
    read_lora_file,
)
from fastnabla.tasks.sd.prompts import draw_prompts, load_task_prompts
from fastnabla.tasks.sd.text import check_time_embedding, encode_sd, encode_sdxl, sdxl_time_ids
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
        self.family = parts.family
        self.text_encoder_2, self.tokenizer_2 = parts.text_encoder_2, parts.tokenizer_2
        self.reward = reward.to(device)
        self.fl_surrogate: nn.Module | None = None  # the FL term's cheap decoder (set_fl_surrogate)
        try:
            self.mdp = build_mdp(parts.scheduler_config, cfg.num_steps, cfg.sampler, cfg.eta)
        except ValueError as err:
            raise ValueError(f"sd.sampler/num_steps/eta with the scheduler of {parts.source}: {err}") from err

        factor = parts.vae_scale_factor
        resolution = cfg.resolution or int(self.unet.config.sample_size) * factor
        if resolution % factor:
            raise ValueError(f"sd.resolution={cfg.resolution} must be a multiple of the VAE factor {factor}")
        height, width = cfg.height or resolution, cfg.width or resolution
        for name, side in (("height", cfg.height), ("width", cfg.width)):
            if side % factor:
                raise ValueError(f"sd.{name}={side} must be a multiple of the VAE factor {factor}")
        channels = int(self.unet.config.in_channels)
        self.latent_shape = (channels, height // factor, width // factor)
        self.resolution = resolution if height == width == resolution else max(height, width)
        self.image_size = (height, width)

        with torch.random.fork_rng(devices=[]):  # LoRA A init from `seed` (peft draws it on the CPU)
            torch.manual_seed(seed)
            self._lora_params = add_lora(self.unet, cfg.lora)
        if cfg.lora.init:  # --init-lora: the policy starts from a diffusers-format LoRA
            load_lora_file(self.unet, read_lora_file(cfg.lora.init), cfg.lora)
        self._lora_layers = lora_layers(self.unet)
        self.flow_net = build_flow_net(cfg.flow, channels, self.latent_shape[1], parts.text_width, seed).to(device)
        num_train = int(parts.scheduler_config.get("num_train_timesteps", 1000))
        self.register_buffer("flow_time", flow_timesteps(self.mdp.num_steps, num_train).to(device), persistent=False)
        self.register_buffer("timesteps", self.mdp.timesteps.to(device), persistent=False)
        self.register_buffer("alpha_bar", self.mdp.alpha_bar.float().to(device), persistent=False)

        self.prompts, self.default_eval_prompts = load_task_prompts(cfg.prompts)
        self._embed_cache: OrderedDict[str, tuple[Tensor, Tensor | None]] = OrderedDict()
        if self.family == "sdxl":
            self._init_sdxl(parts)
        else:
            self.register_buffer("negative_embeds", self.encode_prompts([cfg.negative_prompt]), persistent=False)
        self._apply_speed_switches()

    def _init_sdxl(self, parts: SDComponents) -> None:
        """SDXL: the negative prompt and pooled embeddings (zeros for an empty negative prompt where the pipeline's
        ``force_zeros_for_empty_prompt`` -- or ``sd.xl.empty_negative`` -- says so) and the time ids."""
        cfg = self.cfg
        check_time_embedding(self.unet, parts.pooled_width)
        mode = cfg.xl.empty_negative
        zeros = cfg.negative_prompt == "" and (
            mode == "zeros" or (mode == "auto" and parts.force_zeros_for_empty_prompt))
        embeds, pooled = self._encode([cfg.negative_prompt])
        if zeros:
            embeds, pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        self.register_buffer("negative_embeds", embeds, persistent=False)
        self.register_buffer("negative_pooled", pooled, persistent=False)
        size = list(self.image_size)
        ids = sdxl_time_ids(cfg.xl.original_size or size, cfg.xl.crop_top_left, cfg.xl.target_size or size)
        self.register_buffer("time_ids", ids.to(self.device), persistent=False)

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
        switches.set_cudnn_benchmark(speed.cudnn_benchmark, device)
        memory = self.cfg.memory
        if memory.unet_gradient_checkpointing:
            switches.enable_unet_checkpointing(self.unet, self._lora_layers)
        if memory.vae_gradient_checkpointing:
            switches.enable_vae_decoder_checkpointing(self.vae)
        if memory.reward_gradient_checkpointing:
            checkpoint_reward_blocks(self.reward.model)
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
    def _encode(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor | None]:
        """``(prompt embeddings [n, 77, D], pooled [n, P] or None)`` in the frozen dtype on the task's device, as
        the family's diffusers pipeline computes them (:mod:`fastnabla.tasks.sd.text`); cached per prompt."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._embed_cache]
        if missing:
            if self.family == "sdxl":
                hidden, pooled = encode_sdxl((self.tokenizer, self.tokenizer_2),
                                             (self.text_encoder, self.text_encoder_2), missing, self.device)
            else:
                hidden, pooled = encode_sd(self.tokenizer, self.text_encoder, missing, self.device), None
            for i, p in enumerate(missing):
                self._embed_cache[p] = (hidden[i].clone(), None if pooled is None else pooled[i].clone())
        out = []
        for p in prompts:
            self._embed_cache.move_to_end(p)
            out.append(self._embed_cache[p])
        while len(self._embed_cache) > EMBED_CACHE_SIZE:
            self._embed_cache.popitem(last=False)
        hidden = torch.stack([h for h, _ in out])
        return hidden, (torch.stack([q for _, q in out]) if self.family == "sdxl" else None)

    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Prompt embeddings ``[n, 77, D]`` the UNet cross-attends to (SD: the text encoder's last hidden state, as
        the diffusers pipelines use; SDXL: both encoders' penultimate states), frozen dtype, cached per prompt."""
        return self._encode(prompts)[0]

    def conditions_for(self, prompts: Sequence[str]) -> dict[str, Any]:
        """The conditioning dict of given prompts (evaluation, tests); SDXL adds ``pooled_embeds``."""
        prompts = list(prompts)
        embeds, pooled = self._encode(prompts)
        cond = {"prompts": prompts, "prompt_embeds": embeds}
        if pooled is not None:
            cond["pooled_embeds"] = pooled
        return cond

    # --- DiffusionTask -------------------------------------------------------------------------
    def initial_noise(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``x_0 ~ N(0, I)``, ``[n, 4, h, w]`` fp32, drawn on the CPU (reproducible across devices and ranks)."""
        return torch.randn((n, *self.latent_shape), generator=generator, dtype=torch.float32).to(self.device)

    def sample_conditions(self, n: int, generator: torch.Generator | None = None) -> dict[str, Any]:
        """``n`` prompts drawn from the prompt set with ``generator`` and their embeddings."""
        return self.conditions_for(draw_prompts(self.prompts, n, generator))

    def _unet_forward(self, x: Tensor, timesteps: Tensor, embeds: Tensor, added: dict[str, Tensor] | None = None
                      ) -> Tensor:
        with switches.autocast_bf16(self.cfg.speed.autocast_bf16, self.device):
            out = self.unet(self._layout(x), timesteps, encoder_hidden_states=embeds, added_cond_kwargs=added,
                            return_dict=False)[0]
        return out.float()

    def _added_cond(self, cond: dict[str, Any], b: int, guided: bool) -> dict[str, Tensor] | None:
        """SDXL's ``added_cond_kwargs`` for the ``[2B]`` pair (``[B]`` unguided): ``text_embeds = [p_neg, p_c]``,
        ``time_ids`` the same six ids on every row. None for SD 1.x / 2.x."""
        if self.family != "sdxl":
            return None
        pooled = cond["pooled_embeds"].to(device=self.device, dtype=self.frozen_dtype)
        if guided:
            pooled = torch.cat([self.negative_pooled.to(pooled.dtype).expand(b, -1), pooled])
        ids = self.time_ids.to(self.frozen_dtype).expand(pooled.shape[0], -1)
        return {"text_embeds": pooled, "time_ids": ids}

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
        added = self._added_cond(cond, b, guided)
        if guided:
            negative = self.negative_embeds.to(embeds.dtype).expand(b, -1, -1)
            x_in, ts, embeds = torch.cat([x_in, x_in]), torch.cat([ts, ts]), torch.cat([negative, embeds])
        run = self._unet_forward
        if self._graphed_unet is not None and not torch.is_grad_enabled():
            run = self._graphed_unet
        if pretrained:
            with adapters_disabled(self._lora_layers):
                out = run(x_in, ts, embeds, added)
        else:
            out = run(x_in, ts, embeds, added)
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

    def set_fl_surrogate(self, decoder: nn.Module) -> None:
        """The forward-looking term's surrogate decoder at non-terminal states (``method.fl_decoder=surrogate``): a
        frozen diffusers ``AutoencoderTiny`` (:func:`fastnabla.tasks.sd.loading.load_fl_surrogate_decoder`)."""
        self.fl_surrogate = decoder.to(self.device).eval().requires_grad_(False)

    @property
    def has_fl_surrogate(self) -> bool:
        return self.fl_surrogate is not None

    @property
    def fl_surrogate_dtype(self) -> torch.dtype:
        """Dtype of the surrogate decoder's input."""
        if self.fl_surrogate is None:
            raise ValueError("no forward-looking surrogate decoder: set sd.fl_surrogate_decoder")
        return self.fl_surrogate.dtype

    def fl_surrogate_decode_raw(self, x: Tensor) -> Tensor:
        """The surrogate's image ``[B, 3, H, W]`` (about ``[-1, 1]``) from the diffusion latents ``x``, like
        :meth:`decode_raw`: an ``AutoencoderTiny`` takes the scaled latents divided by its own ``scaling_factor``
        (1 for TAESD, as diffusers' pipelines call it)."""
        if self.fl_surrogate is None:
            raise ValueError("no forward-looking surrogate decoder: set sd.fl_surrogate_decoder")
        z = x.to(self.fl_surrogate.dtype) / self.fl_surrogate.config.scaling_factor
        return self.fl_surrogate.decode(self._layout(z), return_dict=False)[0]

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
        """Write the trained LoRA as a diffusers LoRA directory (``StableDiffusionPipeline.load_lora_weights``;
        SDXL: ``StableDiffusionXLPipeline.load_lora_weights``)."""
        return export_lora(self.unet, directory, self.family)
