"""Reward models behind one interface: images in [0, 1] + prompts -> scores, and their ``log R``."""

from fastnabla.rewards.base import Reward, RewardModel, RewardTransform
from fastnabla.rewards.combined import build_reward_sum
from fastnabla.rewards.registry import (
    REWARDS,
    available_rewards,
    build_reward,
    describe_reward,
    is_reward_name,
    register_reward,
)
from fastnabla.rewards.validate import RewardCheckError, check_reward

__all__ = [
    "REWARDS",
    "Reward",
    "RewardCheckError",
    "RewardModel",
    "RewardTransform",
    "available_rewards",
    "build_reward",
    "build_reward_sum",
    "check_reward",
    "describe_reward",
    "is_reward_name",
    "register_reward",
]
