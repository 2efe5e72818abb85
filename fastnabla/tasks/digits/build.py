"""Building the ``digits`` pipeline once: settings, cache location, the build itself, atomic save.

A build trains (in this order) the digit classifier, the ``AutoencoderKL``, then the ``UNet2DConditionModel`` on
its latents, with a frozen random ``CLIPTextModel`` and the real CLIP tokenizer, and saves

* a standard diffusers ``StableDiffusionPipeline`` directory (``save_pretrained`` layout, ``DDIMScheduler`` with
  Stable Diffusion 1.5's schedule, no safety checker; ``tokenizer/`` also holds ``vocab.json`` + ``merges.txt``),
  which ``--model DIR`` / :func:`fastnabla.tasks.sd.loading.load_components` load like real weights;
* ``classifier.safetensors`` (:mod:`fastnabla.rewards.digits_classifier`; the full build in the default cache also
  copies it to ``<cache root>/classifier.safetensors``, the rewards' default);
* ``prompts.txt`` (every prompt the UNet was trained on, one per line: ``sd.prompts.source=DIR/prompts.txt``);
* ``fastnabla_digits.json``: format version, settings, their hash, held-out accuracy, reconstruction error,
  latent scaling factor, timings.

Builds are cached under ``$FASTNABLA_CACHE/digits`` (default ``~/.cache/fastnabla/digits``) in a directory named
by :data:`FORMAT` and a hash of the settings; a build is written to a temporary sibling and renamed into place,
so readers never see a half-written directory, and a second call returns the cached path at once.
Deterministic: the same settings on the same machine (and thread count) give the same weights, byte for byte.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastnabla.compat import prepare_third_party_imports
from fastnabla.mdp.schedule import SD15_SCHEDULER_CONFIG
from fastnabla.rewards.digits_classifier import default_cache_root, default_classifier_path
from fastnabla.tasks.digits import classifier as clf
from fastnabla.tasks.digits import training
from fastnabla.tasks.digits.data import PROMPT_KIND_WEIGHTS, PROMPTS, load_split
from fastnabla.tasks.sd.loading import SDComponents
from fastnabla.tasks.sd.tokenizer import build_clip_tokenizer, write_clip_tokenizer_files

FORMAT = 1  # bump when the architecture, training or file layout changes: cached builds are then rebuilt
MARKER = "fastnabla_digits.json"
PROMPTS_FILE = "prompts.txt"


@dataclass(frozen=True)
class BuildSettings:
    """Everything a build depends on (hashed into the cache key). Defaults: the full build (~6 CPU-minutes)."""

    resolution: int = 16  # images R x R (upsampled from 8x8); latents R/4 x R/4 x 4
    vae_channels: tuple[int, ...] = (16, 32, 32)  # one entry per level: VAE factor 2^(len - 1)
    vae_steps: int = 600
    unet_channels: tuple[int, int] = (48, 96)
    unet_steps: int = 1500
    unet_batch: int = 128
    unet_lr: float = 2e-3
    ema_decay: float = 0.995
    p_uncond: float = 0.1
    prompt_kind_weights: tuple[float, ...] = PROMPT_KIND_WEIGHTS  # training frequency per data.PROMPT_KINDS
    text_width: int = 32
    classifier_steps: int = 600
    seed: int = 0

    def key(self) -> str:
        """``v<FORMAT>-<12 hex digits of the settings' hash>``: the cache directory name."""
        text = json.dumps({"format": FORMAT, **dataclasses.asdict(self)}, sort_keys=True)
        return f"v{FORMAT}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


FULL = BuildSettings()
QUICK = BuildSettings(vae_steps=150, unet_steps=120, classifier_steps=300)  # CI tests: same code path, ~1 minute


def default_pipeline_dir(settings: BuildSettings = FULL, cache_root: str | Path | None = None) -> Path:
    """Where the build of ``settings`` is cached (it may not exist yet)."""
    root = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    return root / settings.key()


