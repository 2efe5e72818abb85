"""The reward registry: one name per reward model, built from options by one function.

``build_reward("brightness")``, ``build_reward("aesthetic", path="/models/aesthetic")``; each entry
documents the options its builder takes. Learned reward models load their weights from local paths
(or a hub id where the user has a hub) and raise an error naming the expected files when missing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastnabla.rewards.base import Reward, RewardModel, RewardTransform


@dataclass(frozen=True)
class RewardEntry:
    name: str
    builder: Callable[..., RewardModel]
    description: str
    analytic: bool


REWARDS: dict[str, RewardEntry] = {}


def register_reward(name: str, description: str, analytic: bool = False):
    """Decorator registering ``builder(**options) -> RewardModel`` under ``name``."""

    def deco(builder: Callable[..., RewardModel]) -> Callable[..., RewardModel]:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered")
        REWARDS[name] = RewardEntry(name, builder, description, analytic)
        return builder

    return deco


def available_rewards() -> dict[str, str]:
    """``{name: description}`` of every registered reward."""
    return {k: v.description for k, v in REWARDS.items()}


def build_reward(
    name: str,
    transform: RewardTransform | None = None,
    chunk_size: int | None = None,
    **options: Any,
) -> Reward:
    """The reward ``name`` built with ``options``, wrapped with its ``log R`` transform and chunking."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; available: {', '.join(sorted(REWARDS))}")
    try:
        model = REWARDS[name].builder(**options)
    except TypeError as err:
        raise ValueError(f"reward {name!r}: invalid options {sorted(options)}: {err}") from err
    return Reward(model, transform, chunk_size)


@register_reward("brightness", "analytic demo reward: mean pixel value (tests and demos only)", analytic=True)
def _brightness() -> RewardModel:
    from fastnabla.rewards.analytic import BrightnessReward

    return BrightnessReward()


@register_reward(
    "color-target", "analytic demo reward: Gaussian bump on the mean RGB colour (tests and demos only)", analytic=True
)
def _color_target(target: tuple[float, float, float] = (0.8, 0.3, 0.2), width: float = 0.25) -> RewardModel:
    from fastnabla.rewards.analytic import ColorTargetReward

    return ColorTargetReward(target, width)
