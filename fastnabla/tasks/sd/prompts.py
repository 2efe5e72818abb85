"""Prompt sets: the built-in simple-animal prompts (as in DDPO) or a text file with one prompt per line."""

from __future__ import annotations

from pathlib import Path

import torch

# The 45 common animals DDPO trains on (Black et al., 2023, "simple animals"); each prompt is the bare name.
ANIMALS: tuple[str, ...] = (
    "cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow", "goat",
    "lion", "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle", "ant", "butterfly", "fish",
    "shark", "whale", "dolphin", "squirrel", "mouse", "rat", "snake", "turtle", "frog", "chicken", "duck",
    "goose", "bee", "pig", "turkey", "fly", "llama", "camel", "bat", "gorilla", "hedgehog", "kangaroo",
)  # fmt: skip

BUILTIN_PROMPT_SETS: dict[str, tuple[str, ...]] = {"animals": ANIMALS}


def load_prompts(source: str, field_name: str = "sd.prompts.source") -> list[str]:
    """The prompts of a built-in set name or of a UTF-8 text file (one per line; blank lines skipped).

    Raises:
        ValueError: naming ``field_name`` when the file does not exist or holds no prompt.
    """
    if source in BUILTIN_PROMPT_SETS:
        return list(BUILTIN_PROMPT_SETS[source])
    path = Path(source).expanduser()
    if not path.is_file():
        raise ValueError(
            f"{field_name}={source!r} is neither a built-in prompt set {tuple(BUILTIN_PROMPT_SETS)} "
            "nor an existing prompt file (one prompt per line)"
        )
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"{field_name}: prompt file {str(path)!r} holds no prompt (one prompt per line)")
    return prompts


def draw_prompts(prompts: list[str], n: int, generator: torch.Generator | None = None) -> list[str]:
    """``n`` prompts drawn uniformly with replacement, reproducibly from ``generator`` (a CPU generator)."""
    if not prompts:
        raise ValueError("cannot draw from an empty prompt set")
    idx = torch.randint(len(prompts), (n,), generator=generator)
    return [prompts[i] for i in idx.tolist()]
