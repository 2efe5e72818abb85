"""Loading the parts of a diffusers Stable Diffusion 1.x / 2.x or SDXL pipeline the task uses.

Parts: ``UNet2DConditionModel`` (``unet/``), ``AutoencoderKL`` (``vae/``), ``CLIPTextModel``
(``text_encoder/``), ``CLIPTokenizer`` (``tokenizer/``) and the scheduler config (``scheduler/``); SDXL adds
the OpenCLIP bigG ``CLIPTextModelWithProjection`` (``text_encoder_2/``) and its tokenizer (``tokenizer_2/``).
The family comes from ``model_index.json`` (``_class_name``: ``StableDiffusionPipeline`` or
``StableDiffusionXLPipeline``; without one, a ``text_encoder_2`` entry means SDXL); any other pipeline class is
an error naming it. Parts come from

* a local pipeline directory (``save_pretrained`` layout): every needed file is checked first, and
  a missing or incomplete directory gets one error listing all missing files;
* a hub id (``org/name``), only where the user has a hub: each part is fetched with
  ``from_pretrained(subfolder=...)``. ``HF_HUB_OFFLINE=1`` is respected (only the local hub cache is
  used), and a failure says so;
* ``"tiny"``: the built-in tiny random pipeline (:mod:`fastnabla.tasks.sd.tiny`).

The safety checker and feature extractor of a pipeline are never loaded.
"""

from __future__ import annotations

import json
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
PIPELINE_FAMILIES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl"}
FAMILY_NAMES = {"sd": "Stable Diffusion 1.x / 2.x", "sdxl": "SDXL"}


@dataclass
class SDComponents:
    """The frozen parts of a Stable Diffusion pipeline (no LoRA yet)."""

    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any  # diffusers.AutoencoderKL
    text_encoder: Any  # transformers.CLIPTextModel
    tokenizer: Any  # transformers.CLIPTokenizer
    scheduler_config: dict[str, Any]
    source: str = field(default="")
    text_encoder_2: Any = None  # SDXL: transformers.CLIPTextModelWithProjection (OpenCLIP bigG + projection)
    tokenizer_2: Any = None  # SDXL: its CLIPTokenizer (pads with "!")
    force_zeros_for_empty_prompt: bool = True  # SDXL: model_index.json's flag (the pipeline class's default: true)

    @property
    def family(self) -> str:
        """``sdxl`` when the pipeline has the second text encoder, else ``sd``."""
        return "sdxl" if self.text_encoder_2 is not None else "sd"

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel: ``2 ** (number of VAE blocks - 1)`` (8 for Stable Diffusion)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def text_width(self) -> int:
        """Width ``D`` of the prompt embeddings ``[n, 77, D]`` (768 for SD 1.x, 1024 for SD 2.x; SDXL: both
        encoders' widths concatenated, 768 + 1280 = 2048)."""
        width = int(self.text_encoder.config.hidden_size)
        if self.text_encoder_2 is not None:
            width += int(self.text_encoder_2.config.hidden_size)
        return width

    @property
    def pooled_width(self) -> int:
        """SDXL: width of the pooled prompt embedding (``text_encoder_2``'s projection, 1280); 0 otherwise."""
        return int(self.text_encoder_2.config.projection_dim) if self.text_encoder_2 is not None else 0


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


def family_of_index(index: dict[str, Any], where: str) -> str:
    """``sd`` or ``sdxl`` from a ``model_index.json`` mapping.

    Raises:
        ValueError: a pipeline class this task does not load (named, with the supported ones).
    """
    cls = index.get("_class_name")
    if cls is None:
        family = "sdxl" if index.get("text_encoder_2") else "sd"
    elif cls in PIPELINE_FAMILIES:
        family = PIPELINE_FAMILIES[cls]
    else:
        raise ValueError(
            f"{where}: model_index.json names the pipeline class {cls!r}, which the Stable Diffusion task does not "
            f"load; supported: StableDiffusionPipeline (SD 1.x / 2.x) and StableDiffusionXLPipeline (SDXL base; not "
            f"the refiner, which has no CLIP ViT-L text encoder)")
    if family == "sdxl" and not (index.get("text_encoder") or [None])[0]:
        raise ValueError(f"{where}: an SDXL pipeline without text_encoder (CLIP ViT-L) is not supported (the SDXL "
                         "refiner); use the base model")
    return family


