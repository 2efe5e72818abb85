"""Loading the parts of a diffusers Stable Diffusion 1.x / 2.x pipeline the task uses.

Parts: ``UNet2DConditionModel`` (``unet/``), ``AutoencoderKL`` (``vae/``), ``CLIPTextModel``
(``text_encoder/``), ``CLIPTokenizer`` (``tokenizer/``) and the scheduler config (``scheduler/``), from

* a local pipeline directory (``save_pretrained`` layout): every needed file is checked first, and
  a missing or incomplete directory gets one error listing all missing files;
* a hub id (``org/name``), only where the user has a hub: each part is fetched with
  ``from_pretrained(subfolder=...)``. ``HF_HUB_OFFLINE=1`` is respected (only the local hub cache is
  used), and a failure says so;
* ``"tiny"``: the built-in tiny random pipeline (:mod:`fastnabla.tasks.sd.tiny`).

The safety checker and feature extractor of a pipeline are never loaded.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastnabla.compat import prepare_third_party_imports
from fastnabla.tasks.sd.tokenizer import check_tokenizer

DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class SDComponents:
    """The frozen parts of a Stable Diffusion pipeline (no LoRA yet)."""

    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any  # diffusers.AutoencoderKL
    text_encoder: Any  # transformers.CLIPTextModel
    tokenizer: Any  # transformers.CLIPTokenizer
    scheduler_config: dict[str, Any]
    source: str = field(default="")

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel: ``2 ** (number of VAE blocks - 1)`` (8 for Stable Diffusion)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def text_width(self) -> int:
        """Width ``D`` of the prompt embeddings ``[n, 77, D]`` (768 for SD 1.x, 1024 for SD 2.x)."""
        return int(self.text_encoder.config.hidden_size)


def with_variant(filename: str, variant: str) -> str:
    """``diffusion_pytorch_model.safetensors`` + ``fp16`` -> ``diffusion_pytorch_model.fp16.safetensors``
    (the variant goes before the last suffix, as diffusers and transformers name variant files)."""
    if not variant:
        return filename
    stem, _, suffix = filename.rpartition(".")
    return f"{stem}.{variant}.{suffix}"


def _weight_candidates(names: tuple[str, ...], variant: str) -> list[str]:
    out = []
    for name in names:
        out += [with_variant(name, variant), with_variant(f"{name}.index.json", variant)]
    return out


def missing_pipeline_files(root: str | Path, variant: str = "") -> list[str]:
    """What a Stable Diffusion pipeline directory lacks (empty when complete), one readable item each."""
    root = Path(root)
    missing: list[str] = []

    def need(rel: str) -> None:
        if not (root / rel).is_file():
            missing.append(rel)

    def need_one(folder: str, candidates: list[str], what: str) -> None:
        if not any((root / folder / c).is_file() for c in candidates):
            missing.append(f"{folder}/ {what} (one of {', '.join(candidates)})")

    need("model_index.json")
    weights = "weights" + (f" of variant {variant!r}" if variant else "")
    parts = {"unet": DIFFUSERS_WEIGHTS, "vae": DIFFUSERS_WEIGHTS, "text_encoder": TRANSFORMERS_WEIGHTS}
    for folder, names in parts.items():
        need(f"{folder}/config.json")
        need_one(folder, _weight_candidates(names, variant), weights)
    tok = root / "tokenizer"
    slow_files = (tok / "vocab.json").is_file() and (tok / "merges.txt").is_file()
    if not (tok / "tokenizer.json").is_file() and not slow_files:
        absent = [f for f in ("vocab.json", "merges.txt") if not (tok / f).is_file()]
        missing.append(f"tokenizer/ files: tokenizer.json, or vocab.json + merges.txt (missing {', '.join(absent)})")
    need("scheduler/scheduler_config.json")
    return missing


def looks_like_hub_id(name: str) -> bool:
    """``org/name`` or ``name`` without path syntax (``./``, ``~``, absolute paths, several slashes)."""
    return bool(_HUB_ID.match(name)) and not name.startswith((".", "~"))


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "on", "yes")


def resolve_model_source(
    model: str, variant: str = "", field_name: str = "sd.model", revision: str = ""
) -> tuple[str, bool]:
    """``(source, is_local)`` of ``model`` without loading anything: a complete local pipeline directory or a hub
    id. Cheap, so a run checks its model before anything else.

    Raises:
        FileNotFoundError: a local directory that does not exist or misses files (all listed).
    """
    path = Path(model).expanduser()
    if path.is_dir():
        missing = missing_pipeline_files(path, variant)
        if missing:
            raise FileNotFoundError(
                f"{field_name}={model!r}: the Stable Diffusion pipeline directory is incomplete; missing: "
                + "; ".join(missing)
            )
        return str(path), True
    if looks_like_hub_id(model):
        if hub_offline():
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(model, "model_index.json", revision=revision or None), str):
                raise FileNotFoundError(
                    f"{field_name}={model!r}: HF_HUB_OFFLINE is set and the local hub cache has no copy of this "
                    "pipeline: pass a local pipeline directory (the save_pretrained layout), or download it first")
        return model, False
    raise FileNotFoundError(f"{field_name}={model!r}: no such model directory (and not a hub id 'org/name')")


def load_components(
    model: str,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    revision: str = "",
    variant: str = "",
    field_name: str = "sd.model",
) -> SDComponents:
    """Load UNet, VAE, text encoder, tokenizer and scheduler config of ``model`` (not ``"tiny"``).

    Frozen weights are loaded in ``dtype``, moved to ``device``, set to eval mode and
    ``requires_grad_(False)``.

    Raises:
        FileNotFoundError: a local directory that does not exist or misses files (all listed).
        OSError: a hub id that cannot be fetched (offline, unknown id, no access).
    """
    source, local = resolve_model_source(model, variant, field_name, revision)
    try:
        return _load_parts(source, dtype, torch.device(device), revision or None, variant or None, local)
    except OSError as err:
        if local:
            raise
        offline = " HF_HUB_OFFLINE is set, so only the local hub cache was searched." if hub_offline() else ""
        raise OSError(
            f"{field_name}={model!r}: could not load the pipeline from the hub.{offline} Pass a local pipeline "
            f"directory instead (the save_pretrained layout). Cause: {err}"
        ) from err


def _load_parts(
    source: str, dtype: torch.dtype, device: torch.device, revision: str | None, variant: str | None, local: bool
) -> SDComponents:
    prepare_third_party_imports()
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kw: dict[str, Any] = {"torch_dtype": dtype, "variant": variant}
    hub: dict[str, Any] = {} if local else {"revision": revision, "local_files_only": hub_offline()}
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kw, **hub)
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **kw, **hub)
    text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kw, **hub)
    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **hub)
    check_tokenizer(tokenizer, f"{source}/tokenizer")
    scheduler_config = dict(DDIMScheduler.load_config(source, subfolder="scheduler", **hub))
    for module in (unet, vae, text_encoder):
        module.to(device).eval().requires_grad_(False)
    return SDComponents(unet, vae, text_encoder, tokenizer, scheduler_config, source)
