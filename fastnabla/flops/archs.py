"""The real architectures the FLOP counter builds (weights on the meta device): configs shipped as data.

``fastnabla/flops/configs/`` holds, as JSON, the configs of

* ``sd15/``: Stable Diffusion 1.5's UNet, VAE and CLIP ViT-L/14 text encoder (the diffusers/transformers
  ``config.json`` files of ``stable-diffusion-v1-5/stable-diffusion-v1-5``);
* ``sdxl/``: SDXL base 1.0's UNet, VAE and both text encoders (``stabilityai/stable-diffusion-xl-base-1.0``);
* ``rewards/``: the reward models -- ``aesthetic`` (CLIP ViT-L/14 image tower + the LAION MLP), ``hpsv2`` (open_clip
  ViT-H-14, also HPSv2.1) and ``imagereward`` (BLIP ViT-L/16 + BERT-base with cross-attention);
* ``flow/release.json``: the authors' release's flow network ``g_phi``;
* ``sd35-medium/`` and ``flux-dev/``: the transformers of SD3.5 Medium and FLUX.1-dev, the T5-XXL encoder and the
  16-channel VAE both use (``sd35-medium/t5_encoder.json``, ``sd35-medium/vae.json``; the CLIP text towers are
  ``sdxl/``'s). Their ``ArchSpec`` has ``family`` ``sd3`` / ``flux`` and holds the transformer's config where a UNet
  pipeline's holds the UNet's.
* ``sd15/taesd.json``, ``sdxl/taesd.json``: the forward-looking surrogate decoder (``method.fl_decoder=surrogate``),
  TAESD's diffusers ``AutoencoderTiny`` (``madebyollin/taesd``, ``madebyollin/taesdxl``).

Each file names where it came from in its ``_source`` key (keys starting with ``_`` are metadata; diffusers ignores
them). An architecture can also be read from a local diffusers pipeline directory (``unet/``, ``vae/``,
``text_encoder*/config.json``) or taken from the built-in tiny pipeline (``tiny``), so the counter follows whatever
``sd.model`` points at. Builders create modules under ``torch.device(device)``: on ``"meta"`` nothing is allocated
and a forward runs in milliseconds per layer, which is all a FLOP count needs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastnabla.compat import prepare_third_party_imports

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
ARCHS = ("sd15", "sdxl", "tiny", "tiny-sdxl", "sd35-medium", "flux-dev", "tiny-sd3", "tiny-flux")
FLOW_ARCHS = {"sd35-medium": "sd3", "flux-dev": "flux", "tiny-sd3": "sd3", "tiny-flux": "flux"}
DEFAULT_T5_TOKENS = {"sd3": 256, "flux": 512}  # the pipelines' max_sequence_length
LEARNED_REWARDS = {"aesthetic": "aesthetic", "hpsv2": "hpsv2", "hpsv2.1": "hpsv2", "imagereward": "imagereward"}


def load_config(relative: str) -> dict[str, Any]:
    """A shipped JSON config (``"sd15/unet.json"``), metadata keys included."""
    path = CONFIG_DIR / relative
    if not path.is_file():
        raise FileNotFoundError(f"no shipped FLOP config {relative!r} (looked in {CONFIG_DIR})")
    return json.loads(path.read_text())


def strip_meta(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` without its metadata keys (``_source``, ``_class_name``, ...)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


@dataclass
class ArchSpec:
    """A Stable Diffusion architecture: diffusers configs of UNet and VAE, transformers configs of the text encoders.

    Flow-matching models (``family`` ``sd3`` / ``flux``) keep their transformer's config in ``unet`` (the denoiser's
    slot) and ``t5_tokens`` T5 tokens per prompt (the transformer reads 77 CLIP + T5 tokens for SD3, T5 tokens only
    for FLUX)."""

    name: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoders: list[dict[str, Any]] = field(default_factory=list)
    source: str = ""
    family: str = "unet"
    t5_tokens: int = 0

    @property
    def vae_factor(self) -> int:
        """Pixels per latent along a side (8 for SD: one downsampling per VAE level but the last)."""
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def latent_channels(self) -> int:
        """Channels of the (unpacked) latents: FLUX's transformer reads them packed 2x2 (``in_channels`` 64)."""
        return int(self.unet.get("in_channels", 4)) // (4 if self.family == "flux" else 1)

    @property
    def default_resolution(self) -> int:
        return int(self.unet.get("sample_size", 128)) * self.vae_factor  # FluxPipeline: 128 (no sample_size)

    @property
    def text_width(self) -> int:
        """Width of the prompt embeddings the denoiser cross-attends to."""
        return int(self.unet["joint_attention_dim" if self.family != "unet" else "cross_attention_dim"])

    @property
    def text_length(self) -> int:
        """Prompt tokens the denoiser (and the flow network) reads."""
        clip = int(self.text_encoders[0].get("max_position_embeddings", 77)) if self.text_encoders else 77
        if self.family == "flux":
            return self.t5_tokens
        return clip + self.t5_tokens if self.family == "sd3" else clip

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        if resolution % self.vae_factor:
            raise ValueError(f"resolution {resolution} is not a multiple of the VAE factor {self.vae_factor}")
        side = resolution // self.vae_factor
        return (self.latent_channels, side, side)

    def describe(self) -> dict[str, Any]:
        """The fields a report needs (JSON-serialisable)."""
        out = {"name": self.name, "source": self.source, "family": self.family,
               "cross_attention_dim": self.text_width, "default_resolution": self.default_resolution}
        if self.family == "unet":
            out["unet_block_out_channels"] = self.unet["block_out_channels"]
        else:
            out.update(transformer_class=self.unet.get("_class_name", ""), prompt_tokens=self.text_length)
        return out


