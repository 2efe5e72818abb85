"""Tiny versions of the learned rewards, for tests and CPU demos: the same classes and code paths as the real
models (transformers CLIP / open_clip / BLIP modules, the same preprocessing geometry and scoring), with small widths,
two layers and 32-pixel inputs, random weights. They build in well under a second.

* :func:`tiny_aesthetic`: CLIP vision (width 32, patch 8, 32 px, projection 16) + a 16-input aesthetic head;
* :func:`tiny_hps`: open_clip architecture ``fastnabla-tiny-clip`` (registered with open_clip on first use);
* :func:`tiny_imagereward`: BLIP vision (width 32) + BERT with cross-attention (width 32) + head, given a tokenizer;
* :func:`write_wordpiece_vocab`: a small *real* WordPiece vocabulary (``vocab.txt``) for a BERT tokenizer directory.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from fastnabla.compat import prepare_third_party_imports
from fastnabla.rewards.aesthetic import AestheticReward, random_clip_image_encoder
from fastnabla.rewards.hps import HPSReward, create_open_clip
from fastnabla.rewards.imagereward import ImageRewardModel, build_imagereward_model
from fastnabla.rewards.mlp_head import PreferenceMLP

TINY_OPEN_CLIP = "fastnabla-tiny-clip"
TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TINY_CLIP_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        image_size=32, patch_size=8, projection_dim=16)
TINY_BLIP_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        image_size=32, patch_size=8)
WORDS = ("a", "an", "the", "of", "in", "on", "with", "and", "photo", "painting", "picture", "cat", "dog", "bird",
         "horse", "cute", "small", "big", "red", "blue", "green", "black", "white", "sitting", "running", "sky",
         "grass", "tree", "house", "oil", "portrait")
SUFFIXES = ("s", "ing", "ed", "y")


def tiny_med_config(vocab_size: int) -> dict:
    """A BLIP ``med_config.json`` dict of width 32, 2 layers, 2 heads (cross-attention on)."""
    return dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                max_position_embeddings=64, layer_norm_eps=1e-12, pad_token_id=0, add_cross_attention=True)


def write_wordpiece_vocab(directory: str | Path) -> Path:
    """Write a small real WordPiece ``vocab.txt`` (BERT special tokens, common prompt words, ``##`` suffixes and
    single characters) into ``directory``; ``BertTokenizer.from_pretrained(directory)`` loads it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *(f"##{s}" for s in SUFFIXES), *chars,
              *(f"##{c}" for c in chars)]
    (directory / "vocab.txt").write_text("\n".join(dict.fromkeys(tokens)) + "\n", encoding="utf-8")
    return directory


def register_tiny_open_clip() -> str:
    """Register :data:`TINY_OPEN_CLIP` with open_clip (idempotent) and return its name."""
    prepare_third_party_imports()
    import open_clip

    if TINY_OPEN_CLIP not in open_clip.list_models():
        path = Path(tempfile.mkdtemp(prefix="fastnabla-open-clip-")) / f"{TINY_OPEN_CLIP}.json"
        path.write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
        open_clip.add_model_config(path)
    return TINY_OPEN_CLIP


def tiny_aesthetic() -> AestheticReward:
    head = PreferenceMLP(TINY_CLIP_VISION["projection_dim"])
    return AestheticReward(random_clip_image_encoder(**TINY_CLIP_VISION), head)


def tiny_hps(text_cache_size: int = 256, fast_attention: bool = True) -> HPSReward:
    model, tokenizer = create_open_clip(register_tiny_open_clip())
    return HPSReward(model, tokenizer, "hpsv2", text_cache_size, fast_attention)


def tiny_imagereward(tokenizer, max_length: int = 35) -> ImageRewardModel:
    return build_imagereward_model(tiny_med_config(len(tokenizer)), tokenizer, TINY_BLIP_VISION, max_length)
