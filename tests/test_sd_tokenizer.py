"""The CLIP tokenizer built from open_clip's BPE file tokenizes exactly like open_clip."""

from __future__ import annotations

import pytest

from fastnabla.tasks.sd.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    MAX_LENGTH,
    VOCAB_SIZE,
    build_clip_tokenizer,
    check_tokenizer,
    clip_vocab_and_merges,
    find_open_clip_bpe,
)

PROMPTS = [
    pytest.param("cat", id="one-word"),
    pytest.param("a photo of a hedgehog riding a bicycle", id="sentence"),
    pytest.param("A Hedgehog, Riding!! a BIKE; 3 cafés & naïve émigrés", id="case-punct-accents"),
    pytest.param("tokens   with\tspaces\nand newlines", id="whitespace"),
    pytest.param("emoji 😀 and 中文 and ÿþ", id="unicode"),
    pytest.param("", id="empty"),
    pytest.param("lorem ipsum " * 60, id="truncated"),
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_clip_tokenizer()


@pytest.fixture(scope="module")
def open_clip_tokenize():
    open_clip = pytest.importorskip("open_clip")
    return open_clip.tokenize


def test_vocabulary_layout():
    vocab, merges = clip_vocab_and_merges()
    assert len(vocab) == VOCAB_SIZE == 49408 and len(merges) == 48894
    assert vocab[BOS_TOKEN] == 49406 and vocab[EOS_TOKEN] == 49407
    assert vocab["!"] == 0 and vocab["a"] == 64 and vocab["a</w>"] == 256 + 64  # printable bytes first
    assert len(set(vocab.values())) == len(vocab)


def test_tokenizer_settings(tokenizer):
    assert len(tokenizer) == VOCAB_SIZE
    assert tokenizer.model_max_length == MAX_LENGTH
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (49406, 49407)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_token_ids_equal_open_clip(tokenizer, open_clip_tokenize, prompt):
    ours = tokenizer(prompt, padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids
    theirs = open_clip_tokenize([prompt])[0].tolist()
    assert len(ours) == len(theirs) == MAX_LENGTH
    end = theirs.index(49407) + 1  # open_clip pads with 0, the SD 1.x tokenizer with <|endoftext|>
    assert ours[:end] == theirs[:end]
    assert set(ours[end:]) <= {49407}


def test_bpe_file_is_found_without_importing_open_clip():
    path = find_open_clip_bpe()
    assert path.name == "bpe_simple_vocab_16e6.txt.gz" and path.is_file()


def test_check_tokenizer_rejects_the_silent_two_token_tokenizer():
    class TwoTokens:
        def __len__(self):
            return 2

    with pytest.raises(ValueError, match="only 2 tokens.*vocab.json"):
        check_tokenizer(TwoTokens(), "somewhere/tokenizer")
