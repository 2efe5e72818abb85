"""A memory *estimate* of one training micro-step of a Stable Diffusion / SDXL run, from the shipped architecture
configs on the meta device (no weights, no GPU): ``python -m fastnabla.flops.memory_estimate --preset
sdxl-aesthetic``.

What it adds up (bytes; docs/stable-diffusion.md, "SDXL", quotes its output):

* **weights**: every frozen network in the frozen dtype (the VAE in fp32 where ``vae_dtype_for`` upcasts it), the
  reward model in fp32, and the trained LoRA and flow weights in fp32 with their gradient and AdamW's two moments
  (16 bytes per trained parameter);
* **graphs**: the bytes autograd saves for the backward pass (``torch.autograd.graph.saved_tensors_hooks``) in
  the forward of one latent through (a) the policy UNet's CFG pair with LoRA and input gradients, (b) the
  pretrained UNet's CFG pair with input gradients, (c) the VAE decoder + reward with input gradients (the
  forward-looking decode-VJP of one image), (d) the flow network with parameter gradients.

Attention is counted as a flash / memory-efficient kernel saves it (queries, keys, values, output and one
log-sum-exp per row), not as the meta device's math path (which would save the full attention matrix); a saved
tensor object is counted once. Not counted: temporaries freed within the forward, the backward pass's own
transient buffers, the CUDA context and allocator fragmentation (typically a few GiB on top): hence an estimate.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from fastnabla.flops.archs import ArchSpec, build_reward_model, build_text_encoder, build_unet, build_vae

GiB = 2**30


class _FlashLikeAttention(torch.autograd.Function):
    """SDPA whose saved tensors are what a flash kernel keeps: q, k, v, out and the row log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, kwargs):  # noqa: D102
        with torch.no_grad():
            out = _SDPA(q, k, v, **kwargs)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102 -- never run: the estimate only counts what the forward saves
        raise NotImplementedError


_SDPA = torch.nn.functional.scaled_dot_product_attention


@contextlib.contextmanager
def flash_like_attention() -> Iterator[None]:
    """``F.scaled_dot_product_attention`` replaced by :class:`_FlashLikeAttention` inside the block."""

    def sdpa(q, k, v, **kwargs):
        return _FlashLikeAttention.apply(q, k, v, kwargs)

    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = _SDPA


