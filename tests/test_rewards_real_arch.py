"""Each learned reward built with random weights of its REAL architecture (CLIP ViT-L/14 + LAION head; open_clip
ViT-H-14; BLIP ViT-L/16 + BERT-base with cross-attention): it scores a batch, deterministically, and gives finite,
non-zero pixel gradients. These build 0.3-1 B parameters: marked slow, batch 2, one test per model, run with 2
threads (see docs/rewards.md for their times)."""

from __future__ import annotations

import pytest
import torch

from fastnabla.rewards import build_reward

PROMPTS = ["a photo of a cat", "an oil painting of a dog"]
REAL = [
    pytest.param("aesthetic", 304e6, id="aesthetic-ViT-L14"),
    pytest.param("hpsv2", 986e6, id="hpsv2-ViT-H14"),
    pytest.param("imagereward", 447e6, id="imagereward-BLIP-L"),
]


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.mark.slow
@pytest.mark.parametrize("name, params", REAL)
def test_real_architecture_scores_and_backpropagates(name, params, two_threads):
    reward = build_reward(name, random_weights=True)
    count = sum(p.numel() for p in reward.parameters())
    assert abs(count - params) <= 0.02 * params, f"{name}: {count / 1e6:.1f}M parameters"
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in reward.parameters())
    x = torch.rand(2, 3, 96, 80, generator=torch.Generator().manual_seed(0))  # any resolution; resized to 224
    values, grads = reward.log_reward_and_grad(x, PROMPTS)
    assert values.shape == (2,) and torch.isfinite(values).all()
    assert grads.shape == x.shape and torch.isfinite(grads).all() and grads.abs().sum() > 0
    with torch.no_grad():  # deterministic (eval mode: no dropout), and independent of the batch it is in
        again = reward.log_reward(x[1:], PROMPTS[1:])
    assert torch.allclose(again, values[1:], rtol=1e-5, atol=1e-5)
