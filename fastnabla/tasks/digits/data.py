"""The data of the ``digits`` yardstick: scikit-learn's bundled handwritten digits, split, upsampled, prompted.

``sklearn.datasets.load_digits`` ships 1,797 grey 8x8 images (pixel values 0..16) with labels 0..9, offline.
Here they become

* images ``[N, 3, R, R]`` in ``[-1, 1]`` (the grey value repeated on R, G, B, as Stable Diffusion's VAE expects
  RGB), bilinearly upsampled from 8x8 to ``R x R`` (``R = 16`` by default);
* a fixed train / held-out split: per class, a seeded permutation (numpy's PCG64, stable across versions) puts
  :data:`HELD_OUT_FRACTION` of the images in the held-out set, which no model ever trains on;
* prompts: each prompt names a set of digits (:data:`PROMPTS`); a training image of digit ``y`` is paired with one
  of the 4 prompts whose set contains ``y`` ("a handwritten digit", its parity, its size, "the digit y"), the kind
  drawn with fixed weights (:data:`PROMPT_KIND_WEIGHTS`). Every digit has one prompt of each kind, so
  ``P(prompt | y)`` is constant on the prompt's set and ``p(x | prompt) = p(x | y in S_prompt)``. With probability
  ``p_uncond`` the prompt is dropped to ``""`` (classifier-free-guidance training).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

Tensor = torch.Tensor
NUM_CLASSES = 10
HELD_OUT_FRACTION = 0.2
SPLIT_SEED = 0

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPTS: dict[str, tuple[int, ...]] = {
    "a handwritten digit": tuple(range(10)),
    "an even digit": (0, 2, 4, 6, 8),
    "an odd digit": (1, 3, 5, 7, 9),
    "a small digit": (0, 1, 2, 3, 4),
    "a large digit": (5, 6, 7, 8, 9),
    **{f"the digit {k}": (k,) for k in range(10)},
}
DEFAULT_PROMPT = "a handwritten digit"
PROMPT_KINDS = ("all digits", "parity", "size", "single digit")
# Training frequency of each prompt kind: the single-digit prompts (10 of them, each seen on a tenth of the data)
# get the most, so the UNet learns to tell them apart within the build budget (with (0.2, 0.2, 0.2, 0.4), lr 1e-3
# and EMA 0.999, "the digit 3" gave 9 % threes without guidance; with these and lr 2e-3, EMA 0.995: 94 %).
PROMPT_KIND_WEIGHTS = (0.1, 0.15, 0.15, 0.6)


@dataclass(frozen=True)
class DigitsSplit:
    """Images ``[N, 3, R, R]`` in ``[-1, 1]`` (fp32) and labels ``[N]`` (int64) of the train and held-out sets."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor


def load_raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """``(images [1797, 8, 8] float in [0, 1], labels [1797] int64)`` from scikit-learn (no download).

    Raises:
        ModuleNotFoundError: scikit-learn is not installed (with the pip command).
    """
    try:
        from sklearn.datasets import load_digits
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "the digits yardstick uses scikit-learn's bundled digits data set: pip install scikit-learn"
        ) from err
    data = load_digits()
    return data.images.astype(np.float32) / 16.0, data.target.astype(np.int64)


def split_indices(
    labels: np.ndarray, held_out: float = HELD_OUT_FRACTION, seed: int = SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """``(train_idx, test_idx)``: per class, ``round(held_out * n_class)`` images of a seeded permutation are
    held out. Both sorted; together they are a partition of ``range(len(labels))``."""
    if not 0 < held_out < 1:
        raise ValueError(f"held_out must be in (0, 1), got {held_out}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for k in np.unique(labels):
        idx = np.flatnonzero(labels == k)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(held_out * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def to_model_images(images: Tensor | np.ndarray, resolution: int) -> Tensor:
    """Grey images ``[N, h, w]`` in ``[0, 1]`` -> ``[N, 3, R, R]`` in ``[-1, 1]`` (bilinear resize, grey on RGB)."""
    x = torch.as_tensor(images, dtype=torch.float32)
    if x.dim() != 3:
        raise ValueError(f"expected grey images [N, h, w], got shape {tuple(x.shape)}")
    x = x[:, None]
    if x.shape[-1] != resolution or x.shape[-2] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return (x.clamp(0, 1) * 2 - 1).expand(-1, 3, -1, -1).contiguous()


def load_split(resolution: int = 16) -> DigitsSplit:
    """The fixed train / held-out split at ``resolution`` (images in ``[-1, 1]``, ``[N, 3, R, R]``)."""
    if resolution < 8:
        raise ValueError(f"resolution must be >= 8 (the data are 8x8), got {resolution}")
    images, labels = load_raw_digits()
    train, test = split_indices(labels)
    lab = torch.from_numpy(labels)
    return DigitsSplit(
        to_model_images(images[train], resolution), lab[train], to_model_images(images[test], resolution), lab[test]
    )


def prompt_classes(prompt: str) -> tuple[int, ...]:
    """The digits a prompt names (:data:`PROMPTS`); a ``ValueError`` lists the known prompts otherwise."""
    if prompt not in PROMPTS:
        raise ValueError(f"unknown digits prompt {prompt!r}; known prompts: {list(PROMPTS)}")
    return PROMPTS[prompt]


def prompts_by_class() -> list[list[str]]:
    """For each digit ``k``, its 4 prompts in :data:`PROMPT_KINDS` order: all digits, parity, size, ``k`` itself."""
    return [[p for p, s in PROMPTS.items() if k in s] for k in range(NUM_CLASSES)]


def draw_training_prompts(
    labels: Tensor, p_uncond: float, generator: torch.Generator, kind_weights: tuple[float, ...] = PROMPT_KIND_WEIGHTS
) -> list[str]:
    """One prompt per label: ``""`` with probability ``p_uncond``, else the label's prompt of a kind drawn with
    ``kind_weights`` (:data:`PROMPT_KINDS`). Every digit has exactly one prompt of each kind, so
    ``P(prompt | y)`` is the same for every ``y`` in the prompt's set and ``p(x | prompt) = p(x | y in S)``."""
    if len(kind_weights) != len(PROMPT_KINDS) or min(kind_weights) < 0 or sum(kind_weights) <= 0:
        raise ValueError(f"kind_weights needs {len(PROMPT_KINDS)} non-negative weights, got {kind_weights}")
    table = prompts_by_class()
    w = torch.tensor(kind_weights, dtype=torch.float64)
    choice = torch.multinomial(w, len(labels), replacement=True, generator=generator).tolist()
    drop = (torch.rand(len(labels), generator=generator) < p_uncond).tolist()
    return ["" if d else table[int(y)][c] for y, c, d in zip(labels.tolist(), choice, drop, strict=True)]


def shift_augment(images: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Each image translated by an integer offset in ``[-max_shift, max_shift]^2`` (background -1 fills in)."""
    if max_shift <= 0:
        return images
    n, _, h, w = images.shape
    pad = F.pad(images, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator).tolist()
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator).tolist()
    return torch.stack([pad[i, :, y : y + h, x : x + w] for i, (x, y) in enumerate(zip(dx, dy, strict=True))])
