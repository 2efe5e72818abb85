"""The tiny flow-matching pipelines (``flow.model: tiny-sd3`` / ``tiny-flux``): the real classes at toy sizes.

For tests, demos and the ``tiny-sd3`` / ``tiny-flux`` presets on a CPU (each builds in 1-3 s on a shared CPU):

* **tiny-sd3** (``StableDiffusion3Pipeline``): ``SD3Transformer2DModel`` with SD3.5's MMDiT-X features (RMS
  ``qk_norm``, a dual-attention first block), 16 latent channels, patch 2, two layers of 4 heads x 8;
  ``CLIPTextModelWithProjection`` twice (CLIP-L and CLIP-G stand-ins, widths 32 and 32, projections 32 each: the
  pooled embedding is 64 wide) and ``T5EncoderModel`` (width 64 = ``joint_attention_dim``, which the CLIP hidden
  states, 32 + 32, are padded to as in the pipeline);
* **tiny-flux** (``FluxPipeline``): ``FluxTransformer2DModel`` with the guidance embedding, one double-stream and
  one single-stream block (2 heads x 16, rotary axes 4 + 6 + 6), 16 latent channels packed 2x2 into 64;
  ``CLIPTextModel`` (pooled width 32) and ``T5EncoderModel`` (width 32);
* both: ``AutoencoderKL`` with 16 latent channels, no quant convolutions and the real ``scaling_factor`` /
  ``shift_factor`` (SD3: 1.5305 / 0.0609, FLUX: 0.3611 / 0.1159), 3 levels (VAE factor 4: 8x8 latents <-> 32x32
  images); the real CLIP tokenizer (:mod:`fastnabla.tasks.sd.tokenizer`) and a ``T5TokenizerFast`` (transformers'
  Unigram T5 tokenizer class) over a vocabulary made from CLIP's whole-word tokens (no T5 sentencepiece model is
  available offline); the real scheduler configs (SD3: shift 3; FLUX.1-dev: dynamic shifting).

The weights are a deterministic function of the seed. :func:`tiny_pipeline_dir` saves a pipeline once
(``save_pretrained`` layout, atomically) so the local-directory loading path serves it like a real model.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch

from fastnabla.compat import prepare_third_party_imports
from fastnabla.mdp.flow_matching import FLUX_SCHEDULER_CONFIG, SD3_SCHEDULER_CONFIG
from fastnabla.tasks.flow.loading import FlowComponents
from fastnabla.tasks.sd.tokenizer import build_clip_tokenizer, clip_vocab_and_merges, write_clip_tokenizer_files
from fastnabla.utils.io import apply_umask, make_temp_dir

TINY_MARKER = "fastnabla_tiny.json"
TINY_FORMAT = 1  # bump when a tiny architecture changes: cached copies are then rebuilt
TINY_LATENT_SIZE = 8
TINY_T5_WORDS = 8000  # whole-word pieces of the tiny T5 vocabulary (the first CLIP whole-word tokens)
SD3_VAE = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
FLUX_VAE = {"scaling_factor": 0.3611, "shift_factor": 0.1159}


def build_t5_tokenizer(num_words: int = TINY_T5_WORDS):
    """A ``T5TokenizerFast`` (Unigram, T5's special tokens and 100 sentinels) whose pieces are ``▁`` + the first
    ``num_words`` alphabetic whole-word tokens of CLIP's vocabulary, plus every printable ASCII character with and
    without ``▁`` (so no text maps to ``<unk>``); scores fall with the CLIP rank."""
    prepare_third_party_imports()
    from transformers import T5TokenizerFast

    vocab, _ = clip_vocab_and_merges()
    words = [t[:-4] for t in vocab if t.endswith("</w>") and t[:-4].isascii() and t[:-4].isalpha()][:num_words]
    chars = [chr(c) for c in range(33, 127)]
    pieces: dict[str, float] = {"▁": -2.0}
    for c in chars:
        pieces.setdefault(c, -12.0)
        pieces.setdefault("▁" + c, -11.0)
    for rank, word in enumerate(words):
        pieces["▁" + word] = -3.0 - math.log1p(rank) / 2
    vocab_scores = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces.items()]
    vocab_scores += [(f"<extra_id_{i}>", 0.0) for i in range(99, -1, -1)]
    return T5TokenizerFast(vocab=vocab_scores, extra_ids=100, model_max_length=512)


def _clip_text(tokenizer, width: int, projection: int, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, projection_dim=projection or width,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _t5(tokenizer, width: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_ff=2 * width, d_kv=8, num_layers=2,
                                   num_heads=4, decoder_start_token_id=0, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id))


def _vae(factors: dict, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=16, layers_per_block=1, norm_num_groups=32,
        sample_size=TINY_LATENT_SIZE * 4, use_quant_conv=False, use_post_quant_conv=False, **factors,
    )


def build_tiny_components(family: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                          device: str | torch.device = "cpu") -> FlowComponents:
    """The tiny pipeline's parts for ``family`` (``sd3`` / ``flux``), frozen (eval, no grad), weights drawn from
    ``seed`` (the global RNG is left as it was)."""
    prepare_third_party_imports()
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    clip_tok = build_clip_tokenizer()
    t5_tok = build_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        if family == "sd3":
            encoders = [_clip_text(clip_tok, 32, 32, seed), _clip_text(clip_tok, 32, 32, seed + 1),
                        _t5(t5_tok, 64, seed + 2)]
            tokenizers = [clip_tok, build_clip_tokenizer(), t5_tok]
            torch.manual_seed(seed + 3)
            transformer = SD3Transformer2DModel(
                sample_size=TINY_LATENT_SIZE, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32,
                pooled_projection_dim=64, pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,),
            )
            vae, scheduler = _vae(SD3_VAE, seed + 4), dict(SD3_SCHEDULER_CONFIG)
        elif family == "flux":
            encoders = [_clip_text(clip_tok, 32, 0, seed), _t5(t5_tok, 32, seed + 2)]
            tokenizers = [clip_tok, t5_tok]
            torch.manual_seed(seed + 3)
            transformer = FluxTransformer2DModel(
                patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                axes_dims_rope=(4, 6, 6),
            )
            vae, scheduler = _vae(FLUX_VAE, seed + 4), dict(FLUX_SCHEDULER_CONFIG)
        else:
            raise ValueError(f"tiny flow-matching pipeline: family {family!r} is not 'sd3' or 'flux'")
    scheduler["_class_name"] = "FlowMatchEulerDiscreteScheduler"
    for module in (transformer, vae, *encoders):
        module.to(device).eval().requires_grad_(False)
        if dtype != torch.float32:
            module.to(dtype)
    return FlowComponents(family=family, transformer=transformer, vae=vae, text_encoders=encoders,
                          tokenizers=tokenizers, scheduler_config=scheduler, source=f"tiny-{family}(seed={seed})",
                          default_sample_size=TINY_LATENT_SIZE)


def pipeline_of(parts: FlowComponents):
    """The diffusers pipeline (``StableDiffusion3Pipeline`` / ``FluxPipeline``) holding ``parts``."""
    prepare_third_party_imports()
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(parts.scheduler_config)
    enc, tok = parts.text_encoders, parts.tokenizers
    if parts.family == "sd3":
        return StableDiffusion3Pipeline(
            transformer=parts.transformer, scheduler=scheduler, vae=parts.vae, text_encoder=enc[0], tokenizer=tok[0],
            text_encoder_2=enc[1], tokenizer_2=tok[1], text_encoder_3=enc[2], tokenizer_3=tok[2])
    return FluxPipeline(scheduler=scheduler, vae=parts.vae, text_encoder=enc[0], tokenizer=tok[0],
                        text_encoder_2=enc[1], tokenizer_2=tok[1], transformer=parts.transformer)


def _marker(family: str, seed: int) -> dict:
    return {"family": family, "seed": int(seed), "format": TINY_FORMAT}


def _is_cache_of(directory: Path, family: str, seed: int) -> bool:
    try:
        return json.loads((directory / TINY_MARKER).read_text()) == _marker(family, seed)
    except (OSError, ValueError):
        return False


def save_tiny_pipeline(directory: str | Path, family: str, seed: int = 0) -> Path:
    """Write the tiny ``family`` pipeline (fp32) to ``directory`` in the ``save_pretrained`` layout, atomically
    (a temporary sibling renamed into place; if another process wins the race its copy is kept)."""
    directory = Path(directory).expanduser()
    directory.parent.mkdir(parents=True, exist_ok=True)
    pipe = pipeline_of(build_tiny_components(family, seed))
    tmp = make_temp_dir(directory)
    try:
        pipe.save_pretrained(tmp)
        for folder in ("tokenizer", "tokenizer_2") if family == "sd3" else ("tokenizer",):
            write_clip_tokenizer_files(tmp / folder)  # the slow-tokenizer files real pipelines ship too
        (tmp / TINY_MARKER).write_text(json.dumps(_marker(family, seed)))
        for path in tmp.rglob("*"):
            apply_umask(path)  # safetensors writes 0600
        if directory.exists():
            stale = directory.with_name(f".{directory.name}.stale-{os.getpid()}")
            os.rename(directory, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.rename(tmp, directory)
    except OSError:
        if not _is_cache_of(directory, family, seed):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def tiny_pipeline_dir(cache_dir: str | Path, family: str, seed: int = 0) -> Path:
    """``cache_dir`` holding the tiny ``family`` pipeline of ``seed``, written there first if needed.

    Raises:
        FileExistsError: ``cache_dir`` is a non-empty directory that is not a tiny-pipeline cache (never
            overwritten).
    """
    cache_dir = Path(cache_dir).expanduser()
    if _is_cache_of(cache_dir, family, seed):
        return cache_dir
    foreign = not (cache_dir / TINY_MARKER).is_file()
    if cache_dir.exists() and (not cache_dir.is_dir() or any(cache_dir.iterdir())) and foreign:
        raise FileExistsError(
            f"flow.tiny_cache_dir={str(cache_dir)!r} exists and is not a tiny-pipeline cache (no {TINY_MARKER}); "
            "choose an empty or new directory")
    return save_tiny_pipeline(cache_dir, family, seed)
