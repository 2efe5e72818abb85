"""Start-up checks of a reward on a probe batch, so that a broken (custom) reward fails before a run writes anything.

:func:`check_reward` scores two random images at the run's resolution with two prompts and checks what every
method relies on:

* the raw score is a ``torch.Tensor`` of shape ``[B]`` (one number per image, not ``[B, 1]``) and a floating dtype;
* the scores and their ``log R`` (the configured transform) are finite;
* for the methods that differentiate the reward (``needs_gradient``: nabla-gfn's forward-looking term, ReFL,
  DRaFT) the score depends differentiably on the pixels: it carries a graph, and ``d sum(score) / d images`` exists
  and is finite.

A weighted sum (:mod:`fastnabla.rewards.combined`) is checked term by term, so the error names the term. The probe
uses its own generator: the global RNG (and so a run's random draws) is not touched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastnabla.rewards.base import Reward, RewardModel
from fastnabla.rewards.combined import weighted_sum_of

PROBE_PROMPTS = ("a photo of a cat", "an oil painting of a house")


class RewardCheckError(ValueError):
    """A reward broke its contract on the probe batch; the message names the reward and what is wrong."""


def _check_model(model: RewardModel, transform, images: torch.Tensor, prompts: Sequence[str], needs_gradient: bool,
                 what: str) -> None:
    b = images.shape[0]
    x = images.detach().clone().requires_grad_(needs_gradient)
    with torch.enable_grad() if needs_gradient else torch.no_grad():
        try:
            out = model.score(x, list(prompts))
        except Exception as err:
            raise RewardCheckError(f"{what}: scoring {b} images of {tuple(x.shape[1:])} in [0, 1] raised "
                                   f"{type(err).__name__}: {err}") from err
        if not isinstance(out, torch.Tensor):
            raise RewardCheckError(f"{what}: returned a {type(out).__name__}; a reward returns a torch.Tensor of "
                                   f"shape [B] (one score per image)")
        if tuple(out.shape) != (b,):
            raise RewardCheckError(f"{what}: returned shape {tuple(out.shape)} for {b} images; a reward returns one "
                                   f"score per image, shape [B] = ({b},)")
        if not out.is_floating_point():
            raise RewardCheckError(f"{what}: returned dtype {out.dtype}; scores must be a floating dtype (float32)")
        if not bool(torch.isfinite(out).all()):
            raise RewardCheckError(f"{what}: returned non-finite scores {out.detach().tolist()} on random images")
        log_r = transform(out.float())
        if not bool(torch.isfinite(log_r).all()):
            raise RewardCheckError(f"{what}: log R = {log_r.detach().tolist()} is not finite (transform "
                                   f"{transform.kind!r}); use a transform that fits the score's range")
        if not needs_gradient:
            return
        if not out.requires_grad:
            raise RewardCheckError(f"{what}: the scores carry no graph: they are not differentiable w.r.t. the "
                                   "images (computed under no_grad, detached, or through numpy/PIL), and the method "
                                   "differentiates the reward; use a method that needs only reward values (ddpo, "
                                   "residual-db, dag-db) or make the reward differentiable")
        (grad,) = torch.autograd.grad(out.float().sum(), x, allow_unused=True)
        if grad is None:
            raise RewardCheckError(f"{what}: the scores do not depend on the images through autograd (the gradient "
                                   "w.r.t. the images is None)")
        if not bool(torch.isfinite(grad).all()):
            raise RewardCheckError(f"{what}: the gradient w.r.t. the images is not finite")


def check_reward(reward: Reward, resolution: int | tuple[int, int], *, needs_gradient: bool,
                 device: torch.device | str | None = None, what: str = "sd.reward", batch: int = 2) -> None:
    """Check ``reward`` on ``batch`` random images of ``resolution`` (module docstring).

    Raises:
        RewardCheckError: naming ``what`` (``sd.reward`` or ``sd.reward.terms[i]``) and what is wrong.
    """
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    if device is None:
        param = next(iter(reward.parameters()), None)
        buffer = next(iter(reward.buffers()), None)
        device = (param if param is not None else buffer).device if (param is not None or buffer is not None) \
            else torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, h, w, generator=gen).to(device)
    prompts = [PROBE_PROMPTS[i % len(PROBE_PROMPTS)] for i in range(batch)]
    combined = weighted_sum_of(reward)
    if combined is None:
        _check_model(reward.model, reward.transform, images, prompts, needs_gradient,
                     f"{what} ({reward.name!r})")
        return
    for i, (label, term) in enumerate(zip(combined.labels, combined.terms, strict=True)):
        _check_model(term.model, term.transform, images, prompts, needs_gradient, f"{what}.terms[{i}] ({label!r})")
