"""Parameter counts and frozen-weight memory of SD3.5 Medium and FLUX.1-dev, from their configs on the meta device.

``python -m fastnabla.flops.flow_params`` prints the table of docs/flow-matching.md ("Memory on one GPU"). Each part
is built from the real config (shipped as data in ``configs/sd35-medium/``, ``configs/flux-dev/`` and
``configs/sdxl/`` for the CLIP text towers the three pipelines share) under ``torch.device("meta")``: nothing is
allocated and nothing is downloaded. Counted: parameters plus persistent buffers (SD3's fixed 384 x 384 positional
embedding is a 0.23 B-value buffer that sits in GPU memory too). The trainable parts (LoRA of ``flow.lora``'s
defaults, the flow network ``g_phi`` at the release's size) are fp32 with a gradient and two Adam moments: 16 bytes
per parameter. FLOPs: ``python -m fastnabla.flops --preset sd35-medium-aesthetic`` (:mod:`fastnabla.flops.report`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fastnabla.compat import prepare_third_party_imports
from fastnabla.flops.archs import load_config, strip_meta

GB = 1e9
FLOW_ARCHS = ("sd35-medium", "flux-dev")
TRAINABLE_BYTES = 16  # fp32 weight + gradient + Adam's two moments
AESTHETIC_TOWER = "rewards/aesthetic.json"


def _count(module: nn.Module) -> int:
    """Parameters plus persistent buffers (what a state dict holds and the device keeps)."""
    saved = set(module.state_dict())
    persistent = sum(b.numel() for n, b in module.named_buffers() if n in saved)
    return sum(p.numel() for p in module.parameters()) + persistent


def _transformer(arch: str) -> nn.Module:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    config = strip_meta(load_config(f"{arch}/transformer.json"))
    cls = SD3Transformer2DModel if arch == "sd35-medium" else FluxTransformer2DModel
    return cls.from_config(config)


def _t5() -> nn.Module:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(**strip_meta(load_config("sd35-medium/t5_encoder.json"))))


def _clip(file: str, projection: bool) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(**strip_meta(load_config(file)))
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _lora_parameters(transformer: nn.Module, rank: int, targets: Sequence[str]) -> int:
    """``r (in + out)`` for every ``nn.Linear`` whose name ends with a target (peft's suffix match)."""
    return sum(rank * (m.in_features + m.out_features) for name, m in transformer.named_modules()
               if isinstance(m, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets))


def flow_arch_parts(arch: str) -> dict[str, dict[str, Any]]:
    """``{part: {"values": count, "frozen": bool}}`` of ``arch`` (``sd35-medium`` / ``flux-dev``): the frozen
    transformer, text encoders and VAE, the trainable LoRA (``flow.lora`` defaults) and flow network (release size),
    and the aesthetic reward's CLIP ViT-L/14 image tower (fp32, frozen)."""
    if arch not in FLOW_ARCHS:
        raise ValueError(f"unknown flow-matching architecture {arch!r}; known: {FLOW_ARCHS}")
    prepare_third_party_imports()
    from diffusers import AutoencoderKL
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from fastnabla.tasks.flow.config import TransformerLoRAConfig
    from fastnabla.tasks.sd.config import FlowNetConfig
    from fastnabla.tasks.sd.flow_net import build_flow_net

    lora = TransformerLoRAConfig()
    with torch.device("meta"):
        transformer = _transformer(arch)
        parts: dict[str, dict[str, Any]] = {"transformer": {"values": _count(transformer), "frozen": True}}
        if arch == "sd35-medium":
            parts["CLIP-L text"] = {"values": _count(_clip("sdxl/text_encoder.json", True)), "frozen": True}
            parts["OpenCLIP bigG text"] = {"values": _count(_clip("sdxl/text_encoder_2.json", True)), "frozen": True}
        else:
            parts["CLIP-L text"] = {"values": _count(_clip("sdxl/text_encoder.json", False)), "frozen": True}
        parts["T5-XXL encoder"] = {"values": _count(_t5()), "frozen": True}
        vae = AutoencoderKL.from_config(strip_meta(load_config("sd35-medium/vae.json")))
        parts["VAE"] = {"values": _count(vae), "frozen": True}
        rank, targets = lora.rank, lora.target_modules
        parts[f"LoRA r {rank}"] = {"values": _lora_parameters(transformer, rank, targets), "frozen": False}
        width = int(transformer.config.joint_attention_dim)
        parts["flow network g_phi"] = {"values": _count(build_flow_net(FlowNetConfig(), 16, 64, width)),
                                       "frozen": False}
        tower = CLIPVisionModelWithProjection(CLIPVisionConfig(**load_config(AESTHETIC_TOWER)["clip_vision"]))
        parts["aesthetic reward tower (fp32)"] = {"values": _count(tower), "frozen": False, "fp32_frozen": True}
    return parts


def part_bytes(part: dict[str, Any]) -> float:
    """Bytes a part holds on the device: bf16 frozen weights, fp32 reward, 16 bytes per trainable parameter."""
    if part.get("fp32_frozen"):
        return 4.0 * part["values"]
    return (2.0 if part["frozen"] else float(TRAINABLE_BYTES)) * part["values"]


def memory_markdown() -> str:
    """The table of docs/flow-matching.md: values and device GB (1e9 bytes) per part, with totals."""
    rows = ["| part | SD3.5 Medium | GB | FLUX.1-dev | GB |", "|---|---|---|---|---|"]
    tables = {a: flow_arch_parts(a) for a in FLOW_ARCHS}
    names = list(dict.fromkeys([*tables["sd35-medium"], *tables["flux-dev"]]))

    def cell(arch: str, name: str) -> tuple[str, str]:
        part = tables[arch].get(name)
        if part is None:
            return "—", "—"
        return f"{part['values'] / 1e9:.3f} B", f"{part_bytes(part) / GB:.2f}"

    for name in names:
        rows.append(f"| {name} | {' | '.join(' | '.join(cell(a, name)) for a in FLOW_ARCHS)} |")
    totals = [f"{sum(part_bytes(p) for p in tables[a].values()) / GB:.2f}" for a in FLOW_ARCHS]
    rows.append(f"| everything held | | {totals[0]} | | {totals[1]} |")
    return "\n".join(rows) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args not in ([], ["--markdown"]):
        print("usage: python -m fastnabla.flops.flow_params [--markdown]", file=sys.stderr)
        return 2
    print(memory_markdown(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
