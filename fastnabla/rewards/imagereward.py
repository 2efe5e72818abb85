"""ImageReward v1.0, ported onto transformers' BLIP modules (no dependency on the ``image-reward`` package).

The scoring model of ``ImageReward.pt`` (Xu et al. 2023), as the package's ``score`` / ``score_gard`` compute it:

    v      = BLIP_ViT_L16(normalize(resize_shortest_crop_224(x)))            # [B, 197, 1024], all tokens
    h      = BERT_xattn(tokens(prompt), cross-attending to v)[:, 0]          # [B, 768], the [CLS] state
    s(x)   = (MLP(h) - 0.16717362830052426) / 1.0333394966054072            # [B], z-scored; often negative

* BLIP ViT-L/16 (224 px, 24 blocks, width 1024, 16 heads, LayerNorm eps 1e-6, exact GELU) is transformers'
  ``BlipVisionModel``; the BERT text encoder with a cross-attention block in every layer (``med_config.json``:
  bert-base, vocabulary 30524, cross-attention width = 1024) is transformers' ``BlipTextModel`` built with
  ``is_decoder=True`` (which creates the cross-attention layers) and run bidirectionally (``is_decoder=False`` in
  the forward: no causal mask, as BLIP's encoder mode); the head is :class:`~fastnabla.rewards.mlp_head.PreferenceMLP`.
* Preprocessing: torchvision ``Resize(224, BICUBIC)`` + ``CenterCrop(224)`` (round offsets) + CLIP mean/std, as the
  package's PIL transform and its ReFL tensor transform.
* Prompts: bert-base-uncased WordPiece with BLIP's two added tokens (``[DEC]``, ``[ENC]``), padded/truncated to 35
  tokens (the package's ``score``), attention mask on the padding.

Checkpoint keys (``ImageReward.pt``, a flat state dict) map onto the port by :data:`KEY_MAP`; ``blip.text_proj``,
``blip.vision_proj`` and ``position_ids`` are not used by the score and are ignored.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from fastnabla.compat import prepare_third_party_imports
from fastnabla.rewards.base import RewardModel, Tensor, parse_dtype
from fastnabla.rewards.loading import WeightFiles, load_exact, load_state_dict_file, resolve_dir, resolve_file
from fastnabla.rewards.mlp_head import PreferenceMLP
from fastnabla.rewards.preprocess import ImagePreprocess

IR_HUB_ID = "THUDM/ImageReward"
TOKENIZER_HUB_ID = "bert-base-uncased"
SCORE_MEAN = 0.16717362830052426
SCORE_STD = 1.0333394966054072
PROMPT_TOKENS = 35
BLIP_ADDED_TOKENS = ("[DEC]", "[ENC]")  # bos_token and the additional special token BLIP adds to bert-base-uncased
# transformers BlipVisionConfig of BLIP's ViT-L/16 at 224 px (the real architecture)
BLIP_VIT_L16 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=224,
    patch_size=16,
    hidden_act="gelu",
    layer_norm_eps=1e-6,
    initializer_range=0.02,
)
# BLIP's med_config.json (bert-base-uncased + cross-attention), used for random weights when no file is given
BLIP_MED_CONFIG = dict(
    vocab_size=30524,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    hidden_act="gelu",
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    max_position_embeddings=512,
    layer_norm_eps=1e-12,
    pad_token_id=0,
    add_cross_attention=True,
)
IR_PREPROCESS = ImagePreprocess(size=224, geometry="shortest-crop", crop_rounding="round")
CHECKPOINT_FILES = WeightFiles(
    reward="imagereward",
    option="checkpoint",
    description="the ImageReward checkpoint",
    filenames=("ImageReward.pt",),
    source=f"https://huggingface.co/{IR_HUB_ID} (file ImageReward.pt)",
    hub_repo=IR_HUB_ID,
)
MED_CONFIG_FILES = WeightFiles(
    reward="imagereward",
    option="med_config",
    description="ImageReward's med_config.json",
    filenames=("med_config.json",),
    source=f"https://huggingface.co/{IR_HUB_ID} (file med_config.json)",
    hub_repo=IR_HUB_ID,
)
TOKENIZER_FILES = WeightFiles(
    reward="imagereward",
    option="tokenizer",
    description="the bert-base-uncased tokenizer",
    filenames=("vocab.txt",),
    source=f"https://huggingface.co/{TOKENIZER_HUB_ID} (vocab.txt, tokenizer_config.json; a directory)",
    hub_repo=TOKENIZER_HUB_ID,
)
# (checkpoint prefix, port prefix); "{i}" is a layer index
KEY_MAP = (
    ("blip.visual_encoder.cls_token", "vision.embeddings.class_embedding"),
    ("blip.visual_encoder.pos_embed", "vision.embeddings.position_embedding"),
    ("blip.visual_encoder.patch_embed.proj.", "vision.embeddings.patch_embedding."),
    ("blip.visual_encoder.blocks.{i}.norm1.", "vision.encoder.layers.{i}.layer_norm1."),
    ("blip.visual_encoder.blocks.{i}.attn.qkv.", "vision.encoder.layers.{i}.self_attn.qkv."),
    ("blip.visual_encoder.blocks.{i}.attn.proj.", "vision.encoder.layers.{i}.self_attn.projection."),
    ("blip.visual_encoder.blocks.{i}.norm2.", "vision.encoder.layers.{i}.layer_norm2."),
    ("blip.visual_encoder.blocks.{i}.mlp.", "vision.encoder.layers.{i}.mlp."),
    ("blip.visual_encoder.norm.", "vision.post_layernorm."),
    ("blip.text_encoder.", "text."),
    ("mlp.", "head."),
)
IGNORED_KEYS = ("blip.text_proj.", "blip.vision_proj.", "blip.text_encoder.embeddings.position_ids")


def _rename(key: str, pairs: Sequence[tuple[str, str]]) -> str | None:
    for source, target in pairs:
        pattern = "^" + re.escape(source).replace(re.escape("{i}"), r"(\d+)")
        match = re.match(pattern, key)
        if match:
            renamed = target.replace("{i}", match.group(1)) if match.groups() else target
            return renamed + key[match.end() :]
    return None


def checkpoint_to_port(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``ImageReward.pt`` keys -> :class:`ImageRewardModel` keys; unknown keys are kept (the loader reports them)."""
    out = {}
    for key, value in state.items():
        if key.startswith(IGNORED_KEYS):
            continue
        out[_rename(key, KEY_MAP) or key] = value
    return out