def read_marker(directory: str | Path) -> dict | None:
    """The build marker of ``directory`` (None when absent or unreadable)."""
    try:
        return json.loads((Path(directory) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def is_build_of(directory: str | Path, settings: BuildSettings) -> bool:
    marker = read_marker(directory)
    return marker is not None and marker.get("format") == FORMAT and marker.get("key") == settings.key()


def _text_encoder(tokenizer, width: int, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, projection_dim=width,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPTextModel(config).eval().requires_grad_(False)


def _models(s: BuildSettings, text_width: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    levels = len(s.vae_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed + 1)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, block_out_channels=s.vae_channels, latent_channels=4, layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
            norm_num_groups=8, sample_size=s.resolution,
        )  # fmt: skip
        torch.manual_seed(s.seed + 2)
        unet = UNet2DConditionModel(
            sample_size=s.resolution // 2 ** (levels - 1), in_channels=4, out_channels=4,
            block_out_channels=s.unet_channels, layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=text_width, attention_head_dim=4, norm_num_groups=16,
        )  # fmt: skip
    return vae, unet


def build_into(directory: str | Path, settings: BuildSettings = FULL, progress: bool = True) -> dict:
    """Train everything and write the pipeline into ``directory`` (created; not atomic: see :func:`build_pipeline`).

    Returns the marker dict (also written as ``fastnabla_digits.json``).
    """
    prepare_third_party_imports()
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline
    from tqdm.auto import tqdm

    s, directory = settings, Path(directory)
    times: dict[str, float] = {}
    start = time.perf_counter()
    split = load_split(s.resolution)
    bar = tqdm(total=s.classifier_steps + s.vae_steps + s.unet_steps, desc="digits: classifier", disable=not progress,
               unit="step")

    t0 = time.perf_counter()
    model = clf.train_classifier(split.train_images, split.train_labels, s.classifier_steps, s.seed + 3,
                                 progress=bar.update)
    acc = clf.accuracy(model, split.test_images, split.test_labels)
    times["classifier_s"] = time.perf_counter() - t0

    bar.set_description("digits: VAE")
    t0 = time.perf_counter()
    tokenizer = build_clip_tokenizer()
    text_encoder = _text_encoder(tokenizer, s.text_width, s.seed + 4)
    vae, unet = _models(s, s.text_width)
    training.train_vae(vae, split.train_images, s.vae_steps, s.seed + 5, progress=bar.update)
    mean, std = training.encode_posterior(vae, split.train_images)
    scale = training.latent_scaling_factor(mean, std)
    vae.register_to_config(scaling_factor=scale)
    recon = training.reconstruction_mse(vae, split.test_images)
    times["vae_s"] = time.perf_counter() - t0

    bar.set_description("digits: UNet")
    t0 = time.perf_counter()
    scheduler_config = {"_class_name": "DDIMScheduler", **SD15_SCHEDULER_CONFIG}
    parts = SDComponents(unet, vae, text_encoder, tokenizer, scheduler_config)
    from fastnabla.tasks.digits.sampling import encode_prompts

    names = ["", *PROMPTS]
    embeds = dict(zip(names, encode_prompts(parts, names), strict=True))
    abar = DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG).alphas_cumprod
    unet = training.train_unet(
        unet, mean, std, split.train_labels, embeds, abar, s.unet_steps, s.seed + 6, scale, s.unet_batch, s.unet_lr,
        s.ema_decay, s.p_uncond, s.prompt_kind_weights, progress=bar.update,
    )  # fmt: skip
    times["unet_s"] = time.perf_counter() - t0
    bar.close()

    directory.mkdir(parents=True, exist_ok=True)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler.from_config(scheduler_config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(directory)
    write_clip_tokenizer_files(directory / "tokenizer")
    clf.save_classifier(model, directory / clf.CLASSIFIER_FILE, {"held_out_accuracy": acc})
    (directory / PROMPTS_FILE).write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    times["total_s"] = time.perf_counter() - start
    marker = {
        "format": FORMAT, "key": s.key(), "settings": dataclasses.asdict(s), "classifier_held_out_accuracy": acc,
        "vae_held_out_mse": recon, "scaling_factor": scale, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "seconds": {k: round(v, 1) for k, v in times.items()},
        "prompts": {p: list(c) for p, c in PROMPTS.items()},
    }  # fmt: skip
    (directory / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return marker


def build_pipeline(
    out: str | Path | None = None,
    settings: BuildSettings = FULL,
    progress: bool = True,
    threads: int | None = 1,
    force: bool = False,
) -> Path:
    """The pipeline directory of ``settings``: returned at once when already built, else built (atomically).

    Args:
        out: the pipeline directory (default :func:`default_pipeline_dir`). An existing non-empty directory that is
            not a digits build of other settings is never overwritten.
        threads: torch CPU threads during the build (None: leave as is); the global setting is restored after.
        force: rebuild even when a matching build exists.

    Raises:
        FileExistsError: ``out`` is a non-empty directory that is not a digits build.
    """
    directory = Path(out).expanduser() if out is not None else default_pipeline_dir(settings)
    if not force and is_build_of(directory, settings):
        _publish_default_classifier(directory, settings)
        return directory
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())) and read_marker(directory) is None:
        raise FileExistsError(f"{str(directory)!r} exists and is not a digits pipeline build (no {MARKER}); "
                              "choose an empty or new directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    old_threads = torch.get_num_threads()
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        if threads:
            torch.set_num_threads(threads)
        build_into(tmp, settings, progress)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a cache directory is readable like any other
        if directory.exists():
            stale = directory.with_name(f".{directory.name}.stale-{os.getpid()}")
            os.rename(directory, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.rename(tmp, directory)
    except OSError:
        if not is_build_of(directory, settings):  # another process may have won the race with the same build
            raise
    finally:
        torch.set_num_threads(old_threads)
        shutil.rmtree(tmp, ignore_errors=True)
    _publish_default_classifier(directory, settings)
    return directory


def _publish_default_classifier(directory: Path, settings: BuildSettings) -> None:
    """For the full build in the default cache: copy its classifier to the rewards' default path (atomically)."""
    if settings != FULL or directory.resolve() != default_pipeline_dir(FULL).resolve():
        return
    src, dst = directory / clf.CLASSIFIER_FILE, default_classifier_path()
    if dst.is_file() and dst.read_bytes() == src.read_bytes():
        return
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