def pipeline_family(root: str | Path) -> str:
    """``sd`` or ``sdxl`` of a local pipeline directory: ``model_index.json``, else the presence of
    ``text_encoder_2/``.

    Raises:
        ValueError: an unsupported pipeline class, or an unreadable ``model_index.json``.
    """
    root = Path(root)
    index = root / "model_index.json"
    if not index.is_file():
        return "sdxl" if (root / "text_encoder_2").is_dir() else "sd"
    try:
        info = json.loads(index.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{index}: not a readable model_index.json ({err})") from err
    return family_of_index(info, str(root))


def missing_pipeline_files(root: str | Path, variant: str = "", family: str | None = None) -> list[str]:
    """What a Stable Diffusion (``family`` ``sd``) or SDXL pipeline directory lacks (empty when complete), one
    readable item each; ``family`` None: :func:`pipeline_family`."""
    root = Path(root)
    family = family or pipeline_family(root)
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
    if family == "sdxl":
        parts["text_encoder_2"] = TRANSFORMERS_WEIGHTS
    for folder, names in parts.items():
        need(f"{folder}/config.json")
        need_one(folder, _weight_candidates(names, variant), weights)
    for folder in ("tokenizer", "tokenizer_2") if family == "sdxl" else ("tokenizer",):
        tok = root / folder
        slow_files = (tok / "vocab.json").is_file() and (tok / "merges.txt").is_file()
        if not (tok / "tokenizer.json").is_file() and not slow_files:
            absent = [f for f in ("vocab.json", "merges.txt") if not (tok / f).is_file()]
            missing.append(f"{folder}/ files: tokenizer.json, or vocab.json + merges.txt (missing {', '.join(absent)})")
    need("scheduler/scheduler_config.json")
    return missing


def looks_like_hub_id(name: str) -> bool:
    """``org/name`` or ``name`` without path syntax (``./``, ``~``, absolute paths, several slashes)."""
    return bool(_HUB_ID.match(name)) and not name.startswith((".", "~"))


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "on", "yes")


def check_family(found: str, wanted: str, where: str) -> str:
    """``found`` if ``wanted`` is ``auto`` or equal, else a ``ValueError`` naming both (``sd.family``)."""
    if wanted not in ("auto", found):
        article = {"sd": "a", "sdxl": "an"}
        raise ValueError(f"sd.family={wanted!r} but {where} is {article[found]} {FAMILY_NAMES[found]} pipeline "
                         f"({found!r}); set sd.family={found!r} or 'auto', or point sd.model at {article[wanted]} "
                         f"{FAMILY_NAMES[wanted]} pipeline")
    return found


def _hub_index(model: str, revision: str) -> dict[str, Any] | None:
    """``model_index.json`` of a hub id from the local hub cache (or the hub when online); None if unavailable."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    path = try_to_load_from_cache(model, "model_index.json", revision=revision or None)
    if not isinstance(path, str) and not hub_offline():
        try:
            path = hf_hub_download(model, "model_index.json", revision=revision or None)
        except Exception:  # noqa: BLE001 -- no access, no network: loading the parts reports it
            return None
    return json.loads(Path(path).read_text()) if isinstance(path, str) else None


def resolve_model_source(
    model: str, variant: str = "", field_name: str = "sd.model", revision: str = "", family: str = "auto"
) -> tuple[str, bool, str]:
    """``(source, is_local, family)`` of ``model`` without loading any weights: a complete local pipeline directory
    or a hub id, and its family (``sd`` or ``sdxl``; ``family`` other than ``auto`` is required). Cheap, so a run
    checks its model before anything else.

    Raises:
        FileNotFoundError: a local directory that does not exist or misses files (all listed).
        ValueError: an unsupported pipeline class, or a family other than the required one.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        found = pipeline_family(path)
        missing = missing_pipeline_files(path, variant, found)
        if missing:
            raise FileNotFoundError(
                f"{field_name}={model!r}: the {FAMILY_NAMES[found]} pipeline directory is incomplete; missing: "
                + "; ".join(missing)
            )
        return str(path), True, check_family(found, family, f"{field_name}={model!r}")
    if looks_like_hub_id(model):
        if hub_offline():
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(model, "model_index.json", revision=revision or None), str):
                raise FileNotFoundError(
                    f"{field_name}={model!r}: HF_HUB_OFFLINE is set and the local hub cache has no copy of this "
                    "pipeline: pass a local pipeline directory (the save_pretrained layout), or download it first")
        index = _hub_index(model, revision)
        found = family_of_index(index, f"{field_name}={model!r}") if index is not None else (
            family if family != "auto" else "sd")
        return model, False, check_family(found, family, f"{field_name}={model!r}")
    raise FileNotFoundError(f"{field_name}={model!r}: no such model directory (and not a hub id 'org/name')")