def port_to_checkpoint(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse map: :class:`ImageRewardModel` keys -> ``ImageReward.pt`` keys (the port's weights in the
    package's layout; used to cross-check against the package)."""
    inverse = [(target, source) for source, target in KEY_MAP]
    return {(_rename(k, inverse) or k): v for k, v in state.items()}


def text_config_from_med(med: dict, encoder_width: int):
    """transformers ``BlipTextConfig`` equivalent to a BLIP ``med_config.json`` (BertConfig fields)."""
    prepare_third_party_imports()
    from transformers import BlipTextConfig

    if not med.get("add_cross_attention", False):
        raise ValueError("med_config: add_cross_attention must be true (ImageReward's text encoder cross-attends)")
    if med.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"med_config: position_embedding_type={med['position_embedding_type']!r} is not supported")
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "hidden_act", "max_position_embeddings", "layer_norm_eps", "pad_token_id")
    absent = [k for k in keys if k not in med]
    if absent:
        raise ValueError(f"med_config lacks the fields {absent}")
    return BlipTextConfig(
        **{k: med[k] for k in keys},
        hidden_dropout_prob=med.get("hidden_dropout_prob", 0.1),
        attention_probs_dropout_prob=med.get("attention_probs_dropout_prob", 0.1),
        encoder_hidden_size=encoder_width,
        bos_token_id=med.get("bos_token_id"),  # BertConfig has none; BlipTextConfig's default (30522) is unused here
        eos_token_id=med.get("eos_token_id"),
        sep_token_id=med.get("sep_token_id"),
        is_decoder=True,  # creates the cross-attention layers; the forward runs bidirectionally (is_decoder=False)
    )


def load_bert_tokenizer(directory: Path):
    """bert-base-uncased's tokenizer from a local directory, with BLIP's ``[DEC]`` / ``[ENC]`` added."""
    prepare_third_party_imports()
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(directory))
    vocab_file = Path(directory) / "vocab.txt"
    if vocab_file.is_file():
        expected = sum(1 for line in vocab_file.read_text(encoding="utf-8").splitlines() if line.strip())
        if len(tokenizer) < expected:
            raise ValueError(f"tokenizer from {directory} has {len(tokenizer)} tokens but vocab.txt lists {expected}")
    tokenizer.add_special_tokens({"bos_token": BLIP_ADDED_TOKENS[0]})
    tokenizer.add_special_tokens({"additional_special_tokens": [BLIP_ADDED_TOKENS[1]]})
    return tokenizer


def character_wordpiece_tokenizer():
    """A tiny real WordPiece tokenizer (special tokens, lowercase letters, digits, punctuation and their ``##``
    continuations) for *random-weight* runs without bert-base-uncased's files; its ids are not BERT's."""
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789") + list(".,!?'\"-:;()&/")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + [f"##{c}" for c in chars]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
        return load_bert_tokenizer(Path(tmp))


