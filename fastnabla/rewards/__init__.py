"""Reward models behind one interface: images in [0, 1] + prompts -> scores, and their ``log R``."""

from fastnabla.rewards.base import Reward, RewardModel, RewardTransform
from fastnabla.rewards.registry import REWARDS, available_rewards, build_reward, describe_reward, register_reward

__all__ = [
    "REWARDS",
    "Reward",
    "RewardModel",
    "RewardTransform",
    "available_rewards",
    "build_reward",
    "describe_reward",
    "register_reward",
]
