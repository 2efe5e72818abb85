"""The tiny pipeline (``sd.model: tiny``): random-initialised parts of the real classes, a real tokenizer.

For tests, demos and the ``tiny-sd`` preset on a CPU. The parts are the classes a real Stable
Diffusion 1.x pipeline uses, at toy sizes (everything builds in ~0.1 s):

* ``UNet2DConditionModel``: channels (32, 64), one layer per block, cross-attention at the 8x8 level
  and in the mid block, 8x8x4 latents, ``cross_attention_dim = 32``;
* ``AutoencoderKL``: 3 levels of 32 channels (VAE factor 4: 8x8 latents <-> 32x32 RGB images);
* ``CLIPTextModel``: 2 layers, width 32, the full 49,408-token vocabulary and 77 positions;
* ``CLIPTokenizer``: the real CLIP tokenizer, built from open_clip's BPE file
  (:mod:`fastnabla.tasks.sd.tokenizer`);
* the scheduler config of Stable Diffusion 1.5 (``fastnabla.mdp.SD15_SCHEDULER_CONFIG``) for ``DDIMScheduler``.

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
from fastnabla.tasks.sd.loading import SDComponents
from fastnabla.tasks.sd.tokenizer import build_clip_tokenizer, write_clip_tokenizer_files
from fastnabla.utils.io import apply_umask, make_temp_dir

TINY_MARKER = "fastnabla_tiny.json"
TINY_FORMAT = 1  # bump when the tiny architecture changes: cached copies are then rebuilt
TINY_TEXT_WIDTH = 32
TINY_LATENT_SIZE = 8


def tiny_scheduler_config() -> dict:
    """Stable Diffusion 1.5's scheduler settings, as a ``DDIMScheduler`` config."""
    return {"_class_name": "DDIMScheduler", **SD15_SCHEDULER_CONFIG}


def build_tiny_components(seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """The tiny pipeline's parts, frozen (eval, no grad), weights drawn from ``seed`` (global RNG untouched)."""
    prepare_third_party_imports()
    from diffusers import AutoencoderKL, UNet2DConditionModel
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
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=32,
            sample_size=TINY_LATENT_SIZE * 4,
        )
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


def _marker(seed: int) -> dict:
    return {"seed": int(seed), "format": TINY_FORMAT}


def _is_cache_of(directory: Path, seed: int) -> bool:
    try:
        return json.loads((directory / TINY_MARKER).read_text()) == _marker(seed)
    except (OSError, ValueError):
        return False


def save_tiny_pipeline(directory: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline (fp32) to ``directory`` in the ``save_pretrained`` layout, atomically.

    The pipeline is written to a temporary sibling directory and renamed into place, so a reader
    never sees a half-written cache; if another process wins the race its copy is kept.
    """
    prepare_third_party_imports()
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    directory = Path(directory).expanduser()
    directory.parent.mkdir(parents=True, exist_ok=True)
    parts = build_tiny_components(seed)
    pipe = StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        unet=parts.unet,
        scheduler=DDIMScheduler.from_config(parts.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = make_temp_dir(directory)
    try:
        pipe.save_pretrained(tmp)
        write_clip_tokenizer_files(tmp / "tokenizer")  # the slow-tokenizer files real SD directories ship
        (tmp / TINY_MARKER).write_text(json.dumps(_marker(seed)))
        for path in tmp.rglob("*"):
            apply_umask(path)  # safetensors writes 0600
        if directory.exists():
            stale = directory.with_name(f".{directory.name}.stale-{os.getpid()}")
            os.rename(directory, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.rename(tmp, directory)
    except OSError:
        if not _is_cache_of(directory, seed):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def tiny_pipeline_dir(cache_dir: str | Path, seed: int = 0) -> Path:
    """``cache_dir`` holding the tiny pipeline of ``seed``, written there first if needed.

    Raises:
        FileExistsError: ``cache_dir`` is a non-empty directory that is not a tiny-pipeline cache
            (it is never overwritten).
    """
    cache_dir = Path(cache_dir).expanduser()
    if _is_cache_of(cache_dir, seed):
        return cache_dir
    foreign = not (cache_dir / TINY_MARKER).is_file()
    if cache_dir.exists() and (not cache_dir.is_dir() or any(cache_dir.iterdir())) and foreign:
        raise FileExistsError(
            f"sd.tiny_cache_dir={str(cache_dir)!r} exists and is not a tiny-pipeline cache "
            f"(no {TINY_MARKER}); choose an empty or new directory"
        )
    return save_tiny_pipeline(cache_dir, seed)