def saved_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of the tensors autograd saves while ``fn`` runs (each tensor object once), flash-like attention."""
    seen: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen.setdefault(id(t), t)
        return t

    with flash_like_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(t.numel() * t.element_size() for t in seen.values())


def _bytes(module: nn.Module, dtype: torch.dtype | None = None) -> int:
    return sum(p.numel() * (dtype.itemsize if dtype else p.element_size()) for p in module.parameters())


@dataclasses.dataclass
class MemoryEstimate:
    """Bytes by part: ``weights`` and ``graphs`` (one latent / one image each), see the module docstring."""

    weights: dict[str, int]
    graphs: dict[str, int]

    def peak(self, micro_batch: int, fl_batch: int) -> int:
        """Weights + the larger of the two phases a trained micro-batch runs one after the other: the policy and
        pretrained UNet graphs + flow graphs of ``micro_batch`` latents, or the decode-VJP graphs of ``fl_batch``
        images (the forward-looking precomputation)."""
        g = self.graphs
        unet = micro_batch * (g["unet_policy"] + g["unet_pretrained"] + 2 * g["flow"])
        return sum(self.weights.values()) + max(unet, fl_batch * g["vae_decoder+reward"])


def estimate(arch: ArchSpec, resolution: int, frozen: torch.dtype, reward: str, lora: dict[str, Any],
             flow: dict[str, Any], family: str) -> MemoryEstimate:
    """The :class:`MemoryEstimate` of ``arch`` at ``resolution`` px with ``frozen`` weights (meta device)."""
    from fastnabla.tasks.sd.config import FlowNetConfig, LoRAConfig
    from fastnabla.tasks.sd.flow_net import build_flow_net
    from fastnabla.tasks.sd.loading import vae_dtype_for
    from fastnabla.tasks.sd.lora import adapters_disabled, add_lora, lora_layers

    shape = arch.latent_shape(resolution)
    unet = build_unet(arch).to(frozen)
    add_lora(unet, LoRAConfig(**lora))
    trained = [p for p in unet.parameters() if p.requires_grad]
    vae = build_vae(arch)
    vae.to(vae_dtype_for(frozen, arch.vae, family))
    with torch.device("meta"):
        flow_net = build_flow_net(FlowNetConfig(**flow), shape[0], shape[1], arch.text_width)
    model = build_reward_model(reward)
    encoders = [build_text_encoder(c) for c in arch.text_encoders]
    trained_bytes = 16 * (sum(p.numel() for p in trained) + sum(p.numel() for p in flow_net.parameters()))
    weights = {
        "unet": _bytes(unet) - sum(p.numel() * p.element_size() for p in trained),
        "vae": _bytes(vae), "text_encoders": sum(_bytes(e, frozen) for e in encoders), "reward": _bytes(model),
        "trained (LoRA + flow, fp32 + grad + AdamW)": trained_bytes,
    }
    meta = {"device": "meta"}
    rows = 2  # the CFG pair
    embeds = torch.randn(rows, arch.text_length, arch.text_width, dtype=frozen, **meta)
    added = None
    if arch.unet.get("addition_embed_type") == "text_time":
        pooled = int(arch.unet["projection_class_embeddings_input_dim"]) - 6 * int(arch.unet["addition_time_embed_dim"])
        added = {"text_embeds": torch.randn(rows, pooled, dtype=frozen, **meta),
                 "time_ids": torch.randn(rows, 6, dtype=frozen, **meta)}

    def unet_pass() -> None:
        x = torch.randn(rows, *shape, dtype=frozen, requires_grad=True, **meta)
        unet(x, torch.full((rows,), 500.0, **meta), encoder_hidden_states=embeds, added_cond_kwargs=added)

    def pretrained_pass() -> None:
        with adapters_disabled(lora_layers(unet)):
            unet_pass()

    def decode_pass() -> None:
        z = torch.randn(1, *shape, dtype=vae.dtype, requires_grad=True, **meta)
        image = vae.decode(z, return_dict=False)[0].float().clamp(-1, 1) / 2 + 0.5
        model.score(image, ["a photo of a cat"])

    def flow_pass() -> None:
        x = torch.randn(1, *shape, **meta)
        flow_net(x, torch.full((1,), 500.0, **meta), encoder_hidden_states=embeds[:1].float())

    graphs = {"unet_policy": saved_bytes(unet_pass), "unet_pretrained": saved_bytes(pretrained_pass),
              "vae_decoder+reward": saved_bytes(decode_pass), "flow": saved_bytes(flow_pass)}
    return MemoryEstimate(weights, graphs)


def main(argv: list[str] | None = None) -> int:
    from fastnabla.flops.archs import arch_for_model, load_arch
    from fastnabla.flops.cli import build_run_config

    parser = argparse.ArgumentParser(prog="python -m fastnabla.flops.memory_estimate", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sdxl-aesthetic")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="frozen dtype")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value")
    args = parser.parse_args(argv)
    cfg = build_run_config(args.preset, args.overrides)
    arch = load_arch(arch_for_model(cfg.sd.model))
    resolution = int(cfg.sd.resolution or arch.default_resolution)
    family = "sdxl" if arch.unet.get("addition_embed_type") == "text_time" else "sd"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    est = estimate(arch, resolution, dtype, cfg.sd.reward.name, dataclasses.asdict(cfg.sd.lora),
                   dataclasses.asdict(cfg.sd.flow), family)
    micro, fl = int(cfg.train.micro_batch_size), int(cfg.train.fl_batch_size)
    print(f"memory ESTIMATE of {args.preset} ({arch.name}, {resolution} px, frozen {args.dtype}); GiB")
    for name, value in est.weights.items():
        print(f"  weights  {name:45s} {value / GiB:8.2f}")
    for name, value in est.graphs.items():
        print(f"  graph    {name + ' (one latent)':45s} {value / GiB:8.2f}")
    print(f"  peak at micro_batch_size={micro}, fl_batch_size={fl}: {est.peak(micro, fl) / GiB:.1f} "
          "(+ CUDA context, transient buffers, fragmentation)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
