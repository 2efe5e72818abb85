"""A real CLIP tokenizer without a hub: built from the BPE vocabulary that open_clip ships.

``open_clip_torch`` ships ``bpe_simple_vocab_16e6.txt.gz`` (the CLIP BPE merges). The CLIP vocabulary
is derived from it: the 256 byte symbols (bytes mapped to printable characters, printable bytes
first), the same with the end-of-word marker ``</w>``, one token per merge (48,894 merges), then
``<|startoftext|>`` and ``<|endoftext|>`` -- 49,408 tokens, the vocabulary of every SD 1.x text
encoder. Written as ``vocab.json`` + ``merges.txt`` and loaded with ``CLIPTokenizer.from_pretrained``
it tokenizes exactly like open_clip's tokenizer (tested).

Traps (transformers 5.23): ``CLIPTokenizer(vocab_file=..., merges_file=...)`` silently builds a
2-token tokenizer, so the files are loaded with ``from_pretrained``; and ``model_max_length`` must
be 77 (diffusers pipelines fail with an ``OverflowError`` otherwise).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import tempfile
from pathlib import Path

from fastnabla.compat import prepare_third_party_imports

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merges of the file
VOCAB_SIZE = 2 * 256 + NUM_MERGES + 2
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77
MIN_PLAUSIBLE_VOCAB = 1000  # a loaded tokenizer smaller than this is the silent 2-token failure


def find_open_clip_bpe() -> Path:
    """Path of open_clip's BPE vocabulary, located without importing open_clip.

    Raises:
        FileNotFoundError: open_clip_torch is not installed or lacks the file.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the tiny pipeline's CLIP tokenizer is built from {BPE_FILE}, shipped by open_clip_torch: "
            "pip install open_clip_torch"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BPE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"open_clip_torch is installed but {path} is missing")
    return path


def _byte_symbols() -> list[str]:
    """The 256 byte symbols in CLIP vocabulary order: printable bytes as themselves, first, then the
    other bytes mapped to ``chr(256 + k)`` in byte order (so no symbol is whitespace or a control)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    keep = set(printable)
    others = [b for b in range(256) if b not in keep]
    return [chr(b) for b in printable] + [chr(256 + k) for k in range(len(others))]


def clip_vocab_and_merges(bpe_path: str | Path | None = None) -> tuple[dict[str, int], list[str]]:
    """``(token -> id, merge lines)`` of the CLIP vocabulary derived from the BPE file."""
    bpe_path = Path(bpe_path) if bpe_path is not None else find_open_clip_bpe()
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : 1 + NUM_MERGES]  # line 0 is a version header
    if len(merges) != NUM_MERGES or any(len(m.split()) != 2 for m in merges):
        raise ValueError(f"{bpe_path} is not a CLIP BPE merge list ({len(merges)} usable merge lines)")
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def write_clip_tokenizer_files(directory: str | Path, bpe_path: str | Path | None = None) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` (with its ``#version`` header) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges(bpe_path)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return directory


def check_tokenizer(tokenizer, where: str) -> None:
    """Reject the silently-empty tokenizer transformers builds from incomplete files."""
    size = len(tokenizer)
    if size < MIN_PLAUSIBLE_VOCAB:
        raise ValueError(
            f"the tokenizer loaded from {where} has only {size} tokens: its files are incomplete "
            "(a CLIP tokenizer needs tokenizer.json, or vocab.json + merges.txt)"
        )


def build_clip_tokenizer(bpe_path: str | Path | None = None, pad_token: str | None = None):
    """A ``transformers.CLIPTokenizer`` (49,408 tokens, ``model_max_length=77``) from open_clip's BPE file.

    ``pad_token``: None pads with ``<|endoftext|>`` (CLIP ViT-L, SD 1.x and SDXL's ``tokenizer``); ``"!"`` (id 0) is
    SDXL's ``tokenizer_2`` (OpenCLIP bigG pads with zeros)."""
    prepare_third_party_imports()
    from transformers import CLIPTokenizer

    extra = {"pad_token": pad_token} if pad_token is not None else {}
    with tempfile.TemporaryDirectory(prefix="fastnabla-clip-tok-") as tmp:
        write_clip_tokenizer_files(tmp, bpe_path)
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=MAX_LENGTH, **extra)
    check_tokenizer(tokenizer, "open_clip's BPE vocabulary")
    if len(tokenizer) != VOCAB_SIZE:
        raise ValueError(f"built a CLIP tokenizer with {len(tokenizer)} tokens, expected {VOCAB_SIZE}")
    return tokenizer