@functools.cache
def _shipped_arch(name: str) -> ArchSpec:
    files = sorted(p.name for p in (CONFIG_DIR / name).glob("text_encoder*.json"))
    encoders = [load_config(f"{name}/{f}") for f in files]
    unet = load_config(f"{name}/unet.json")
    return ArchSpec(name, unet, load_config(f"{name}/vae.json"), encoders, unet.get("_source", ""))


@functools.cache
def _tiny_arch(name: str = "tiny") -> ArchSpec:
    from fastnabla.tasks.sd.tiny import build_tiny

    family = "sdxl" if name == "tiny-sdxl" else "sd"
    parts = build_tiny(family, 0, torch.float32, "cpu")  # ~0.4 s: the configs come from the real classes
    encoders = []
    for encoder in (parts.text_encoder, parts.text_encoder_2):
        if encoder is not None:
            text = encoder.config.to_dict()
            text["architectures"] = [type(encoder).__name__]
            encoders.append(text)
    builder = "build_tiny_sdxl_components" if family == "sdxl" else "build_tiny_components"
    return ArchSpec(name, dict(parts.unet.config), dict(parts.vae.config), encoders,
                    f"fastnabla.tasks.sd.tiny.{builder}")


def _shipped_flow_arch(name: str, t5_tokens: int) -> ArchSpec:
    family = FLOW_ARCHS[name]
    transformer = load_config(f"{name}/transformer.json")
    clip_l = {**load_config("sdxl/text_encoder.json"),
              "architectures": ["CLIPTextModelWithProjection" if family == "sd3" else "CLIPTextModel"]}
    encoders = [clip_l]
    if family == "sd3":
        encoders.append({**load_config("sdxl/text_encoder_2.json"), "architectures": ["CLIPTextModelWithProjection"]})
    encoders.append(load_config("sd35-medium/t5_encoder.json"))
    return ArchSpec(name, transformer, load_config("sd35-medium/vae.json"), encoders, transformer.get("_source", ""),
                    family, t5_tokens)


def _tiny_flow_arch(name: str, t5_tokens: int) -> ArchSpec:
    from fastnabla.tasks.flow.tiny import build_tiny_components

    family = FLOW_ARCHS[name]
    parts = build_tiny_components(family, 0, torch.float32, "cpu")
    encoders = []
    for encoder in parts.text_encoders:
        config = encoder.config.to_dict()
        config["architectures"] = [type(encoder).__name__]
        config["_class_name"] = type(encoder).__name__
        encoders.append(config)
    transformer = {**dict(parts.transformer.config), "_class_name": type(parts.transformer).__name__}
    return ArchSpec(name, transformer, dict(parts.vae.config), encoders, "fastnabla.tasks.flow.tiny", family,
                    t5_tokens)


