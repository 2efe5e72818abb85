"""FLOPs of one pass of each network on one row, counted by ``torch.utils.flop_counter.FlopCounterMode``.

A *pass* is one network call or one backward-type pass through it, of one of four kinds:

* ``forward``: the call itself (with or without a graph: the same matmuls);
* ``input_vjp``: ``torch.autograd.grad(out, x)``, a VJP w.r.t. the *input* only -- what the reverse score, the
  forward-looking gradient and the decode-VJPs take. Autograd computes no weight gradient there, even for LoRA
  weights that require grad;
* ``param_backward``: ``out.backward()`` with an input that needs no gradient (DDPO, DB, ReFL, the flow network):
  trainable-weight gradients plus the input-gradient chain down to the first trainable layer;
* ``param_input_backward``: ``out.backward()`` when the input is also a leaf that requires grad (the policy call of
  the nabla-DB objective, whose input was made to require grad for its VJP): the whole input-gradient chain plus
  the trainable-weight gradients.

Counts are per *row* (one latent / image / prompt; a CFG pair call on ``B`` latents is ``2B`` rows): every network
here treats rows independently, so FLOPs are linear in the batch (tested). Networks are built on the meta device
with ``requires_grad`` set as the trainer sets it (frozen weights, trainable LoRA / flow weights), and the passes
are run for real through autograd, so the count is what autograd does, not a formula.

What FlopCounterMode counts: matmuls, convolutions and attention (on the meta device attention runs PyTorch's math
path: ``Q K^T`` and ``P V`` forward, four batched matmuls backward). Elementwise work, norms, softmax and the
bicubic resize of the reward preprocessing are not counted (they are memory-bound and small in FLOPs). A fused
(flash / memory-efficient) attention backward recomputes ``Q K^T``: hardware FLOPs are higher than these model
FLOPs by one attention matmul per attention backward.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fastnabla.flops.archs import (
    ArchSpec,
    build_fl_surrogate,
    build_flow_unet,
    build_reward_model,
    build_text_encoder,
    build_unet,
    build_vae,
    load_config,
)

Tensor = torch.Tensor
PASS_KINDS = ("forward", "input_vjp", "param_backward", "param_input_backward")
NETWORKS = ("unet_policy", "unet_pretrained", "vae_decoder", "fl_surrogate", "reward", "flow", "db_flow",
            "text_encoder")
PROMPT = "a photo of a cat"


class _TotalsOnly:
    """Stands in for ``FlopCounterMode``'s module tracker: only totals are needed here. The tracker hooks every
    module call (slow on a UNet) and its backward hooks on module inputs make ``torch.autograd.grad`` fail when a
    leaf that requires grad goes straight into a module (torch 2.13: "A leaf node was passed to
    _will_engine_execute_node"), which is exactly the trainer's VJP without classifier-free guidance."""

    parents = ("Global",)

    def __enter__(self) -> _TotalsOnly:
        return self

    def __exit__(self, *args: object) -> None:
        return None


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` counting totals only (``get_total_flops``); where this torch has no replaceable module
    tracker it is the plain counter."""
    counter = FlopCounterMode(display=False)
    if hasattr(counter, "mod_tracker"):
        counter.mod_tracker = _TotalsOnly()
    return counter


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs ``fn()`` runs, as ``FlopCounterMode`` counts them (:func:`flop_counter`)."""
    with flop_counter() as counter:
        fn()
    return int(counter.get_total_flops())


def pass_flops(call: Callable[[Tensor], Tensor], make_input: Callable[[], Tensor], kinds: set[str]) -> dict[str, int]:
    """FLOPs of each requested pass kind of ``call`` on the input ``make_input()`` (see the module docstring)."""
    unknown = set(kinds) - set(PASS_KINDS)
    if unknown:
        raise ValueError(f"unknown pass kinds {sorted(unknown)}; known: {PASS_KINDS}")
    out: dict[str, int] = {}
    with torch.enable_grad():
        if kinds & {"forward", "input_vjp", "param_input_backward"}:
            x = make_input().requires_grad_(True)
            holder: dict[str, Tensor] = {}
            out["forward"] = count_flops(lambda: holder.setdefault("y", call(x)))
            y = holder["y"]
            if "input_vjp" in kinds:
                out["input_vjp"] = count_flops(
                    lambda: torch.autograd.grad(y, x, torch.ones_like(y), retain_graph="param_input_backward" in kinds))
            if "param_input_backward" in kinds:
                out["param_input_backward"] = count_flops(lambda: y.backward(torch.ones_like(y)))
        if "param_backward" in kinds:
            x = make_input()
            y = call(x)
            out["param_backward"] = count_flops(lambda: y.backward(torch.ones_like(y)))
    return {k: v for k, v in out.items() if k in kinds}


@dataclass(frozen=True)
class CountSetup:
    """Everything the per-pass counts depend on (and the key of their cache).

    Attributes:
        arch: the Stable Diffusion architecture.
        resolution: image side in pixels.
        reward: reward name (``fastnabla.rewards`` registry).
        lora: ``sd.lora`` as a dict (rank, alpha, target_modules, dropout).
        flow: the flow network: ``("ours", sd.flow as a dict)`` or ``("release", kwargs)``.
        db: ``method.db`` as a dict (the DB baselines' scalar log-flow), or None.
        num_steps: ``T`` (the scalar log-flow's time input; no effect on FLOPs).
        reward_config: a learned reward's config instead of the shipped one (tests: small variants).
        reward_options: a registry reward's options (``sd.reward.options``: e.g. the digits classifier's file).
        fl_surrogate: the ``AutoencoderTiny`` config of the forward-looking surrogate decoder
            (``method.fl_decoder=surrogate``; :func:`fastnabla.flops.archs.fl_surrogate_config`), or None.
    """

    arch: ArchSpec
    resolution: int
    reward: str
    lora: dict[str, Any]
    flow: tuple[str, dict[str, Any]] = ("ours", {})
    db: dict[str, Any] | None = None
    num_steps: int = 50
    reward_config: dict[str, Any] | None = None
    reward_options: dict[str, Any] | None = None
    fl_surrogate: dict[str, Any] | None = None


_CACHE: dict[tuple[str, str], dict[str, int]] = {}


def _unet_inputs(arch: ArchSpec, resolution: int, device: str) -> dict[str, Any]:
    cfg = arch.unet
    kwargs: dict[str, Any] = {
        "timestep": torch.full((1,), 500.0, device=device),
        "encoder_hidden_states": torch.randn(1, arch.text_length, arch.text_width, device=device),
    }
    if cfg.get("addition_embed_type") == "text_time":  # SDXL: pooled text embedding + 6 size/crop ids
        time_ids = 6
        pooled = int(cfg["projection_class_embeddings_input_dim"]) - time_ids * int(cfg["addition_time_embed_dim"])
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, device=device),
                                       "time_ids": torch.randn(1, time_ids, device=device)}
    return kwargs


def _transformer_call(arch: ArchSpec, model: nn.Module, shape: tuple[int, int, int], device: str
                      ) -> Callable[[Tensor], Tensor]:
    """One row of an SD3 / FLUX transformer as the flow task calls it (``fastnabla.tasks.flow.task``): SD3 with the
    prompt's 77 + T5 token states and pooled embedding; FLUX on the 2x2-packed latents with their ids, zero text ids
    and the guidance embedding's value."""
    from fastnabla.tasks.flow.task import latent_image_ids, pack_latents, unpack_latents

    embeds = torch.randn(1, arch.text_length, arch.text_width, device=device)
    pooled = torch.randn(1, int(arch.unet["pooled_projection_dim"]), device=device)
    t = torch.full((1,), 500.0, device=device)
    if arch.family == "sd3":
        return lambda x: model(hidden_states=x, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled,
                               return_dict=False)[0]
    h, w = shape[1:]
    img_ids = latent_image_ids(h, w).to(device)
    txt_ids = torch.zeros(arch.text_length, 3, device=device)
    guidance = torch.full((1,), 3.5, device=device) if arch.unet.get("guidance_embeds") else None

    def call(x: Tensor) -> Tensor:
        out = model(hidden_states=pack_latents(x), timestep=t / 1000, guidance=guidance, pooled_projections=pooled,
                    encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return unpack_latents(out, h, w)

    return call


def _unet_counts(setup: CountSetup, network: str, kinds: set[str], device: str) -> dict[str, int]:
    from fastnabla.tasks.sd.config import LoRAConfig
    from fastnabla.tasks.sd.lora import adapters_disabled, add_lora, lora_layers

    unet = build_unet(setup.arch, device)
    add_lora(unet, LoRAConfig(**setup.lora))  # freezes the UNet, LoRA weights trainable (as the task does)
    shape = setup.arch.latent_shape(setup.resolution)
    if setup.arch.family != "unet":
        call = _transformer_call(setup.arch, unet, shape, device)
    else:
        kwargs = _unet_inputs(setup.arch, setup.resolution, device)

        def call(x: Tensor) -> Tensor:
            return unet(x, return_dict=False, **kwargs)[0]

    def make() -> Tensor:
        return torch.randn(1, *shape, device=device)

    if network == "unet_pretrained":
        with adapters_disabled(lora_layers(unet)):
            return pass_flops(call, make, kinds)
    return pass_flops(call, make, kinds)


def _flow_network(setup: CountSetup, device: str) -> nn.Module:
    which, cfg = setup.flow
    shape = setup.arch.latent_shape(setup.resolution)
    if which == "release":
        # the release's design on this latent (4 channels for SD; 16 for SD3 / FLUX, which the release never ran)
        return build_flow_unet({**cfg, "cross_attention_dim": setup.arch.text_width, "in_channels": shape[0],
                                "out_channels": shape[0]}, device)
    from fastnabla.tasks.sd.config import FlowNetConfig
    from fastnabla.tasks.sd.flow_net import build_flow_net

    with torch.device(device):
        return build_flow_net(FlowNetConfig(**cfg), shape[0], shape[1], setup.arch.text_width)


def _network_counts(setup: CountSetup, network: str, kinds: set[str], device: str) -> dict[str, int]:
    shape = setup.arch.latent_shape(setup.resolution)
    if network in ("unet_policy", "unet_pretrained"):
        return _unet_counts(setup, network, kinds, device)
    if network == "vae_decoder":
        vae = build_vae(setup.arch, device).requires_grad_(False)
        return pass_flops(lambda z: vae.decode(z, return_dict=False)[0],
                          lambda: torch.randn(1, *shape, device=device), kinds)
    if network == "fl_surrogate":
        if setup.fl_surrogate is None:
            raise ValueError("the fl_surrogate decoder needs CountSetup.fl_surrogate (its AutoencoderTiny config)")
        tiny = build_fl_surrogate(setup.fl_surrogate, device).requires_grad_(False)
        return pass_flops(lambda z: tiny.decode(z, return_dict=False)[0],
                          lambda: torch.randn(1, *shape, device=device), kinds)
    if network == "reward":
        model = build_reward_model(setup.reward, device, setup.reward_config, setup.reward_options)
        out = {}
        if hasattr(model, "text_features"):  # prompt features are cached per prompt: not part of a scoring pass
            out["prompt_forward"] = count_flops(lambda: model.text_features([PROMPT]))
        side = setup.resolution
        out.update(pass_flops(lambda img: model.score(img, [PROMPT]),
                              lambda: torch.rand(1, 3, side, side, device=device), kinds - {"prompt_forward"}))
        return {k: out.get(k, 0) for k in kinds}
    embeds = torch.randn(1, setup.arch.text_length, setup.arch.text_width, device=device)
    if network == "flow":
        net = _flow_network(setup, device)
        tau = torch.full((1,), 500.0, device=device)
        return pass_flops(lambda x: net(x, tau, encoder_hidden_states=embeds, return_dict=False)[0],
                          lambda: torch.randn(1, *shape, device=device), kinds)
    if network == "db_flow":
        from fastnabla.methods.log_flow import ScalarLogFlow

        db = setup.db or {}
        with torch.device(device):
            net = ScalarLogFlow(shape, setup.num_steps, setup.arch.text_width, int(db.get("flow_hidden", 128)),
                                int(db.get("flow_layers", 3)), tuple(db.get("flow_channels", (64, 128, 256, 256))))
        state = torch.zeros(1, dtype=torch.int64, device=device)
        cond = {"prompt_embeds": embeds}
        return pass_flops(lambda x: net(x, state, cond).reshape(-1, 1),
                          lambda: torch.randn(1, *shape, device=device), kinds)
    if network == "text_encoder":
        if kinds - {"forward"}:
            raise ValueError("the text encoders run forward only")
        total = 0
        for config in setup.arch.text_encoders:
            encoder = build_text_encoder(config, device)
            t5 = "d_model" in config  # a T5 encoder reads the arch's T5 tokens, CLIP its 77
            length = setup.arch.t5_tokens if t5 else int(config.get("max_position_embeddings", setup.arch.text_length))
            ids = torch.zeros(1, length, dtype=torch.int64, device=device)
            total += count_flops(lambda enc=encoder, ids=ids: enc(ids))
        return {"forward": total}
    raise ValueError(f"unknown network {network!r}; known: {NETWORKS}")


def _network_key(setup: CountSetup, network: str) -> str:
    """What ``network``'s counts depend on: networks shared by two setups are counted once."""
    arch = setup.arch
    shape = arch.latent_shape(setup.resolution)
    parts: dict[str, Any] = {"network": network}
    if network in ("unet_policy", "unet_pretrained"):
        parts.update(unet=arch.unet, text=(arch.text_length, arch.text_width), shape=shape, lora=setup.lora)
    elif network == "vae_decoder":
        parts.update(vae=arch.vae, shape=shape)
    elif network == "fl_surrogate":
        parts.update(fl_surrogate=setup.fl_surrogate, shape=shape)
    elif network == "reward":
        parts.update(reward=setup.reward, config=setup.reward_config, options=setup.reward_options,
                     resolution=setup.resolution)
    elif network == "flow":
        parts.update(flow=setup.flow, text=(arch.text_length, arch.text_width), shape=shape)
    elif network == "db_flow":
        parts.update(db=setup.db, text=(arch.text_length, arch.text_width), shape=shape, steps=setup.num_steps)
    else:
        parts.update(encoders=arch.text_encoders, length=arch.text_length, t5=arch.t5_tokens)
    return json.dumps(parts, sort_keys=True, default=str)


def network_pass_flops(setup: CountSetup, network: str, kinds: set[str], device: str = "meta") -> dict[str, int]:
    """FLOPs per row of each pass kind in ``kinds`` of ``network`` under ``setup`` (cached per process: only the
    kinds not counted before for the same network are run)."""
    cached = _CACHE.setdefault((_network_key(setup, network), device), {})
    missing = set(kinds) - set(cached)
    if missing:
        cached.update(_network_counts(setup, network, missing, device))
    return {k: cached[k] for k in kinds}


def release_flow_kwargs() -> dict[str, Any]:
    """The release's flow network (``flow/release.json``) as ``UNet2DConditionModel`` keyword arguments."""
    return load_config("flow/release.json")