def vae_dtype_for(dtype: torch.dtype, vae_config: Any, family: str) -> torch.dtype:
    """The VAE's dtype: for SDXL, fp32 where the frozen dtype is fp16 and the VAE config's ``force_upcast`` is set
    (absent: set, diffusers' default) -- SDXL's VAE overflows in fp16, and ``StableDiffusionXLPipeline`` upcasts it to
    decode. Else the frozen dtype: bf16 has fp32's range and is kept, as diffusers keeps it; the fp16-fix SDXL VAE
    sets ``force_upcast: false`` and stays fp16; ``StableDiffusionPipeline`` (SD 1.x / 2.x) never upcasts."""
    config = vae_config if isinstance(vae_config, dict) else dict(vae_config)
    force = family == "sdxl" and bool(config.get("force_upcast", True))
    return torch.float32 if dtype == torch.float16 and force else dtype


def resolve_vae_source(vae: str, field_name: str = "sd.vae") -> tuple[str, str | None, bool]:
    """``(source, subfolder, is_local)`` of a replacement VAE: a directory with ``config.json`` + weights, a
    pipeline directory's ``vae/``, or a hub id.

    Raises:
        FileNotFoundError: naming what the directory lacks, or a path that is neither.
    """
    path = Path(vae).expanduser()
    if path.is_dir():
        folder = path if (path / "config.json").is_file() or not (path / "vae").is_dir() else path / "vae"
        missing = [] if (folder / "config.json").is_file() else [f"{folder.name}/config.json"]
        weights = _weight_candidates(DIFFUSERS_WEIGHTS, "")
        if not any((folder / w).is_file() for w in weights):
            missing.append(f"weights (one of {', '.join(weights)})")
        if missing:
            raise FileNotFoundError(f"{field_name}={vae!r}: not a diffusers AutoencoderKL directory; missing: "
                                    + "; ".join(missing))
        return str(path), (None if folder == path else "vae"), True
    if looks_like_hub_id(vae):
        return vae, None, False
    raise FileNotFoundError(f"{field_name}={vae!r}: no such VAE directory (and not a hub id 'org/name')")


def load_components(
    model: str,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    revision: str = "",
    variant: str = "",
    field_name: str = "sd.model",
    family: str = "auto",
    vae: str = "",
) -> SDComponents:
    """Load the parts of ``model`` (not a tiny model name): UNet, VAE, text encoder(s), tokenizer(s) and the
    scheduler config; SDXL pipelines (``sd.family``, detected) also load ``text_encoder_2`` / ``tokenizer_2``.

    Frozen weights are loaded in ``dtype`` (the VAE in fp32 where :func:`vae_dtype_for` says so), moved to
    ``device``, set to eval mode and ``requires_grad_(False)``. ``vae`` replaces the pipeline's VAE
    (:func:`resolve_vae_source`).

    Raises:
        FileNotFoundError: a local directory that does not exist or misses files (all listed).
        ValueError: an unsupported pipeline class, or not the required ``family``.
        OSError: a hub id that cannot be fetched (offline, unknown id, no access).
    """
    source, local, found = resolve_model_source(model, variant, field_name, revision, family)
    vae_source = resolve_vae_source(vae) if vae else None
    try:
        return _load_parts(source, dtype, torch.device(device), revision or None, variant or None, local, found,
                           vae_source)
    except OSError as err:
        if local and (vae_source is None or vae_source[2]):
            raise
        offline = " HF_HUB_OFFLINE is set, so only the local hub cache was searched." if hub_offline() else ""
        what = f"{field_name}={model!r}" + (f" / sd.vae={vae!r}" if vae else "")
        raise OSError(
            f"{what}: could not load the pipeline from the hub.{offline} Pass a local pipeline "
            f"directory instead (the save_pretrained layout). Cause: {err}"
        ) from err


