"""Rewards of the ``digits`` yardstick, from its digit classifier (:mod:`fastnabla.tasks.digits`).

Both take images in ``[0, 1]`` (``[B, 3, H, W]``, the digits pipeline's 16x16; other sizes are resized by the
classifier) and are differentiable w.r.t. the pixels. ``p(y | x) = softmax(logits(x))``.

* ``digits-class``: ``score = log p(y in S | x) = logsumexp_{k in S} logits_k - logsumexp_k logits_k`` (<= 0) for a
  class set ``S`` (option ``classes``, e.g. ``[3]`` or ``[0, 2, 4, 6, 8]``). At ``beta = 1`` the target
  ``p# . p(S|x)`` is ``p#`` conditioned on ``S`` (for a calibrated classifier) -- a known answer for the class
  histogram (``h*_k ~ h#_k`` on ``S``); smaller ``beta`` tilts towards ``S`` only partly.
* ``digits-value``: ``score = sum_k v_k p(y = k | x)``, the expected value of the digit (``v_k = k`` by default,
  option ``values``). The second case because it behaves differently: it is smooth and bounded (``[0, 9]``) where
  ``log p(S|x)`` spans tens of nats (almost no gradient once a sample is confidently in ``S``, a huge one far from
  it), and it tilts *every* class: for a confident classifier the target histogram is ``h*_k ~ h#_k exp(beta v_k)``,
  a graded reweighting a method must reproduce across all ten classes, not just moving mass into a set.
  Option ``temperature`` ``T`` (default 1): ``p_T(y | x) = softmax(logits(x) / T)``. The digits classifier is
  over-confident (median top-2 logit margin 24 nats on held-out digits), so at ``T = 1`` the expected value is flat
  almost everywhere (median pixel-gradient norm 3e-9); ``T > 1`` makes its gradient informative (docs/digits.md).

Scores are not positive, so the default transform is ``exp`` with scale 1: ``log R = score``.

The classifier (option ``classifier``, :mod:`fastnabla.rewards.digits_classifier`): a digits pipeline directory
holding ``classifier.safetensors``, or the file itself; by default the full build's in the default cache. A missing
file raises a ``FileNotFoundError`` naming it and the command that builds it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fastnabla.rewards.base import RewardModel, Tensor
from fastnabla.rewards.digits_classifier import NUM_CLASSES, load_classifier, resolve_classifier_path


def _classes(classes: int | Sequence[int]) -> list[int]:
    values = [classes] if isinstance(classes, int) else list(classes)
    if not values or any(not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < NUM_CLASSES for k in values):
        raise ValueError(f"digits-class: classes must be a non-empty list of digits 0..9, got {classes!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"digits-class: classes has duplicates: {classes!r}")
    if len(values) == NUM_CLASSES:
        raise ValueError("digits-class: classes holds all 10 digits, so log p(y in S | x) = 0 for every image")
    return sorted(values)


def _values(values: Sequence[float] | None) -> list[float]:
    values = list(range(NUM_CLASSES)) if values is None else list(values)
    ok = len(values) == NUM_CLASSES and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    if not ok or not all(math.isfinite(v) for v in values):
        raise ValueError(f"digits-value: values must be 10 finite numbers (one per digit), got {values!r}")
    return [float(v) for v in values]


class DigitsClassReward(RewardModel):
    """``log p(y in S | x)`` from the digits classifier ``[B]`` (<= 0)."""

    name = "digits-class"
    positive = False

    def __init__(self, classifier: torch.nn.Module, classes: int | Sequence[int]):
        super().__init__()
        self.classifier = classifier
        self.classes = _classes(classes)
        mask = torch.zeros(NUM_CLASSES, dtype=torch.bool)
        mask[self.classes] = True
        self.register_buffer("mask", mask, persistent=False)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        logits = self.classifier(images)
        inside = logits.masked_fill(~self.mask, float("-inf"))
        return torch.logsumexp(inside, dim=1) - torch.logsumexp(logits, dim=1)


def _temperature(temperature: float) -> float:
    ok = isinstance(temperature, int | float) and not isinstance(temperature, bool)
    if not ok or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"digits-value: temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


class DigitsValueReward(RewardModel):
    """``sum_k v_k p_T(y = k | x)``: the expected digit value under the classifier at temperature ``T`` ``[B]``."""

    name = "digits-value"
    positive = False

    def __init__(self, classifier: torch.nn.Module, values: Sequence[float] | None = None, temperature: float = 1.0):
        super().__init__()
        self.classifier = classifier
        self.temperature = _temperature(temperature)
        self.register_buffer("values", torch.tensor(_values(values)), persistent=False)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        probs = torch.softmax(self.classifier(images) / self.temperature, dim=1)
        return probs @ self.values.to(probs.dtype)


def build_digits_class(classes: int | Sequence[int] = (3,), classifier: str | None = None) -> DigitsClassReward:
    _classes(classes)  # bad options fail before any file is read
    return DigitsClassReward(load_classifier(resolve_classifier_path(classifier)), classes)


def build_digits_value(values: Sequence[float] | None = None, classifier: str | None = None,
                       temperature: float = 1.0) -> DigitsValueReward:
    _values(values)  # bad options fail before any file is read
    _temperature(temperature)
    return DigitsValueReward(load_classifier(resolve_classifier_path(classifier)), values, temperature)
