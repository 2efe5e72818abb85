"""The reward registry: one name per reward model, built from options by one function.

``build_reward("brightness")``, ``build_reward("aesthetic", clip="/models/clip-vit-large-patch14",
mlp="/models/sac+logos+ava1-l14-linearMSE.pth")``, ``build_reward("hpsv2", random_weights=True)``, or a custom
reward by import path, ``build_reward("mypackage.rewards:make_reward", **options)`` (:mod:`.custom`). Each entry's
builder documents its options (``describe_reward(name)`` prints them; ``docs/rewards.md`` lists them all). Learned
reward models load their weights from local paths (or a hub id where the user has a hub, never downloading when
``HF_HUB_OFFLINE=1``) and raise :class:`FileNotFoundError` naming the expected files and where to get them.

Default ``log R`` transforms (``transform=None``): ``log`` for rewards that are positive by construction (the
analytic ones), ``exp`` with ``scale=1, shift=0`` -- i.e. ``log R = score`` -- for the learned ones, whose scores can
be negative (ImageReward is z-scored, HPS is a cosine, the aesthetic head is affine). ``log R = score`` is what the
authors' release trains on, so the paper's temperatures (beta = 1e3..1e4) carry over unchanged.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastnabla.rewards.base import Reward, RewardModel, RewardTransform
from fastnabla.rewards.custom import build_custom_reward, is_import_path


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


def is_reward_name(name: str) -> bool:
    """Whether ``name`` is a registered reward or an import path ``module:factory`` (:mod:`.custom`)."""
    return name in REWARDS or is_import_path(name)


def build_reward(
    name: str,
    transform: RewardTransform | None = None,
    chunk_size: int | None = None,
    **options: Any,
) -> Reward:
    """The reward ``name`` built with ``options``, wrapped with its ``log R`` transform and chunking.

    ``name`` is a registered name or an import path ``package.module:factory`` whose factory takes ``options``
    (:mod:`fastnabla.rewards.custom`).
    """
    if name not in REWARDS and is_import_path(name):
        return Reward(build_custom_reward(name, options), transform, chunk_size)
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; available: {', '.join(sorted(REWARDS))}, or an import path "
                         "'package.module:factory'")
    builder = REWARDS[name].builder
    try:
        inspect.signature(builder).bind(**options)
    except TypeError as err:
        valid = [p for p in inspect.signature(builder).parameters]
        raise ValueError(f"reward {name!r}: invalid options {sorted(options)} ({err}); valid options: {valid}") from err
    return Reward(builder(**options), transform, chunk_size)


def describe_reward(name: str) -> str:
    """The description and the documented options of the reward ``name``."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; available: {', '.join(sorted(REWARDS))}")
    entry = REWARDS[name]
    return f"{name}: {entry.description}\n{inspect.getdoc(entry.builder) or ''}"


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


@register_reward("aesthetic", "LAION Aesthetic Score: CLIP ViT-L/14 embedding + LAION aesthetic MLP (prompt unused)")
def _aesthetic(
    clip: str | None = None,
    mlp: str | None = None,
    random_weights: bool = False,
    dtype: str = "float32",
    open_clip_architecture: str = "ViT-L-14-quickgelu",
) -> RewardModel:
    """Options: clip (transformers CLIP directory, hub id, or OpenAI/open_clip file; default
    openai/clip-vit-large-patch14), mlp (sac+logos+ava1-l14-linearMSE.pth), random_weights, dtype,
    open_clip_architecture. Default transform: exp, scale 1, shift 0 (log R = score)."""
    from fastnabla.rewards.aesthetic import build_aesthetic

    return build_aesthetic(clip, mlp, random_weights, dtype, open_clip_architecture)


def _hps_builder(version: str):
    def build(
        checkpoint: str | None = None,
        random_weights: bool = False,
        dtype: str = "float32",
        text_cache_size: int = 256,
        architecture: str = "ViT-H-14",
        fast_attention: bool = True,
    ) -> RewardModel:
        from fastnabla.rewards.hps import build_hps

        return build_hps(version, checkpoint, random_weights, dtype, text_cache_size, architecture, fast_attention)

    build.__doc__ = (
        f"Options: checkpoint ({'HPS_v2_compressed.pt' if version == 'hpsv2' else 'HPS_v2.1_compressed.pt'}; "
        "default hub xswu/HPSv2), random_weights, dtype, text_cache_size (prompts whose text features are cached), "
        "architecture (open_clip name, default ViT-H-14), fast_attention (packed image-tower attention, default True). "
        "Default transform: exp, scale 1, shift 0 (log R = score)."
    )
    return build


register_reward("hpsv2", "HPSv2: open_clip ViT-H-14 image-text cosine (HPS_v2_compressed.pt)")(_hps_builder("hpsv2"))
register_reward("hpsv2.1", "HPSv2.1: open_clip ViT-H-14 image-text cosine (HPS_v2.1_compressed.pt)")(
    _hps_builder("hpsv2.1")
)


@register_reward("imagereward", "ImageReward v1.0: BLIP ViT-L/16 + BERT cross-attention + MLP, z-scored")
def _imagereward(
    checkpoint: str | None = None,
    med_config: str | None = None,
    tokenizer: str | None = None,
    random_weights: bool = False,
    dtype: str = "float32",
    max_length: int = 35,
    vision_config: dict | None = None,
) -> RewardModel:
    """Options: checkpoint (ImageReward.pt; default hub THUDM/ImageReward), med_config (med_config.json; default
    next to the checkpoint, else the hub), tokenizer (bert-base-uncased directory; default hub bert-base-uncased),
    random_weights, dtype, max_length (prompt tokens, 35), vision_config (BlipVisionConfig overrides; tests).
    Default transform: exp, scale 1, shift 0 (log R = score)."""
    from fastnabla.rewards.imagereward import build_imagereward

    return build_imagereward(checkpoint, med_config, tokenizer, random_weights, dtype, max_length, vision_config)


@register_reward("digits-class", "digits yardstick: log p(y in S | x) from the digit classifier (S: option classes)")
def _digits_class(classes: int | list[int] | tuple[int, ...] = (3,), classifier: str | None = None) -> RewardModel:
    """Options: classes (a digit or a list of digits, default [3]), classifier (a digits pipeline directory or its
    classifier.safetensors; default the full build in the default cache). Default transform: exp, scale 1, shift 0
    (log R = log p(y in S | x))."""
    from fastnabla.rewards.digits import build_digits_class

    return build_digits_class(classes, classifier)


@register_reward("digits-value", "digits yardstick: expected digit value sum_k v_k p(y=k | x) (smooth, bounded)")
def _digits_value(values: list[float] | None = None, classifier: str | None = None,
                  temperature: float = 1.0) -> RewardModel:
    """Options: values (10 numbers, default 0..9), classifier (as for digits-class), temperature (> 0, default 1: the
    classifier's logits divided by it). Default transform: exp, scale 1, shift 0 (log R = the expected value)."""
    from fastnabla.rewards.digits import build_digits_value

    return build_digits_value(values, classifier, temperature)
