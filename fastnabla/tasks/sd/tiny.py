"""The tiny pipelines (``sd.model: tiny`` / ``tiny-sdxl``): random-initialised parts of the real classes, a real
tokenizer.

For tests, demos and the ``tiny-sd`` preset on a CPU. The parts are the classes a real Stable
Diffusion 1.x pipeline uses, at toy sizes (everything builds in ~0.1 s):

* ``UNet2DConditionModel``: channels (32, 64), one layer per block, cross-attention at the 8x8 level
  and in the mid block, 8x8x4 latents, ``cross_attention_dim = 32``;
* ``AutoencoderKL``: 3 levels of 32 channels (VAE factor 4: 8x8 latents <-> 32x32 RGB images);
* ``CLIPTextModel``: 2 layers, width 32, the full 49,408-token vocabulary and 77 positions;
* ``CLIPTokenizer``: the real CLIP tokenizer, built from open_clip's BPE file
  (:mod:`fastnabla.tasks.sd.tokenizer`);
* the scheduler config of Stable Diffusion 1.5 (``fastnabla.mdp.SD15_SCHEDULER_CONFIG``) for ``DDIMScheduler``.

The tiny SDXL pipeline (``tiny-sdxl``, :func:`build_tiny_sdxl_components`) has every part of SDXL base's
architecture at toy sizes:

* ``UNet2DConditionModel`` with SDXL's layout -- no attention at the first level, ``transformer_layers_per_block``
  (1, 2), linear projections, and the ``text_time`` addition embedding: the pooled text embedding (width 24) and
  the six size / crop ids, each through an 8-wide sinusoidal embedding (``projection_class_embeddings_input_dim``
  = 6 * 8 + 24 = 72); ``cross_attention_dim`` 32 + 48 = 80 (both encoders' hidden states concatenated);
* ``CLIPTextModel`` (width 32, quick-GELU, as CLIP ViT-L) and ``CLIPTextModelWithProjection`` (width 48, GELU,
  projection 24, as OpenCLIP bigG), 3 layers each (the UNet reads the penultimate layer); the two widths differ
  so a swapped or mis-concatenated encoder fails the tests;
* the CLIP tokenizer twice, the second padding with ``!`` as SDXL's ``tokenizer_2``;
* ``AutoencoderKL`` as the tiny one with SDXL's ``scaling_factor`` 0.13025 and ``force_upcast``;
* SDXL base's scheduler config (an ``EulerDiscreteScheduler`` config; the task builds its DDIM MDP from it).

The weights are a deterministic function of the seed. :func:`tiny_pipeline_dir` saves the pipeline
once (``save_pretrained`` layout, written to a temporary directory and renamed into place) so the
local-directory loading path serves it like any real model (its ``tokenizer/`` holds both
``tokenizer.json`` and the ``vocab.json`` + ``merges.txt`` pair real SD directories ship).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from fastnabla.compat import prepare_third_party_imports
from fastnabla.mdp.schedule import SD15_SCHEDULER_CONFIG
from fastnabla.tasks.sd.loading import SDComponents, vae_dtype_for
from fastnabla.tasks.sd.tokenizer import build_clip_tokenizer, write_clip_tokenizer_files
from fastnabla.utils.io import apply_umask, make_temp_dir

TINY_MARKER = "fastnabla_tiny.json"
TINY_FORMAT = 1  # bump when the tiny architecture changes: cached copies are then rebuilt
TINY_TEXT_WIDTH = 32
TINY_LATENT_SIZE = 8
TINY_SDXL_TEXT_WIDTHS = (32, 48)  # CLIP ViT-L stand-in, OpenCLIP bigG stand-in
TINY_SDXL_POOLED_WIDTH = 24
TINY_SDXL_TIME_EMBED = 8
SDXL_VAE_SCALING_FACTOR = 0.13025
# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json (the keys the MDP reads are the SD 1.5
# schedule's; the class is Euler, which the task replaces by its DDIM MDP)
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}


def tiny_scheduler_config() -> dict:
    """Stable Diffusion 1.5's scheduler settings, as a ``DDIMScheduler`` config."""
    return {"_class_name": "DDIMScheduler", **SD15_SCHEDULER_CONFIG}


