"""Speed switches of the Stable Diffusion task (``sd.speed``), each applied by one function.

* ``attention``: ``sdpa`` (default; diffusers ``AttnProcessor2_0``, ``F.scaled_dot_product_attention``),
  ``classic`` (diffusers ``AttnProcessor``: explicit matmul + softmax) or ``xformers``
  (``enable_xformers_memory_efficient_attention``; xformers installed and CUDA only);
* ``compile_unet`` / ``compile_vae_decoder`` / ``compile_flow``: ``nn.Module.compile`` in place, so
  parameter names and state-dict keys do not change;
* ``cuda_graphs``: the no-grad sampling UNet call runs under ``torch.compile(mode="reduce-overhead")``
  (CUDA-graph trees capture and replay it); CUDA only;
* ``channels_last``: NHWC weights and inputs for UNet, VAE and flow;
* ``tf32``: TF32 for fp32 matmuls and convolutions on CUDA (a documented no-op elsewhere);
* ``autocast_bf16``: UNet and flow forwards under ``torch.autocast(bfloat16)``;
* ``vae_slicing``: decode one image at a time (less memory);
* ``cudnn_benchmark``: ``torch.backends.cudnn.benchmark`` on CUDA (a documented no-op elsewhere).

Memory switches (``sd.memory``): gradient checkpointing of the UNet (:func:`enable_unet_checkpointing`, diffusers'
own, with the adapter state of each forward restored when it is recomputed), the VAE decoder (diffusers' own) and the
reward model (:func:`fastnabla.rewards.checkpointing.checkpoint_reward_blocks`). Checkpointing recomputes
activations in the backward pass from the same inputs under the same adapter and autocast state, so losses and
gradients are unchanged (tests/test_memory_switches.py).

A switch that cannot work on the chosen device raises a ``ValueError`` naming the field instead of
silently doing nothing (``tf32`` excepted: it only concerns CUDA maths).
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch
from torch import nn

from fastnabla.compat import prepare_third_party_imports
from fastnabla.tasks.sd.config import SpeedConfig


def check_speed_config(speed: SpeedConfig, device: torch.device) -> None:
    """Device-dependent checks; raises ``ValueError`` naming the ``sd.speed`` field."""
    if speed.attention == "xformers":
        if importlib.util.find_spec("xformers") is None:
            raise ValueError("sd.speed.attention='xformers' but xformers is not installed; use 'sdpa' (the default)")
        if device.type != "cuda":
            raise ValueError(
                f"sd.speed.attention='xformers' needs a CUDA device (running on {device.type!r}): xformers "
                "attention has no CPU kernels; use 'sdpa' (the default)"
            )
    if speed.cuda_graphs and device.type != "cuda":
        raise ValueError(
            f"sd.speed.cuda_graphs=true needs a CUDA device (running on {device.type!r}); set it to false"
        )


def set_attention_backend(module: nn.Module, backend: str) -> None:
    """Install the attention processor ``backend`` on every attention layer of a diffusers model."""
    prepare_third_party_imports()
    if backend == "xformers":
        module.enable_xformers_memory_efficient_attention()
        return
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if backend == "sdpa":
        module.set_attn_processor(AttnProcessor2_0())
    elif backend == "classic":
        module.set_attn_processor(AttnProcessor())
    else:
        raise ValueError(f"sd.speed.attention={backend!r} is not one of ('sdpa', 'xformers', 'classic')")


def attention_backend_of(module: nn.Module) -> set[str]:
    """Class names of the attention processors installed on ``module`` (for tests and logs)."""
    return {type(p).__name__ for p in module.attn_processors.values()}


def set_tf32(enabled: bool, device: torch.device) -> None:
    """Allow (or forbid) TF32 in CUDA fp32 matmuls and cuDNN convolutions; nothing off CUDA.

    This is process-wide state (torch offers no per-module switch).
    """
    if device.type != "cuda":
        return
    precision = "tf32" if enabled else "ieee"
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    if hasattr(matmul, "fp32_precision") and hasattr(conv, "fp32_precision"):
        matmul.fp32_precision = precision
        conv.fp32_precision = precision
    else:  # torch < 2.9
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def set_cudnn_benchmark(enabled: bool, device: torch.device) -> None:
    """``torch.backends.cudnn.benchmark = enabled`` on CUDA (process-wide); nothing off CUDA."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = enabled


def enable_unet_checkpointing(unet: nn.Module, layers: list[nn.Module]) -> None:
    """diffusers' gradient checkpointing of ``unet``'s blocks, recomputing each block under the adapter state of its
    forward: the pretrained model's forward runs with the adapters off (:func:`~fastnabla.tasks.sd.lora.
    adapters_disabled`) and its VJP is taken after that block has exited, so a plain recomputation would run the
    LoRA policy instead. Only under autograd (``torch.is_grad_enabled()``): sampling is unaffected."""
    from torch.utils.checkpoint import checkpoint

    from fastnabla.tasks.sd.lora import adapters_disabled

    def with_forward_state(module: nn.Module, *args):
        disabled = bool(layers) and bool(layers[0].disable_adapters)

        def run(*inputs):
            now = bool(layers) and bool(layers[0].disable_adapters)
            if disabled == now:
                return module(*inputs)
            if disabled:
                with adapters_disabled(layers):
                    return module(*inputs)
            flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
            for layer in layers:  # forward with adapters on, recomputed inside an adapters-off block
                layer.enable_adapters(True)
            try:
                return module(*inputs)
            finally:
                for layer in layers:
                    layer.enable_adapters(False)
                for p, flag in flags:
                    p.requires_grad_(flag)

        return checkpoint(run, *args, use_reentrant=False)

    unet.enable_gradient_checkpointing(with_forward_state)


def enable_vae_decoder_checkpointing(vae: nn.Module) -> None:
    """diffusers' gradient checkpointing of the VAE (the decoder's mid and up blocks; the encoder never runs)."""
    vae.enable_gradient_checkpointing()


def to_channels_last(module: nn.Module) -> None:
    module.to(memory_format=torch.channels_last)


COMPILE_RECOMPILE_LIMIT = 32


def compile_in_place(module: nn.Module, mode: str) -> None:
    """``torch.compile`` the module's forward in place (its state-dict keys do not change).

    Static shapes (``dynamic=False``): one graph per input shape and grad mode (sampling batch,
    training micro-batch, evaluation batch, adapters on/off), never a symbolic-shape graph -- dynamo
    treats two modules of one class as one function, so a second model size would otherwise turn on
    dynamic shapes, which inductor 2.13 fails to compile for diffusers UNets on CPU
    (``cannot determine truth value of Relational``). That takes more graphs than dynamo's default
    limit of 8 per function, so the limit is raised (process-wide) to ``COMPILE_RECOMPILE_LIMIT``.
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILE_RECOMPILE_LIMIT)
    module.compile(mode=None if mode == "default" else mode, dynamic=False)


def autocast_bf16(enabled: bool, device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast(device.type, bfloat16)`` when enabled, else a null context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def graphed(fn, mode: str = "reduce-overhead"):
    """``fn`` under ``torch.compile(mode="reduce-overhead")``: CUDA-graph trees capture and replay it
    (static shapes: one graph per sampling batch shape)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILE_RECOMPILE_LIMIT)
    return torch.compile(fn, mode=mode, dynamic=False)