def load_flow_arch(name: str, t5_tokens: int = 0) -> ArchSpec:
    """``sd35-medium`` / ``flux-dev`` (shipped configs), ``tiny-sd3`` / ``tiny-flux`` or a local SD3 / FLUX pipeline
    directory, reading ``t5_tokens`` T5 tokens per prompt (0: the pipeline's default, 256 / 512)."""
    path = Path(name).expanduser()
    if name not in FLOW_ARCHS and path.is_dir():
        index = json.loads((path / "model_index.json").read_text()) if (path / "model_index.json").is_file() else {}
        family = "flux" if index.get("_class_name") == "FluxPipeline" else "sd3"
        base = _directory_arch(path)
        return dataclasses.replace(base, family=family, t5_tokens=t5_tokens or DEFAULT_T5_TOKENS[family])
    if name not in FLOW_ARCHS:
        raise ValueError(f"unknown flow-matching architecture {name!r}: use one of {tuple(FLOW_ARCHS)} or a local "
                         "SD3 / FLUX pipeline directory")
    tokens = t5_tokens or DEFAULT_T5_TOKENS[FLOW_ARCHS[name]]
    return (_tiny_flow_arch if name.startswith("tiny-") else _shipped_flow_arch)(name, tokens)


def flow_arch_for_model(model: str, family: str) -> str:
    """The architecture ``flow.model`` points at: the tiny pipelines, a local directory, else the shipped
    ``flux-dev`` / ``sd35-medium`` of ``family``."""
    if model in ("tiny-sd3", "tiny-flux"):
        return model
    path = Path(model).expanduser()
    if path.is_dir() and (path / "transformer" / "config.json").is_file():
        return str(path)
    return "flux-dev" if family == "flux" else "sd35-medium"


def _directory_arch(directory: Path) -> ArchSpec:
    def read(sub: str) -> dict[str, Any]:
        path = directory / sub / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{directory} is not a diffusers pipeline directory: {path} is missing")
        return json.loads(path.read_text())

    encoders = [read(p.name) for p in sorted(directory.glob("text_encoder*")) if (p / "config.json").is_file()]
    denoiser = "transformer" if (directory / "transformer" / "config.json").is_file() else "unet"
    return ArchSpec(directory.name, read(denoiser), read("vae"), encoders, str(directory))


def load_arch(name: str) -> ArchSpec:
    """``sd15``, ``sdxl`` (shipped configs), ``tiny`` / ``tiny-sdxl`` (the built-in tiny pipelines) or a local
    pipeline directory."""
    if name in ("sd15", "sdxl"):
        return _shipped_arch(name)
    if name in ("tiny", "tiny-sdxl"):
        return _tiny_arch(name)
    path = Path(name).expanduser()
    if path.is_dir():
        return _directory_arch(path)
    raise ValueError(f"unknown architecture {name!r}: use one of {ARCHS} or a local diffusers pipeline directory")


def arch_for_model(model: str) -> str:
    """The architecture ``sd.model`` points at: ``tiny`` / ``tiny-sdxl``, a local directory, ``sdxl`` for hub ids
    naming XL, else ``sd15`` (the presets' Stable Diffusion 1.5)."""
    if model in ("tiny", "tiny-sdxl"):
        return model
    if Path(model).expanduser().is_dir() and (Path(model).expanduser() / "unet" / "config.json").is_file():
        return str(Path(model).expanduser())
    return "sdxl" if "xl" in model.lower() else "sd15"


# ----------------------------------------------------------------------------- builders (any device)


def build_unet(arch: ArchSpec, device: str | torch.device = "meta") -> nn.Module:
    """The denoiser: ``UNet2DConditionModel``, or the ``SD3Transformer2DModel`` / ``FluxTransformer2DModel`` of a
    flow-matching architecture."""
    prepare_third_party_imports()
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    cls = {"unet": UNet2DConditionModel, "sd3": SD3Transformer2DModel, "flux": FluxTransformer2DModel}[arch.family]
    with torch.device(device):
        return cls.from_config(strip_meta(arch.unet)).eval()


def build_vae(arch: ArchSpec, device: str | torch.device = "meta") -> nn.Module:
    prepare_third_party_imports()
    from diffusers import AutoencoderKL

    with torch.device(device):
        return AutoencoderKL.from_config(arch.vae).eval()


