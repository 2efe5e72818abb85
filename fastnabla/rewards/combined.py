"""A weighted sum of rewards: ``log R(x, c) = sum_i w_i log R_i(x, c)``, i.e. ``R = prod_i R_i^{w_i}``.

Each term is a complete :class:`~fastnabla.rewards.base.Reward` (its own options and ``log R`` transform), so the
weights act on the terms' ``log R``: with the learned rewards' default ``log R = score`` the sum is the weighted sum
of the raw scores, as in flow_grpo's ``multi_score``. The target of the GFlowNet methods becomes
``p#(x) prod_i R_i(x)^{beta w_i}`` (the paper's ``p# R^beta`` with ``R = prod_i R_i^{w_i}``); its gradient is
``grad log R = sum_i w_i grad log R_i``.

:class:`WeightedSumModel` is a :class:`~fastnabla.rewards.base.RewardModel` whose *score* is already ``log R``;
:func:`build_reward_sum` wraps it in a ``Reward`` with the identity transform (``exp``, scale 1, shift 0), so
chunking, ``log_reward_and_grad`` and the pass counters work unchanged. Each term's ``log R`` can be recorded
separately (:func:`record_terms`): the trainer logs them per sampled batch, the evaluation per prompt.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from fastnabla.rewards.base import Reward, RewardModel, RewardTransform, Tensor

SUM_NAME = "sum"


def term_labels(names: Sequence[str]) -> list[str]:
    """One label per term: the reward's name, with ``#2``, ``#3`` ... for repeated names."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out


class WeightedSumModel(RewardModel):
    """``score(x, c) = sum_i w_i log R_i(x, c)`` over complete rewards ``R_i`` (each with its own transform).

    While :attr:`recording` is a dict (see :func:`record_terms`), calls made without gradient (sampling,
    evaluation) append each term's ``log R`` ``[B]`` to ``recording[label]``; calls under autograd (the
    forward-looking gradient, ReFL, DRaFT) are not recorded.
    """

    positive = False

    def __init__(self, terms: Sequence[tuple[str, float, Reward]]):
        super().__init__()
        if not terms:
            raise ValueError("a weighted sum of rewards needs at least one term")
        names = [name for name, _, _ in terms]
        self.labels = term_labels(names)
        self.weights = [float(w) for _, w, _ in terms]
        self.terms = nn.ModuleList([reward for _, _, reward in terms])
        self.name = f"{SUM_NAME}(" + " + ".join(f"{w:g}*{n}" for w, n in zip(self.weights, self.labels,
                                                                              strict=True)) + ")"
        self.recording: dict[str, list[Tensor]] | None = None

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        total = None
        for label, weight, term in zip(self.labels, self.weights, self.terms, strict=True):
            log_r = term.log_reward(images, prompts)
            if self.recording is not None and not torch.is_grad_enabled():
                self.recording.setdefault(label, []).append(log_r.detach().float().cpu())
            total = weight * log_r if total is None else total + weight * log_r
        return total


def build_reward_sum(terms: Sequence[tuple[str, float, Reward]], chunk_size: int | None = None) -> Reward:
    """The reward ``log R = sum_i w_i log R_i`` of ``terms = [(name, w_i, Reward_i), ...]``."""
    return Reward(WeightedSumModel(terms), RewardTransform(kind="exp", scale=1.0, shift=0.0), chunk_size)


def weighted_sum_of(reward: Any) -> WeightedSumModel | None:
    """The :class:`WeightedSumModel` inside ``reward`` (a ``Reward``), or None for any other reward."""
    model = getattr(reward, "model", None)
    return model if isinstance(model, WeightedSumModel) else None


@contextlib.contextmanager
def record_terms(reward: Any) -> Iterator[dict[str, list[Tensor]]]:
    """Record the terms' ``log R`` of every no-grad call of ``reward`` inside the block (``{label: [values per
    call]}``, in call order); an empty dict for a reward that is not a weighted sum. Not re-entrant."""
    model = weighted_sum_of(reward)
    recorded: dict[str, list[Tensor]] = {}
    if model is None:
        yield recorded
        return
    model.recording = recorded
    try:
        yield recorded
    finally:
        model.recording = None


def concat_terms(recorded: dict[str, list[Tensor]]) -> dict[str, Tensor]:
    """``{label: [B] values}`` of what :func:`record_terms` recorded."""
    return {label: torch.cat(values) for label, values in recorded.items() if values}
