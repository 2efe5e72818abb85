"""``PackedSelfAttention`` against the ``nn.MultiheadAttention`` it replaces: same outputs and input gradients
(fp64), same state-dict keys, and a clear error outside unmasked self-attention."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastnabla.rewards.fast_attention import PackedSelfAttention, pack_self_attention
from fastnabla.rewards.tiny import tiny_hps

CASES = [pytest.param(2, 5, 12, 3, id="b2-l5-e12-h3"), pytest.param(3, 17, 32, 4, id="b3-l17-e32-h4")]


@pytest.mark.parametrize("batch, length, width, heads", CASES)
def test_matches_multihead_attention_and_its_gradients(batch, length, width, heads):
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(width, heads, batch_first=True).double()
    with torch.no_grad():
        reference.in_proj_bias.normal_()
        reference.out_proj.bias.normal_()
    packed = PackedSelfAttention(copy.deepcopy(reference))
    assert list(packed.state_dict()) == list(reference.state_dict())
    x = torch.randn(batch, length, width, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(batch, length, width, dtype=torch.float64)
    expected = reference(x, x, x, need_weights=False)[0]
    (expected_grad,) = torch.autograd.grad((expected * upstream).sum(), x)
    out = packed(x, x, x, need_weights=False)[0]
    (grad,) = torch.autograd.grad((out * upstream).sum(), x)
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-12)
    assert torch.allclose(grad, expected_grad, rtol=1e-12, atol=1e-12)


def test_refuses_masks_and_cross_attention():
    packed = PackedSelfAttention(nn.MultiheadAttention(8, 2, batch_first=True))
    x, other = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    with pytest.raises(NotImplementedError, match="unmasked self-attention"):
        packed(x, x, x, attn_mask=torch.zeros(3, 3))
    with pytest.raises(NotImplementedError, match="unmasked self-attention"):
        packed(x, other, other)
    with pytest.raises(ValueError, match="batch_first"):
        PackedSelfAttention(nn.MultiheadAttention(8, 2))


def test_hps_with_packed_attention_scores_and_backpropagates_like_open_clip():
    torch.manual_seed(1)
    fast = tiny_hps(fast_attention=True).double().eval()
    slow = tiny_hps(fast_attention=False).double().eval()
    slow.load_state_dict(fast.state_dict())
    assert sum(isinstance(m, PackedSelfAttention) for m in fast.clip.visual.modules()) == 2  # its two blocks
    assert not any(isinstance(m, PackedSelfAttention) for m in fast.clip.transformer.modules())  # text: masked
    x = torch.rand(2, 3, 40, 29, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    prompts = ["a photo of a cat", "a dog"]
    grads = []
    for model in (fast, slow):
        xi = x.clone().requires_grad_(True)
        score = model.score(xi, prompts)
        grads.append((score, *torch.autograd.grad(score.sum(), xi)))
    assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-12, atol=1e-12)
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-10, atol=1e-14)


def test_pack_self_attention_counts_and_is_idempotent():
    blocks = nn.ModuleList([nn.Module() for _ in range(3)])
    for block in blocks:
        block.attn = nn.MultiheadAttention(8, 2, batch_first=True)
    assert pack_self_attention(blocks) == 3
    assert pack_self_attention(blocks) == 0
