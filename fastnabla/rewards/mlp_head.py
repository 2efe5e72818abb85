"""The scoring head shared by the LAION aesthetic predictor and ImageReward: five linear layers, no activations.

Layout (the checkpoints' keys; dropout layers hold the other indices, active only in training):

    layers.0: Linear(d, 1024)   layers.2: Linear(1024, 128)   layers.4: Linear(128, 64)
    layers.6: Linear(64, 16)    layers.7: Linear(16, 1)

Both reference heads comment their ReLUs out, so the head is one affine map ``R^d -> R`` written as a product of
five factors: ``s(e) = w^T e + b``. ``d = 768`` in both (CLIP ViT-L/14 image embedding; BLIP's BERT [CLS] state).
Checkpoint files: ``sac+logos+ava1-l14-linearMSE.pth`` (keys ``layers.N.*``) and the ``mlp.layers.N.*`` part of
``ImageReward.pt``.
"""

from __future__ import annotations

import torch
from torch import nn

HIDDEN = (1024, 128, 64, 16)


class PreferenceMLP(nn.Module):
    """``[N, d] -> [N]``: the five-linear head above (dropout 0.2, 0.2, 0.1 between the first four)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, HIDDEN[0]),
            nn.Dropout(0.2),
            nn.Linear(HIDDEN[0], HIDDEN[1]),
            nn.Dropout(0.2),
            nn.Linear(HIDDEN[1], HIDDEN[2]),
            nn.Dropout(0.1),
            nn.Linear(HIDDEN[2], HIDDEN[3]),
            nn.Linear(HIDDEN[3], 1),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(embedding).squeeze(-1)