def build_tiny_components(seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """The tiny pipeline's parts, frozen (eval, no grad), weights drawn from ``seed`` (global RNG untouched)."""
    prepare_third_party_imports()
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=TINY_LATENT_SIZE,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TINY_TEXT_WIDTH,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        vae = _tiny_vae()
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=TINY_TEXT_WIDTH,
                intermediate_size=64,
                projection_dim=TINY_TEXT_WIDTH,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    for module in (unet, vae, text_encoder):
        module.to(device).eval().requires_grad_(False)
        if dtype != torch.float32:
            module.to(dtype)
    return SDComponents(unet, vae, text_encoder, tokenizer, tiny_scheduler_config(), source=f"tiny(seed={seed})")


def _tiny_vae(**extra):
    """The tiny ``AutoencoderKL`` of both tiny pipelines (3 levels of 32 channels, factor 4); ``extra``: config keys
    that differ (SDXL's scaling factor and upcast)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=TINY_LATENT_SIZE * 4,
        **extra,
    )


def _clip_text_model(tokenizer, width: int, seed: int, projection: int = 0, act: str = "quick_gelu"):
    prepare_third_party_imports()
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, projection_dim=projection or width,
        num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77, hidden_act=act,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def build_tiny_sdxl_components(seed: int = 0, dtype: torch.dtype = torch.float32,
                               device: str | torch.device = "cpu") -> SDComponents:
    """The tiny SDXL pipeline's parts (module docstring), frozen, weights drawn from ``seed`` (global RNG
    untouched)."""
    prepare_third_party_imports()
    from diffusers import UNet2DConditionModel

    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_clip_tokenizer(pad_token="!")
    w1, w2 = TINY_SDXL_TEXT_WIDTHS
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=TINY_LATENT_SIZE,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            cross_attention_dim=w1 + w2,
            addition_embed_type="text_time",
            addition_time_embed_dim=TINY_SDXL_TIME_EMBED,
            projection_class_embeddings_input_dim=6 * TINY_SDXL_TIME_EMBED + TINY_SDXL_POOLED_WIDTH,
            norm_num_groups=32,
        )
        vae = _tiny_vae(scaling_factor=SDXL_VAE_SCALING_FACTOR, force_upcast=True)
    text_encoder = _clip_text_model(tokenizer, w1, seed + 1)
    text_encoder_2 = _clip_text_model(tokenizer_2, w2, seed + 2, projection=TINY_SDXL_POOLED_WIDTH, act="gelu")
    for module in (unet, vae, text_encoder, text_encoder_2):
        module.to(device).eval().requires_grad_(False)
        wanted = vae_dtype_for(dtype, vae.config, "sdxl") if module is vae else dtype  # force_upcast: fp32 under fp16
        if wanted != torch.float32:
            module.to(wanted)
    return SDComponents(unet, vae, text_encoder, tokenizer, dict(SDXL_SCHEDULER_CONFIG), f"tiny-sdxl(seed={seed})",
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, force_zeros_for_empty_prompt=True)


def build_tiny(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """The tiny pipeline of ``family`` (``sd`` or ``sdxl``)."""
    build = build_tiny_sdxl_components if family == "sdxl" else build_tiny_components
    return build(seed, dtype, device)


def _marker(seed: int, family: str = "sd") -> dict:
    return {"seed": int(seed), "format": TINY_FORMAT, **({"family": family} if family != "sd" else {})}


def _is_cache_of(directory: Path, seed: int, family: str = "sd") -> bool:
    try:
        return json.loads((directory / TINY_MARKER).read_text()) == _marker(seed, family)
    except (OSError, ValueError):
        return False


def _tiny_pipeline(parts):
    prepare_third_party_imports()
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    if parts.family == "sdxl":
        return StableDiffusionXLPipeline(
            vae=parts.vae, text_encoder=parts.text_encoder, text_encoder_2=parts.text_encoder_2,
            tokenizer=parts.tokenizer, tokenizer_2=parts.tokenizer_2, unet=parts.unet,
            scheduler=EulerDiscreteScheduler.from_config(parts.scheduler_config),
            force_zeros_for_empty_prompt=parts.force_zeros_for_empty_prompt, add_watermarker=False,
        )
    return StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        unet=parts.unet,
        scheduler=DDIMScheduler.from_config(parts.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_pipeline(directory: str | Path, seed: int = 0, family: str = "sd") -> Path:
    """Write the tiny pipeline of ``family`` (fp32) to ``directory`` in the ``save_pretrained`` layout, atomically.

    The pipeline is written to a temporary sibling directory and renamed into place, so a reader
    never sees a half-written cache; if another process wins the race its copy is kept.
    """
    directory = Path(directory).expanduser()
    directory.parent.mkdir(parents=True, exist_ok=True)
    parts = build_tiny(family, seed)
    pipe = _tiny_pipeline(parts)
    tmp = make_temp_dir(directory)
    try:
        pipe.save_pretrained(tmp)
        write_clip_tokenizer_files(tmp / "tokenizer")  # the slow-tokenizer files real SD directories ship
        if family == "sdxl":
            write_clip_tokenizer_files(tmp / "tokenizer_2")
        (tmp / TINY_MARKER).write_text(json.dumps(_marker(seed, family)))
        for path in tmp.rglob("*"):
            apply_umask(path)  # safetensors writes 0600
        if directory.exists():
            stale = directory.with_name(f".{directory.name}.stale-{os.getpid()}")
            os.rename(directory, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.rename(tmp, directory)
    except OSError:
        if not _is_cache_of(directory, seed, family):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def tiny_pipeline_dir(cache_dir: str | Path, seed: int = 0, family: str = "sd") -> Path:
    """``cache_dir`` holding the tiny pipeline of ``family`` and ``seed``, written there first if needed.

    Raises:
        FileExistsError: ``cache_dir`` is a non-empty directory that is not a tiny-pipeline cache
            (it is never overwritten).
    """
    cache_dir = Path(cache_dir).expanduser()
    if _is_cache_of(cache_dir, seed, family):
        return cache_dir
    foreign = not (cache_dir / TINY_MARKER).is_file()
    if cache_dir.exists() and (not cache_dir.is_dir() or any(cache_dir.iterdir())) and foreign:
        raise FileExistsError(
            f"sd.tiny_cache_dir={str(cache_dir)!r} exists and is not a tiny-pipeline cache "
            f"(no {TINY_MARKER}); choose an empty or new directory"
        )
    return save_tiny_pipeline(cache_dir, seed, family)
