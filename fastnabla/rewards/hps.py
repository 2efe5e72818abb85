"""Human Preference Score v2 / v2.1: an open_clip ViT-H-14 fine-tuned on HPD v2; the score is an image-text cosine.

    f_img = CLIP_image(normalize(resize_longest_pad_224(x))) / ||.||,   f_txt = CLIP_text(tokens(prompt)) / ||.||
    s(x, prompt) = <f_img, f_txt>                                       # [B], in [-1, 1]; ~0.2..0.35 in practice

exactly the ``hpsv2`` package's score (the diagonal of ``image_features @ text_features.T``, no logit scale).
Preprocessing is the package's (``light_augmentation=True``): longer side to 224 (antialiased bicubic on tensors, as
its ``ResizeMaxSize`` after ``ToTensor``), zero padding to 224x224, CLIP mean/std. Text: open_clip's tokenizer for
ViT-H-14 (the CLIP BPE vocabulary ships inside open_clip; 77 tokens).

Weights: ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` (hub ``xswu/HPSv2``): ``{"state_dict": ...}`` in
open_clip's ``CLIP`` key layout (``visual.*``, ``transformer.*``, ``token_embedding.weight``,
``positional_embedding``, ``ln_final.*``, ``text_projection``, ``logit_scale``); they hold both towers, so the LAION
ViT-H-14 weights the package starts from are not needed. Text features do not depend on the pixels: they are
computed without a graph and cached per prompt (``text_cache_size``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from fastnabla.compat import prepare_third_party_imports
from fastnabla.rewards.base import RewardModel, Tensor, parse_dtype
from fastnabla.rewards.fast_attention import pack_self_attention
from fastnabla.rewards.loading import WeightFiles, load_exact, load_state_dict_file, resolve_file
from fastnabla.rewards.preprocess import CLIP_MEAN, CLIP_STD, ImagePreprocess

HPS_HUB_ID = "xswu/HPSv2"
HPS_ARCHITECTURE = "ViT-H-14"
HPS_FILES = {"hpsv2": "HPS_v2_compressed.pt", "hpsv2.1": "HPS_v2.1_compressed.pt"}


def hps_checkpoint_files(version: str) -> WeightFiles:
    return WeightFiles(
        reward=version,
        option="checkpoint",
        description=f"the {version.upper().replace('HPSV', 'HPSv')} checkpoint",
        filenames=(HPS_FILES[version],),
        source=f"https://huggingface.co/{HPS_HUB_ID} (file {HPS_FILES[version]})",
        hub_repo=HPS_HUB_ID,
    )


class HPSReward(RewardModel):
    """HPSv2-style score: cosine between the open_clip image and text embeddings of each (image, prompt) pair."""

    name = "hpsv2"
    positive = False  # a cosine: can be negative

    def __init__(self, clip_model: nn.Module, tokenizer, name: str = "hpsv2", text_cache_size: int = 256,
                 fast_attention: bool = True):
        super().__init__()
        if fast_attention:  # the image tower (the gradient path); the text tower runs without a graph
            pack_self_attention(clip_model.visual)
        self.clip = clip_model
        self.tokenizer = tokenizer
        self.name = name
        self.text_cache_size = int(text_cache_size)
        self._text_cache: OrderedDict[str, Tensor] = OrderedDict()
        size = clip_model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        self.preprocess = ImagePreprocess(
            size=int(size),
            geometry="longest-pad",
            fill=0.0,
            mean=tuple(getattr(clip_model.visual, "image_mean", None) or CLIP_MEAN),
            std=tuple(getattr(clip_model.visual, "image_std", None) or CLIP_STD),
        )

    def _apply(self, fn, recurse=True):
        self._text_cache.clear()  # device / dtype changes invalidate the cached text features
        return super()._apply(fn, recurse)

    def clear_text_cache(self) -> None:
        """Forget cached text features (call after changing the weights in place)."""
        self._text_cache.clear()

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> Tensor:
        """Unit-norm text embeddings ``[B, D]`` (no graph); unique prompts are encoded once, then cached."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        fresh = {}
        if missing:
            tokens = self.tokenizer(missing).to(self.clip.token_embedding.weight.device)
            fresh = dict(zip(missing, self.clip.encode_text(tokens, normalize=True), strict=True))
            if self.text_cache_size > 0:
                self._text_cache.update(fresh)
                while len(self._text_cache) > self.text_cache_size:
                    self._text_cache.popitem(last=False)
        for p in prompts:
            if p in self._text_cache:
                self._text_cache.move_to_end(p)
        return torch.stack([fresh[p] if p in fresh else self._text_cache[p] for p in prompts])

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        weight_dtype = next(self.clip.visual.parameters()).dtype
        image_features = self.clip.encode_image(self.preprocess(images).to(weight_dtype), normalize=True)
        return (image_features * self.text_features(prompts).to(image_features.dtype)).sum(-1).to(images.dtype)


def create_open_clip(architecture: str = HPS_ARCHITECTURE) -> tuple[nn.Module, object]:
    """An open_clip model of ``architecture`` with random weights, and its tokenizer (offline)."""
    prepare_third_party_imports()
    import open_clip

    if architecture not in open_clip.list_models():
        raise ValueError(f"open_clip has no architecture {architecture!r} (see open_clip.list_models())")
    return open_clip.create_model(architecture, pretrained=None), open_clip.get_tokenizer(architecture)


def build_hps(
    version: str,
    checkpoint: str | None = None,
    random_weights: bool = False,
    dtype: str | torch.dtype = "float32",
    text_cache_size: int = 256,
    architecture: str = HPS_ARCHITECTURE,
    fast_attention: bool = True,
) -> HPSReward:
    """The HPS reward of ``version`` (``hpsv2`` or ``hpsv2.1``).

    Args:
        checkpoint: the HPS state dict file (``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt``) or a directory
            holding it; default: the hub repo ``xswu/HPSv2`` (its cache only, when ``HF_HUB_OFFLINE=1``).
        random_weights: the real architecture (open_clip ViT-H-14) with random weights (tests, benchmarks).
        dtype: weight dtype (default float32; preprocessing and the returned scores are fp32).
        text_cache_size: prompts whose text features are kept (0: no cache).
        architecture: open_clip model name (default ``ViT-H-14``, the HPS architecture; others for tests).
        fast_attention: run the image tower's attention as ``fast_attention.PackedSelfAttention`` (same maths and
            weights; ~2x faster forward + backward on CPU). False: open_clip's own modules.
    """
    if version not in HPS_FILES:
        raise ValueError(f"unknown HPS version {version!r}; one of {sorted(HPS_FILES)}")
    if text_cache_size < 0:
        raise ValueError(f"reward {version!r}: text_cache_size must be >= 0, got {text_cache_size}")
    weight_dtype = parse_dtype(dtype, version)
    path = None if random_weights else resolve_file(checkpoint, hps_checkpoint_files(version))
    model, tokenizer = create_open_clip(architecture)
    if path is not None:
        state = load_state_dict_file(path, f"reward {version!r}: checkpoint")
        load_exact(model, state, f"reward {version!r}: checkpoint={path} (open_clip {architecture})")
    return HPSReward(model.to(weight_dtype), tokenizer, version, text_cache_size, fast_attention)
