"""The reward interface every reward model implements, and the transform to ``log R``.

A reward maps images in ``[0, 1]`` (``[B, 3, H, W]``, any resolution, any float dtype) and their
prompts to one score per image (``[B]``), differentiably w.r.t. the pixels. Scores are computed in
fp32 whatever the caller's dtype (bf16 rewards give large gradient errors). The GFlowNet methods
need ``log R``: :class:`RewardTransform` turns a raw score into ``log R`` (``log`` for positive
scores, an exponential tilt ``R = exp(scale (score - shift))`` for scores that can be negative).

:class:`Reward` wraps a :class:`RewardModel` with its transform and a chunk size that bounds
memory: :meth:`Reward.log_reward` is the differentiable path (backprop through sampling, ReFL and
DRaFT), :meth:`Reward.log_reward_and_grad` computes values and pixel gradients chunk by chunk, so a
chunk's activations are freed before the next one runs (the forward-looking gradient).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

Tensor = torch.Tensor
TRANSFORMS = ("log", "exp")


def _help(text: str, **kw) -> dict:
    return {"metadata": {"help": text}, **kw}


@dataclass
class RewardTransform:
    """``log R`` from a raw score ``s``.

    * ``log``: ``R = s`` (the score must be positive): ``log R = log(max(s, floor))``;
    * ``exp``: ``R = exp(scale (s - shift))``: ``log R = scale (s - shift)`` (any real score).
    """

    kind: str = field(default="log", **_help(f"one of {TRANSFORMS}: log R = log(score) or scale*(score-shift)"))
    scale: float = field(default=1.0, **_help("'exp' transform: log R = scale * (score - shift)"))
    shift: float = field(default=0.0, **_help("'exp' transform: score offset"))
    floor: float = field(default=1e-6, **_help("'log' transform: scores are clamped to >= floor"))

    def validate(self) -> None:
        if self.kind not in TRANSFORMS:
            raise ValueError(f"reward transform kind={self.kind!r} is not one of {TRANSFORMS}")
        if self.kind == "log" and not self.floor > 0:
            raise ValueError(f"reward transform floor must be > 0, got {self.floor}")
        if not math.isfinite(self.scale) or self.scale == 0:
            raise ValueError(f"reward transform scale must be finite and non-zero, got {self.scale}")

    def __call__(self, score: Tensor) -> Tensor:
        if self.kind == "log":
            return score.clamp(min=self.floor).log()
        return self.scale * (score - self.shift)


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64, "fp64": torch.float64}


def parse_dtype(value: str | torch.dtype, reward: str) -> torch.dtype:
    """The weight dtype option of a learned reward (``"float32"``, ``"bf16"``, a ``torch.dtype``...)."""
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value.lower().removeprefix("torch.") in DTYPES:
        return DTYPES[value.lower().removeprefix("torch.")]
    raise ValueError(f"reward {reward!r}: dtype={value!r} is not one of {sorted(DTYPES)}")


class RewardModel(nn.Module):
    """Base class: subclasses implement :meth:`score` on fp32 images in ``[0, 1]``.

    Class attributes: ``name`` (registry key), ``positive`` (whether scores are always > 0, so the
    ``log`` transform applies), ``analytic`` (a cheap closed-form reward for tests and demos, not a
    learned ppretrained model).
    """

    name: str = "reward"
    positive: bool = False
    analytic: bool = False

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Raw scores ``[B]`` (fp32) of ``images`` ``[B, 3, H, W]`` (fp32, ``[0, 1]``)."""
        raise NotImplementedError

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.score(images, prompts)


def check_images(images: Tensor, prompts: Sequence[str] | None) -> None:
    """Shape/dtype checks at the reward boundary, with errors that say what was expected."""
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"images must be a floating tensor in [0, 1], got {images.dtype}")
    if prompts is not None and len(prompts) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts (one prompt per image)")


class Reward(nn.Module):
    """A reward model, its ``log R`` transform and a chunk size (``None``: the whole batch at once).

    The model's parameters are frozen (``requires_grad_(False)``, eval mode): rewards are fixed
    functions of the pixels; gradients flow to the images only.
    """

    def __init__(self, model: RewardModel, transform: RewardTransform | None = None, chunk_size: int | None = None):
        super().__init__()
        transform = transform or RewardTransform(kind="log" if model.positive else "exp")
        transform.validate()
        if transform.kind == "log" and not model.positive:
            raise ValueError(
                f"reward {model.name!r} can be negative: the 'log' transform needs positive scores; use "
                "kind='exp' (log R = scale * (score - shift))"
            )
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"reward chunk_size must be >= 1 or None, got {chunk_size}")
        self.model = model.eval().requires_grad_(False)
        self.transform = transform
        self.chunk_size = chunk_size

    @property
    def name(self) -> str:
        return self.model.name

    def _chunks(self, n: int) -> list[slice]:
        size = self.chunk_size or max(n, 1)
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Raw scores ``[B]`` in fp32, differentiable w.r.t. ``images``."""
        check_images(images, prompts)
        x = images.float()
        return torch.cat([self.model.score(x[s], list(prompts[s])).float() for s in self._chunks(x.shape[0])])

    def log_reward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """``log R`` ``[B]`` in fp32, differentiable w.r.t. ``images`` (graphs of all chunks are kept)."""
        return self.transform(self.score(images, prompts))

    def log_reward_and_grad(self, images: Tensor, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """``(log R [B], d log R / d images)`` computed chunk by chunk; the gradient is fp32.

        Each chunk's graph is freed before the next chunk runs, so peak memory is one chunk's.
        """
        check_images(images, prompts)
        values, grads = [], []
        for s in self._chunks(images.shape[0]):
            with torch.enable_grad():
                x = images[s].detach().float().requires_grad_(True)
                log_r = self.transform(self.model.score(x, list(prompts[s])).float())
                (g,) = torch.autograd.grad(log_r.sum(), x)
            values.append(log_r.detach())
            grads.append(g)
        return torch.cat(values), torch.cat(grads)
