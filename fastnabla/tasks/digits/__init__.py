"""The ``digits`` yardstick: a real, small latent diffusion pipeline trained on scikit-learn's digits.

Modules: ``data`` (the digits, the fixed split, prompts), ``classifier`` (the CNN behind the rewards and metrics),
``training`` (VAE and UNet training), ``build`` (settings, cache, ``build_pipeline``), ``sampling`` (the trainer's
pretrained sampler on plain pipeline parts), ``target`` (importance-weighted ``p# R^beta``, ESS, resampling),
``metrics`` (reward, class-histogram TV, diversity, Frechet distance). CLI: ``python -m fastnabla.tasks.digits``.
The rewards are ``digits-class`` and ``digits-value`` (:mod:`fastnabla.rewards.digits`). See ``docs/digits.md``.
Submodules import diffusers/transformers lazily where they can; importing this package is cheap.
"""

from fastnabla.tasks.digits.data import DEFAULT_PROMPT, NUM_CLASSES, PROMPTS

__all__ = ["DEFAULT_PROMPT", "NUM_CLASSES", "PROMPTS"]