def _load_parts(
    source: str, dtype: torch.dtype, device: torch.device, revision: str | None, variant: str | None, local: bool,
    family: str = "sd", vae_source: tuple[str, str | None, bool] | None = None,
) -> SDComponents:
    prepare_third_party_imports()
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    kw: dict[str, Any] = {"torch_dtype": dtype, "variant": variant}
    hub: dict[str, Any] = {} if local else {"revision": revision, "local_files_only": hub_offline()}
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kw, **hub)
    if vae_source is None:
        vae_at: dict[str, Any] = {"pretrained_model_name_or_path": source, "subfolder": "vae", "variant": variant,
                                  **hub}
    else:
        vae_at = {"pretrained_model_name_or_path": vae_source[0], "subfolder": vae_source[1],
                  **({} if vae_source[2] else {"local_files_only": hub_offline()})}
    vae_config = AutoencoderKL.load_config(**{k: v for k, v in vae_at.items() if k != "variant"})
    vae = AutoencoderKL.from_pretrained(**vae_at, torch_dtype=vae_dtype_for(dtype, vae_config, family))
    text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kw, **hub)
    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **hub)
    check_tokenizer(tokenizer, f"{source}/tokenizer")
    scheduler_config = dict(DDIMScheduler.load_config(source, subfolder="scheduler", **hub))
    extra: dict[str, Any] = {}
    if family == "sdxl":
        extra["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
            source, subfolder="text_encoder_2", **kw, **hub)
        extra["tokenizer_2"] = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **hub)
        check_tokenizer(extra["tokenizer_2"], f"{source}/tokenizer_2")
        index = (json.loads(Path(source, "model_index.json").read_text()) if local
                 else _hub_index(source, revision or ""))
        extra["force_zeros_for_empty_prompt"] = bool((index or {}).get("force_zeros_for_empty_prompt", True))
    for module in (unet, vae, text_encoder, extra.get("text_encoder_2")):
        if module is not None:
            module.to(device).eval().requires_grad_(False)
    return SDComponents(unet, vae, text_encoder, tokenizer, scheduler_config, source, **extra)


def load_fl_surrogate_decoder(source: str, dtype: torch.dtype, device: torch.device | str,
                              field_name: str = "sd.fl_surrogate_decoder") -> Any:
    """The forward-looking surrogate decoder (``method.fl_decoder=surrogate``): a diffusers ``AutoencoderTiny`` from a
    directory (``config.json`` + weights) or a hub id (e.g. ``madebyollin/taesd``), frozen, in ``dtype`` on ``device``.

    Raises:
        FileNotFoundError: a directory missing files (named), or a path that is neither a directory nor a hub id.
        ValueError: the directory holds another class than ``AutoencoderTiny``.
        OSError: a hub id that cannot be loaded (offline and not in the local hub cache: the message says so).
    """
    prepare_third_party_imports()
    from diffusers import AutoencoderTiny

    path = Path(source).expanduser()
    if path.is_dir():
        missing = [] if (path / "config.json").is_file() else ["config.json"]
        if not any((path / w).is_file() for w in DIFFUSERS_WEIGHTS):
            missing.append(f"weights (one of {', '.join(DIFFUSERS_WEIGHTS)})")
        if missing:
            raise FileNotFoundError(f"{field_name}={source!r}: not a diffusers AutoencoderTiny directory; missing: "
                                    + "; ".join(missing))
        found = json.loads((path / "config.json").read_text()).get("_class_name")
        if found not in (None, "AutoencoderTiny"):
            raise ValueError(f"{field_name}={source!r} holds a {found}, not an AutoencoderTiny")
        model = AutoencoderTiny.from_pretrained(str(path), torch_dtype=dtype)
    elif looks_like_hub_id(source):
        try:
            model = AutoencoderTiny.from_pretrained(source, torch_dtype=dtype, local_files_only=hub_offline())
        except OSError as err:
            offline = " HF_HUB_OFFLINE is set, so only the local hub cache was searched." if hub_offline() else ""
            raise OSError(f"{field_name}={source!r}: could not load the AutoencoderTiny from the hub.{offline} Pass a "
                          f"local directory instead (its save_pretrained layout). Cause: {err}") from err
    else:
        raise FileNotFoundError(f"{field_name}={source!r}: no such directory (and not a hub id 'org/name')")
    return model.to(device).eval().requires_grad_(False)


def tiny_fl_surrogate_config(vae_config: Any) -> dict[str, Any]:
    """A small random-weight ``AutoencoderTiny`` config matching a VAE's latent channels and upsampling factor
    (one level per VAE level, 8 channels, one block each): the surrogate of the tiny test pipelines."""
    config = dict(vae_config)
    levels = len(config["block_out_channels"])
    return {"in_channels": 3, "out_channels": int(config.get("out_channels", 3)),
            "latent_channels": int(config.get("latent_channels", 4)),
            "encoder_block_out_channels": [8] * levels, "num_encoder_blocks": [1] * levels,
            "decoder_block_out_channels": [8] * levels, "num_decoder_blocks": [1] * levels, "scaling_factor": 1.0}


def build_tiny_fl_surrogate(vae_config: Any, seed: int = 0) -> Any:
    """A random-weight ``AutoencoderTiny`` of :func:`tiny_fl_surrogate_config` (weights from ``seed``; tests)."""
    prepare_third_party_imports()
    from diffusers import AutoencoderTiny

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderTiny(**tiny_fl_surrogate_config(vae_config)).eval().requires_grad_(False)
