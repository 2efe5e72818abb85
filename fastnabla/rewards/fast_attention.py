"""Batch-first self-attention for open_clip's vision towers, replacing ``nn.MultiheadAttention`` (same parameters).

    [q | k | v] = x W_in^T + b_in          # x: [N, L, E] contiguous -> one [N*L, E] x [E, 3E] matmul
    y = softmax(q k^T / sqrt(E / H)) v      # per head, F.scaled_dot_product_attention
    out = y W_out^T + b_out

This is ``nn.MultiheadAttention``'s computation for unmasked self-attention, term for term. The reason to replace it:
with ``batch_first=True`` and gradients enabled (the reward gradient path), PyTorch's module transposes its input to
``[L, N, E]`` and multiplies that non-contiguous view through a batched matmul with the weight broadcast over the L
positions (257 GEMMs of ``N x E`` rows for ViT-H-14), which on CPU cost ~60 % of an HPSv2 forward + backward. The
parameters keep their names (``in_proj_weight``, ``in_proj_bias``, ``out_proj.*``), so state dicts are unchanged.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class PackedSelfAttention(nn.Module):
    """Drop-in for a ``batch_first`` ``nn.MultiheadAttention`` used as unmasked self-attention (``attn(x, x, x)``)."""

    def __init__(self, attention: nn.MultiheadAttention):
        super().__init__()
        if not attention.batch_first or not attention._qkv_same_embed_dim or attention.in_proj_bias is None:
            raise ValueError("PackedSelfAttention needs a batch_first MultiheadAttention with packed, biased q/k/v")
        self.num_heads = attention.num_heads
        self.in_proj_weight = attention.in_proj_weight
        self.in_proj_bias = attention.in_proj_bias
        self.out_proj = attention.out_proj

    def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None, **kwargs):
        cross = (key is not None and key is not query) or (value is not None and value is not query)
        if cross or attn_mask is not None:
            raise NotImplementedError("PackedSelfAttention handles unmasked self-attention only")
        batch, length, width = query.shape
        heads = self.num_heads
        qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)  # [N, L, 3E]
        q, k, v = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)  # [N, H, L, D]
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(y.transpose(1, 2).reshape(batch, length, width)), None


def pack_self_attention(tower: nn.Module) -> int:
    """Replace every ``nn.MultiheadAttention`` called ``attn`` inside ``tower`` (an open_clip vision transformer,
    whose blocks never mask) by :class:`PackedSelfAttention`; returns how many were replaced."""
    count = 0
    for module in tower.modules():
        attention = getattr(module, "attn", None)
        if isinstance(attention, nn.MultiheadAttention) and attention.batch_first:
            module.attn = PackedSelfAttention(attention)
            count += 1
    return count
