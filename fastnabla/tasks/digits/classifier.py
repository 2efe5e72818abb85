"""Training the digit classifier of the ``digits`` yardstick (the model and its file format:
:mod:`fastnabla.rewards.digits_classifier`, re-exported here)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from fastnabla.rewards.digits_classifier import (
    CLASSIFIER_FILE,
    DigitClassifier,
    load_classifier,
    save_classifier,
)
from fastnabla.tasks.digits.data import shift_augment

__all__ = ["CLASSIFIER_FILE", "DigitClassifier", "accuracy", "load_classifier", "save_classifier", "train_classifier"]
Tensor = torch.Tensor


def train_classifier(
    images: Tensor,
    labels: Tensor,
    steps: int,
    seed: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    width: int = 32,
    features: int = 64,
    progress: Callable[[int], None] | None = None,
) -> DigitClassifier:
    """A :class:`DigitClassifier` trained on ``images`` (``[N, 3, R, R]`` in ``[-1, 1]``) with AdamW, a one-cycle
    learning rate, +-1 pixel shifts and light pixel noise as augmentation. Deterministic given ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier(images.shape[-1], width, features)
    opt = torch.optim.AdamW(model.parameters(), lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(steps, 1), pct_start=0.1)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        x = shift_augment(images[idx], 1, gen)
        x = ((x + 1) / 2 + 0.05 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
        loss = F.cross_entropy(model(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress(1)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def accuracy(model: DigitClassifier, images: Tensor, labels: Tensor) -> float:
    """Fraction of ``images`` (``[N, 3, R, R]`` in ``[-1, 1]``) whose argmax logit is the label."""
    pred = torch.cat([model((images[i : i + 512] + 1) / 2).argmax(1) for i in range(0, len(images), 512)])
    return float((pred == labels).float().mean())