class ImageRewardModel(RewardModel):
    """ImageReward's score ``(MLP(BERT_xattn(prompt, ViT(x))[CLS]) - mean) / std`` (see the module docstring)."""

    name = "imagereward"
    positive = False  # z-scored: negative for below-average images

    def __init__(self, vision: nn.Module, text: nn.Module, head: PreferenceMLP, tokenizer,
                 max_length: int = PROMPT_TOKENS, score_mean: float = SCORE_MEAN, score_std: float = SCORE_STD):
        super().__init__()
        if max_length < 2:
            raise ValueError(f"reward 'imagereward': max_length must be >= 2 ([CLS] + [SEP]), got {max_length}")
        self.vision = vision
        self.text = text
        self.head = head
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.score_mean = float(score_mean)
        self.score_std = float(score_std)
        size = vision.config.image_size
        self.preprocess = ImagePreprocess(size=int(size), geometry="shortest-crop", crop_rounding="round")

    def tokenize(self, prompts: Sequence[str], device: torch.device) -> tuple[Tensor, Tensor]:
        """``(input_ids, attention_mask)`` ``[B, max_length]``: padded to and truncated at ``max_length``."""
        batch = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        ids = batch["input_ids"]
        vocab = self.text.config.vocab_size
        if int(ids.max()) >= vocab:
            raise ValueError(f"reward 'imagereward': token id {int(ids.max())} >= the text model's vocab_size {vocab}; "
                             "the tokenizer does not belong to this med_config")
        return ids.to(device), batch["attention_mask"].to(device)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        weight_dtype = self.vision.embeddings.patch_embedding.weight.dtype
        image_tokens = self.vision(pixel_values=self.preprocess(images).to(weight_dtype)).last_hidden_state
        ids, mask = self.tokenize(prompts, images.device)
        text = self.text(input_ids=ids, attention_mask=mask, encoder_hidden_states=image_tokens, is_decoder=False)
        raw = self.head(text.last_hidden_state[:, 0].to(next(self.head.parameters()).dtype))
        return ((raw - self.score_mean) / self.score_std).to(images.dtype)


def build_imagereward_model(med: dict, tokenizer, vision_overrides: dict | None = None,
                            max_length: int = PROMPT_TOKENS) -> ImageRewardModel:
    """The port with random weights (PyTorch's default init everywhere; the package's own head init,
    N(0, 1/(d+1)), makes random scores nearly constant)."""
    prepare_third_party_imports()
    from transformers import BlipTextModel, BlipVisionConfig, BlipVisionModel

    vision = BlipVisionModel(BlipVisionConfig(**{**BLIP_VIT_L16, **(vision_overrides or {})}))
    text = BlipTextModel(text_config_from_med(med, vision.config.hidden_size), add_pooling_layer=False)
    return ImageRewardModel(vision, text, PreferenceMLP(text.config.hidden_size), tokenizer, max_length)


def build_imagereward(
    checkpoint: str | None = None,
    med_config: str | None = None,
    tokenizer: str | None = None,
    random_weights: bool = False,
    dtype: str | torch.dtype = "float32",
    max_length: int = PROMPT_TOKENS,
    vision_config: dict | None = None,
) -> ImageRewardModel:
    """The ImageReward v1.0 reward.

    Args:
        checkpoint: ``ImageReward.pt`` or a directory holding it (default: hub ``THUDM/ImageReward``).
        med_config: ``med_config.json`` (default: next to the checkpoint, else hub ``THUDM/ImageReward``).
        tokenizer: a bert-base-uncased tokenizer directory (``vocab.txt``, ``tokenizer_config.json``; default: hub
            ``bert-base-uncased``). With ``random_weights`` and no tokenizer, a tiny character WordPiece vocabulary.
        random_weights: the real architecture (BLIP ViT-L/16 + BERT-base with cross-attention) with random weights.
        dtype: weight dtype (default float32; preprocessing and the returned scores are fp32).
        max_length: prompt tokens (the package's ``score`` uses 35).
        vision_config: overrides of the BLIP ViT-L/16 ``BlipVisionConfig`` (tests, other BLIP checkpoints).
    """
    weight_dtype = parse_dtype(dtype, "imagereward")
    if random_weights:
        if tokenizer:
            tok = load_bert_tokenizer(resolve_dir(tokenizer, TOKENIZER_FILES))
        else:
            tok = character_wordpiece_tokenizer()
        med = json.loads(resolve_file(med_config, MED_CONFIG_FILES).read_text()) if med_config else BLIP_MED_CONFIG
        return build_imagereward_model(med, tok, vision_config, max_length).to(weight_dtype)
    ckpt_path = resolve_file(checkpoint, CHECKPOINT_FILES)
    if med_config is None and (ckpt_path.parent / "med_config.json").is_file():
        med_config = str(ckpt_path.parent / "med_config.json")
    med = json.loads(resolve_file(med_config, MED_CONFIG_FILES).read_text())
    tok = load_bert_tokenizer(resolve_dir(tokenizer, TOKENIZER_FILES))
    model = build_imagereward_model(med, tok, vision_config, max_length)
    state = checkpoint_to_port(load_state_dict_file(ckpt_path, "reward 'imagereward': checkpoint"))
    load_exact(model, state, f"reward 'imagereward': checkpoint={ckpt_path}")
    return model.to(weight_dtype)
