"""LAION Aesthetic Score: CLIP ViT-L/14 image embedding (L2-normalised) + the LAION aesthetic MLP.

    e(x) = CLIP_image(normalize(resize_crop_224(x)))          # [B, 768], projected image embedding
    s(x) = MLP(e(x) / ||e(x)||_2)                              # [B], about 1..10 for real images with the real weights

Preprocessing is the CLIP way (transformers' ``CLIPImageProcessor`` for ``openai/clip-vit-large-patch14``): shorter
side to 224 (antialiased bicubic), centre 224 crop (floor offsets), CLIP mean/std. The authors' release instead
squashes to 224x224 with plain (non-antialiased) bicubic ``F.interpolate``; for the square images SD produces the
only difference is the antialiasing, which the CLIP processor (and PIL, which the predictor was trained with) applies.

Weights (``build_aesthetic``): the MLP ``sac+logos+ava1-l14-linearMSE.pth`` (github
christophschuhmann/improved-aesthetic-predictor) and CLIP ViT-L/14 in either layout users have:
a transformers directory (``openai/clip-vit-large-patch14``: ``config.json`` + ``model.safetensors`` or
``pytorch_model.bin``; the hub id works where the user has the hub) or an OpenAI/open_clip checkpoint file (OpenAI's
TorchScript ``ViT-L-14.pt``, or an open_clip state dict of ``ViT-L-14-quickgelu``, ``.bin``/``.pt``/``.safetensors``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from fastnabla.compat import prepare_third_party_imports
from fastnabla.rewards.base import RewardModel, Tensor, parse_dtype
from fastnabla.rewards.fast_attention import pack_self_attention
from fastnabla.rewards.loading import WeightFiles, load_exact, load_state_dict_file, resolve_dir, resolve_file
from fastnabla.rewards.mlp_head import PreferenceMLP
from fastnabla.rewards.preprocess import ImagePreprocess

CLIP_HUB_ID = "openai/clip-vit-large-patch14"
OPEN_CLIP_ARCHITECTURE = "ViT-L-14-quickgelu"  # OpenAI's ViT-L/14 uses QuickGELU
# transformers CLIPVisionConfig of openai/clip-vit-large-patch14 (the real architecture, for random weights)
CLIP_VIT_L14 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
MLP_FILES = WeightFiles(
    reward="aesthetic",
    option="mlp",
    description="the LAION aesthetic MLP",
    filenames=("sac+logos+ava1-l14-linearMSE.pth",),
    source="https://github.com/christophschuhmann/improved-aesthetic-predictor (file sac+logos+ava1-l14-linearMSE.pth)",
)
CLIP_DIR_FILES = WeightFiles(
    reward="aesthetic",
    option="clip",
    description="CLIP ViT-L/14 (transformers directory)",
    filenames=("config.json",),
    alternatives=(("model.safetensors", "pytorch_model.bin"),),
    source=f"https://huggingface.co/{CLIP_HUB_ID} (config.json + model.safetensors), or OpenAI's ViT-L-14.pt",
    hub_repo=CLIP_HUB_ID,
)
CLIP_PREPROCESS = ImagePreprocess(size=224, geometry="shortest-crop", crop_rounding="floor")


class TransformersCLIPImageEncoder(nn.Module):
    """``pixel_values [B, 3, 224, 224] -> [B, D]``: transformers ``CLIPVisionModelWithProjection`` image embeds."""

    def __init__(self, vision_model: nn.Module):
        super().__init__()
        self.model = vision_model
        self.image_size = int(vision_model.config.image_size)
        self.embed_dim = int(vision_model.config.projection_dim)

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.model(pixel_values=pixel_values).image_embeds


class OpenCLIPImageEncoder(nn.Module):
    """``pixel_values [B, 3, 224, 224] -> [B, D]``: an open_clip visual tower (pooled, projected); its attention
    runs as :class:`~fastnabla.rewards.fast_attention.PackedSelfAttention` (same maths and weights, faster backward)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        pack_self_attention(visual)
        self.visual = visual
        size = visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.embed_dim = int(visual.output_dim)

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.visual(pixel_values)


class AestheticReward(RewardModel):
    """``s(x) = MLP(e / ||e||)`` with ``e`` the CLIP image embedding of the preprocessed ``x`` (prompts unused)."""

    name = "aesthetic"
    positive = False  # an affine head: about 1..10 on real images, but not positive by construction

    def __init__(self, image_encoder: nn.Module, mlp: PreferenceMLP):
        super().__init__()
        if image_encoder.embed_dim != mlp.input_size:
            raise ValueError(f"reward 'aesthetic': the CLIP embedding has {image_encoder.embed_dim} dimensions but the "
                             f"MLP takes {mlp.input_size} (the LAION MLP needs CLIP ViT-L/14: 768)")
        self.image_encoder = image_encoder
        self.mlp = mlp
        size = image_encoder.image_size
        self.preprocess = ImagePreprocess(size=size, geometry="shortest-crop", crop_rounding="floor")

    def embed(self, images: Tensor) -> Tensor:
        """L2-normalised CLIP image embeddings ``[B, D]`` of ``images`` ``[B, 3, H, W]`` in ``[0, 1]``."""
        weight_dtype = next(self.image_encoder.parameters()).dtype
        embedding = self.image_encoder(self.preprocess(images).to(weight_dtype))
        return embedding / torch.linalg.vector_norm(embedding, dim=-1, keepdim=True)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        embedding = self.embed(images)
        return self.mlp(embedding.to(next(self.mlp.parameters()).dtype)).to(images.dtype)


