"""Loading the parts of a diffusers SD3 / SD3.5 or FLUX.1 pipeline the flow-matching task uses.

Parts by family (folders of the ``save_pretrained`` layout):

* ``sd3`` (``StableDiffusion3Pipeline``): ``transformer/`` (``SD3Transformer2DModel``), ``vae/``, ``text_encoder/``
  and ``text_encoder_2/`` (``CLIPTextModelWithProjection``: CLIP-L, OpenCLIP bigG), ``text_encoder_3/``
  (``T5EncoderModel``; skipped with ``flow.use_t5=false``), ``tokenizer/``, ``tokenizer_2/`` (CLIP),
  ``tokenizer_3/`` (T5), ``scheduler/``;
* ``flux`` (``FluxPipeline``): ``transformer/`` (``FluxTransformer2DModel``), ``vae/``, ``text_encoder/``
  (``CLIPTextModel``), ``text_encoder_2/`` (``T5EncoderModel``), ``tokenizer/`` (CLIP), ``tokenizer_2/`` (T5),
  ``scheduler/``.

A local directory is checked first and a missing part gets one error listing every missing file; a hub id is
fetched part by part (``HF_HUB_OFFLINE=1`` respected: only the local hub cache). The gated FLUX.1-dev and SD3.5
repositories need an accepted licence and a token on the hub side.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastnabla.compat import prepare_third_party_imports
from fastnabla.tasks.sd.loading import (
    DIFFUSERS_WEIGHTS,
    TRANSFORMERS_WEIGHTS,
    hub_offline,
    looks_like_hub_id,
    with_variant,
)
from fastnabla.tasks.sd.tokenizer import check_tokenizer

FLUX_DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size (1024 px)
PIPELINE_CLASSES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
# (folder, kind) of every part, in the order FlowComponents keeps the text encoders and tokenizers
_TEXT_PARTS = {
    "sd3": [("text_encoder", "clip"), ("text_encoder_2", "clip"), ("text_encoder_3", "t5")],
    "flux": [("text_encoder", "clip"), ("text_encoder_2", "t5")],
}


@dataclass
class FlowComponents:
    """The frozen parts of an SD3 or FLUX pipeline (no LoRA yet). ``text_encoders`` / ``tokenizers``: SD3
    ``[CLIP-L, CLIP-G, T5 or None]``, FLUX ``[CLIP-L, T5]``."""

    family: str
    transformer: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    scheduler_config: dict[str, Any]
    source: str = field(default="")
    default_sample_size: int = 128  # the pipelines' default latent size (1024 px at VAE factor 8)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel: ``2 ** (number of VAE blocks - 1)`` (8 for SD3 and FLUX)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        """Channels of the (unpacked) latents: 16 for SD3 and FLUX."""
        return int(self.vae.config.latent_channels)

    @property
    def patch_multiple(self) -> int:
        """Latent height and width must be multiples of this: SD3's patch size, FLUX's 2x2 packing."""
        return int(self.transformer.config.patch_size) if self.family == "sd3" else 2

    @property
    def text_width(self) -> int:
        """Width of the token embeddings the transformer cross-attends (``joint_attention_dim``: 4096 for both)."""
        return int(self.transformer.config.joint_attention_dim)


def _index_class(root: Path) -> str | None:
    try:
        return json.loads((root / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError):
        return None


def missing_pipeline_files(root: str | Path, family: str, variant: str = "", use_t5: bool = True) -> list[str]:
    """What an SD3 or FLUX pipeline directory lacks (empty when complete), one readable item each."""
    root = Path(root)
    missing: list[str] = []

    def need(rel: str) -> None:
        if not (root / rel).is_file():
            missing.append(rel)

    def weights(folder: str, names: tuple[str, ...]) -> None:
        need(f"{folder}/config.json")
        candidates = [c for n in names for c in (with_variant(n, variant), with_variant(f"{n}.index.json", variant))]
        if not any((root / folder / c).is_file() for c in candidates):
            what = "weights" + (f" of variant {variant!r}" if variant else "")
            missing.append(f"{folder}/ {what} (one of {', '.join(candidates)})")

    need("model_index.json")
    weights("transformer", DIFFUSERS_WEIGHTS)
    weights("vae", DIFFUSERS_WEIGHTS)
    for folder, kind in _TEXT_PARTS[family]:
        if kind == "t5" and not use_t5:
            continue
        weights(folder, TRANSFORMERS_WEIGHTS)
        tok = root / folder.replace("text_encoder", "tokenizer")
        if kind == "clip":
            ok = (tok / "tokenizer.json").is_file() or (
                (tok / "vocab.json").is_file() and (tok / "merges.txt").is_file())
            if not ok:
                missing.append(f"{tok.name}/ files: tokenizer.json, or vocab.json + merges.txt")
        elif not ((tok / "tokenizer.json").is_file() or (tok / "spiece.model").is_file()):
            missing.append(f"{tok.name}/ files: tokenizer.json or spiece.model (the T5 tokenizer)")
    need("scheduler/scheduler_config.json")
    return missing


def resolve_model_source(model: str, family: str, variant: str = "", revision: str = "", use_t5: bool = True,
                         field_name: str = "flow.model") -> tuple[str, bool]:
    """``(source, is_local)`` of ``model`` without loading anything.

    Raises:
        FileNotFoundError: a local directory that does not exist or misses files (all listed), or a hub id with
            ``HF_HUB_OFFLINE`` set and no cached copy.
        ValueError: a local pipeline of another family (its ``model_index.json`` names the class).
    """
    path = Path(model).expanduser()
    if path.is_dir():
        cls = _index_class(path)
        if cls is not None and cls != PIPELINE_CLASSES[family]:
            raise ValueError(f"{field_name}={model!r} is a {cls}, but flow.family={family!r} needs a "
                             f"{PIPELINE_CLASSES[family]}")
        missing = missing_pipeline_files(path, family, variant, use_t5)
        if missing:
            raise FileNotFoundError(f"{field_name}={model!r}: the {PIPELINE_CLASSES[family]} directory is incomplete; "
                                    "missing: " + "; ".join(missing))
        return str(path), True
    if looks_like_hub_id(model):
        if hub_offline():
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(model, "model_index.json", revision=revision or None), str):
                raise FileNotFoundError(
                    f"{field_name}={model!r}: HF_HUB_OFFLINE is set and the local hub cache has no copy of this "
                    "pipeline: pass a local pipeline directory (the save_pretrained layout), or download it first "
                    "(gated models need an accepted licence and a token)")
        return model, False
    raise FileNotFoundError(f"{field_name}={model!r}: no such model directory (and not a hub id 'org/name')")


def load_components(model: str, family: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                    revision: str = "", variant: str = "", use_t5: bool = True,
                    field_name: str = "flow.model") -> FlowComponents:
    """Load every part of ``model`` (not a tiny name) in ``dtype`` (tokenizers aside), frozen, on ``device``.

    Raises:
        FileNotFoundError / ValueError: as :func:`resolve_model_source`.
        OSError: a hub id that cannot be fetched (offline, unknown id, no access), naming the field.
    """
    source, local = resolve_model_source(model, family, variant, revision, use_t5, field_name)
    try:
        return _load_parts(source, family, dtype, torch.device(device), revision or None, variant or None, local,
                           use_t5)
    except OSError as err:
        if local:
            raise
        offline = " HF_HUB_OFFLINE is set, so only the local hub cache was searched." if hub_offline() else ""
        raise OSError(f"{field_name}={model!r}: could not load the pipeline from the hub.{offline} Pass a local "
                      f"pipeline directory instead (the save_pretrained layout). Cause: {err}") from err


def _load_parts(source: str, family: str, dtype: torch.dtype, device: torch.device, revision: str | None,
                variant: str | None, local: bool, use_t5: bool) -> FlowComponents:
    prepare_third_party_imports()
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    kw: dict[str, Any] = {"torch_dtype": dtype, "variant": variant}
    hub: dict[str, Any] = {} if local else {"revision": revision, "local_files_only": hub_offline()}
    transformer_cls = SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel
    transformer = transformer_cls.from_pretrained(source, subfolder="transformer", **kw, **hub)
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **kw, **hub)
    encoders: list[Any] = []
    tokenizers: list[Any] = []
    for folder, kind in _TEXT_PARTS[family]:
        tok_folder = folder.replace("text_encoder", "tokenizer")
        if kind == "t5" and not use_t5:
            encoders.append(None)
            tokenizers.append(None)
            continue
        if kind == "t5":
            encoders.append(T5EncoderModel.from_pretrained(source, subfolder=folder, **kw, **hub))
            tokenizers.append(T5TokenizerFast.from_pretrained(source, subfolder=tok_folder, **hub))
        else:
            cls = CLIPTextModelWithProjection if family == "sd3" else CLIPTextModel
            encoders.append(cls.from_pretrained(source, subfolder=folder, **kw, **hub))
            tokenizers.append(CLIPTokenizer.from_pretrained(source, subfolder=tok_folder, **hub))
        check_tokenizer(tokenizers[-1], f"{source}/{tok_folder}")
    scheduler_config = dict(FlowMatchEulerDiscreteScheduler.load_config(source, subfolder="scheduler", **hub))
    for module in (transformer, vae, *(e for e in encoders if e is not None)):
        module.to(device).eval().requires_grad_(False)
    sample_size = int(transformer.config.sample_size) if family == "sd3" else FLUX_DEFAULT_SAMPLE_SIZE
    return FlowComponents(family, transformer, vae, encoders, tokenizers, scheduler_config, source,
                          default_sample_size=sample_size)
