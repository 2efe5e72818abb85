"""Gradient checkpointing of a reward model's transformer blocks (``sd.memory.reward_gradient_checkpointing``).

Under autograd (the forward-looking reward gradient, ReFL, DRaFT) each block of the reward's towers keeps only its
input; its activations are recomputed in the backward pass (``torch.utils.checkpoint``, non-reentrant: the same
inputs, RNG and autocast state, so scores and pixel gradients are unchanged). Without a graph (sampling, evaluation)
the blocks run as before.

The blocks are found by structure, so every reward here is covered without per-model code: ``nn.ModuleList``
attributes named ``layers`` (transformers' CLIP / BLIP encoders), ``layer`` (BERT, BLIP's text encoder) or
``resblocks`` (open_clip). transformers' own ``gradient_checkpointing_enable`` is not used: it acts only in training
mode, and reward models run in eval mode (their dropout off).
"""

from __future__ import annotations

from torch import nn
from torch.utils.checkpoint import checkpoint

BLOCK_LISTS = ("layers", "layer", "resblocks")


def _checkpointed(block: nn.Module) -> None:
    forward = block.forward

    def run(*args, **kwargs):
        import torch

        if torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    block.forward = run
    block._fastnabla_checkpointed = True


def checkpoint_reward_blocks(model: nn.Module, what: str = "sd.memory.reward_gradient_checkpointing") -> int:
    """Checkpoint every transformer block of ``model``; returns how many.

    Raises:
        ValueError: naming ``what`` when ``model`` has no block lists (an analytic reward has no activations to save).
    """
    count = 0
    for module in model.modules():
        for name in BLOCK_LISTS:
            blocks = getattr(module, name, None)
            if isinstance(blocks, nn.ModuleList):
                for block in blocks:
                    if not getattr(block, "_fastnabla_checkpointed", False):
                        _checkpointed(block)
                        count += 1
    if not count:
        raise ValueError(f"{what}=true: the reward {getattr(model, 'name', type(model).__name__)!r} has no "
                         f"transformer blocks ({' / '.join(BLOCK_LISTS)} module lists) to checkpoint; set it to false")
    return count