def fl_surrogate_config(arch: ArchSpec, source: str = "") -> dict[str, Any]:
    """The ``AutoencoderTiny`` config of the forward-looking surrogate decoder ``sd.fl_surrogate_decoder=source``: a
    local directory's ``config.json``, else TAESD's shipped config for ``sd15`` / ``sdxl`` (any hub id: the counter
    reads no hub), else (tiny architectures) :func:`fastnabla.tasks.sd.loading.tiny_fl_surrogate_config` of the VAE.
    """
    path = Path(source).expanduser() if source else None
    if path is not None and (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text())
    if arch.name in ("sd15", "sdxl"):
        return load_config(f"{arch.name}/taesd.json")
    from fastnabla.tasks.sd.loading import tiny_fl_surrogate_config

    return tiny_fl_surrogate_config(arch.vae)


def build_fl_surrogate(config: dict[str, Any], device: str | torch.device = "meta") -> nn.Module:
    prepare_third_party_imports()
    from diffusers import AutoencoderTiny

    with torch.device(device):
        return AutoencoderTiny.from_config(strip_meta(config)).eval()


def build_text_encoder(config: dict[str, Any], device: str | torch.device = "meta") -> nn.Module:
    prepare_third_party_imports()
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    if config.get("_class_name") == "T5EncoderModel" or "T5EncoderModel" in config.get("architectures", []):
        with torch.device(device):
            return T5EncoderModel(T5Config(**strip_meta(config))).eval()
    cls = CLIPTextModelWithProjection if "CLIPTextModelWithProjection" in config.get("architectures", []) else \
        CLIPTextModel
    with torch.device(device):
        return cls(CLIPTextConfig(**strip_meta(config))).eval()


def build_flow_unet(kwargs: dict[str, Any], device: str | torch.device = "meta") -> nn.Module:
    """A flow network from diffusers ``UNet2DConditionModel`` keyword arguments (``flow/release.json``)."""
    prepare_third_party_imports()
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel(**strip_meta(kwargs))


class _MaskFreeImageReward(nn.Module):
    """ImageReward's score without the prompt attention mask. transformers decides from the mask's *values* whether
    it can skip it (``mask.all()``), which a meta tensor cannot answer; prompts are padded to a fixed length, so the
    matmuls -- and the FLOPs -- are the same with or without it (tested against the real model on CPU)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        original = self.model.tokenize

        def unmasked(p, device):
            ids, _ = original(p, device)
            return ids, None

        self.model.tokenize = unmasked
        try:
            return self.model.score(images, prompts)
        finally:
            del self.model.tokenize


def reward_config(name: str) -> dict[str, Any] | None:
    """The shipped config of a learned reward (``rewards/<kind>.json``); None for analytic rewards."""
    return load_config(f"rewards/{LEARNED_REWARDS[name]}.json") if name in LEARNED_REWARDS else None


def build_reward_model(name: str, device: str | torch.device = "meta", config: dict[str, Any] | None = None,
                       options: dict[str, Any] | None = None) -> nn.Module:
    """The reward model ``name`` (its ``score(images, prompts)``), frozen: learned rewards from ``config`` (default:
    the shipped one, :func:`reward_config`), the others from the registry with ``options`` (analytic rewards; the
    digits classifier, small: built with its weights, then moved to ``device``)."""
    prepare_third_party_imports()
    cfg = config or reward_config(name)
    if cfg is None:
        from fastnabla.rewards.registry import build_reward

        return build_reward(name, **(options or {})).model.requires_grad_(False).eval().to(device)
    with torch.device(device):
        if cfg["kind"] == "aesthetic":
            from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

            from fastnabla.rewards.aesthetic import AestheticReward, TransformersCLIPImageEncoder
            from fastnabla.rewards.mlp_head import PreferenceMLP

            tower = TransformersCLIPImageEncoder(CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg["clip_vision"])))
            model: nn.Module = AestheticReward(tower, PreferenceMLP(cfg["head_input_size"]))
        elif cfg["kind"] == "hps":
            import open_clip
            from open_clip.model import CLIP

            from fastnabla.rewards.hps import HPSReward

            tokenizer = open_clip.get_tokenizer(cfg["open_clip_architecture"])
            model = HPSReward(CLIP(**cfg["open_clip"]), tokenizer, name)
        else:
            from fastnabla.rewards.imagereward import build_imagereward_model, character_wordpiece_tokenizer

            inner = build_imagereward_model(cfg["med_config"], character_wordpiece_tokenizer(), cfg["vision"],
                                            cfg["max_length"])
            model = _MaskFreeImageReward(inner) if torch.device(device).type == "meta" else inner
    return model.requires_grad_(False).eval()