def random_clip_image_encoder(**overrides) -> TransformersCLIPImageEncoder:
    """CLIP ViT-L/14 image tower (transformers) with random weights; ``overrides`` change the config (tests)."""
    prepare_third_party_imports()
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(**{**CLIP_VIT_L14, **overrides})
    return TransformersCLIPImageEncoder(CLIPVisionModelWithProjection(config))


def load_transformers_clip(directory: Path, dtype: torch.dtype) -> TransformersCLIPImageEncoder:
    """The image tower + projection of a transformers CLIP directory (a full ``CLIPModel`` directory works)."""
    prepare_third_party_imports()
    from transformers import AutoConfig, CLIPVisionModelWithProjection

    config = AutoConfig.from_pretrained(str(directory))
    if getattr(config, "model_type", None) == "clip":  # a full CLIPModel: the projection width lives at the top
        vision = config.vision_config
        vision.projection_dim = config.projection_dim
        config = vision
    model, info = CLIPVisionModelWithProjection.from_pretrained(
        str(directory), config=config, dtype=dtype, output_loading_info=True
    )
    if info.get("missing_keys"):
        raise ValueError(
            f"reward 'aesthetic': {directory} lacks CLIP image-tower weights {sorted(info['missing_keys'])[:6]} "
            "(expected a CLIP ViT-L/14 directory such as openai/clip-vit-large-patch14)"
        )
    return TransformersCLIPImageEncoder(model)


def load_open_clip_file(
    path: Path, dtype: torch.dtype, architecture: str = OPEN_CLIP_ARCHITECTURE
) -> OpenCLIPImageEncoder:
    """The visual tower of an OpenAI/open_clip checkpoint file (``visual.*`` keys) in ``architecture``."""
    prepare_third_party_imports()
    import open_clip

    state = load_state_dict_file(path, "reward 'aesthetic': clip")
    visual = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    if not visual:
        raise ValueError(f"reward 'aesthetic': {path} has no 'visual.*' keys (not an OpenAI/open_clip CLIP checkpoint)")
    tower = open_clip.create_model(architecture, pretrained=None).visual
    load_exact(tower, visual, f"reward 'aesthetic': clip={path} (open_clip {architecture} visual tower)")
    return OpenCLIPImageEncoder(tower.to(dtype))


def load_aesthetic_mlp(path: Path) -> PreferenceMLP:
    """The LAION MLP from ``sac+logos+ava1-l14-linearMSE.pth`` (keys ``layers.N.*``; a bare ``N.*`` works too)."""
    state = load_state_dict_file(path, "reward 'aesthetic': mlp")
    state = {k if k.startswith("layers.") else f"layers.{k}": v for k, v in state.items()}
    first = state.get("layers.0.weight")
    mlp = PreferenceMLP(first.shape[1] if first is not None and first.dim() == 2 else 768)
    load_exact(mlp, state, f"reward 'aesthetic': mlp={path}")
    return mlp


def build_aesthetic(
    clip: str | None = None,
    mlp: str | None = None,
    random_weights: bool = False,
    dtype: str | torch.dtype = "float32",
    open_clip_architecture: str = OPEN_CLIP_ARCHITECTURE,
) -> AestheticReward:
    """The aesthetic reward.

    Args:
        clip: CLIP ViT-L/14: a transformers directory, a hub id (default ``openai/clip-vit-large-patch14``, read from
            the hub cache / downloaded only where allowed), or an OpenAI/open_clip checkpoint file.
        mlp: path to ``sac+logos+ava1-l14-linearMSE.pth`` (or a directory holding it).
        random_weights: the real architecture with random weights (tests, benchmarks; no files read).
        dtype: weight dtype of CLIP and the MLP (default float32; preprocessing and the returned scores are fp32).
        open_clip_architecture: open_clip model name used for a checkpoint *file* (default ``ViT-L-14-quickgelu``).
    """
    weight_dtype = parse_dtype(dtype, "aesthetic")
    if random_weights:
        return AestheticReward(random_clip_image_encoder(), PreferenceMLP(768)).to(weight_dtype)
    head = load_aesthetic_mlp(resolve_file(mlp, MLP_FILES)).to(weight_dtype)
    if clip is not None and Path(clip).expanduser().is_file():
        encoder = load_open_clip_file(Path(clip).expanduser(), weight_dtype, open_clip_architecture)
    else:
        encoder = load_transformers_clip(resolve_dir(clip, CLIP_DIR_FILES), weight_dtype)
    return AestheticReward(encoder, head)
