"""A Polyak-averaged copy of the trained policy weights (``train.policy_ema_decay``), for what a run hands out.

Stochastic updates at a constant or slowly decaying learning rate leave the policy wandering around where the
loss would have it; the run's result is wherever the last update happens to land. The exponential moving average
of the trained weights (Polyak-Ruppert averaging in its exponential form),

    theta_bar <- d theta_bar + (1 - d) theta        after every applied optimizer step,

starting from the weights the run starts with, is what the run evaluates at the end and exports (the LoRA and its
model card); sampling and training use the live weights throughout, so the training itself is unchanged: a run
with the average and one without train bit for bit the same. ``d = 0`` (the default, the paper's and the release's)
keeps the live weights. The averaged weights are part of every checkpoint, so a resumed run ends as an
uninterrupted one.

Only the parameters the optimizer trains are averaged (a LoRA's adapter weights); frozen weights and buffers are the
pretrained model's and stay as they are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

Tensor = torch.Tensor


class PolicyAverage:
    """``theta_bar`` for the parameters ``params`` (kept in float32 beside them), updated by :meth:`update` and put
    in place of the live weights inside :meth:`swapped_in`."""

    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.policy_ema_decay must be in (0, 1) for an averaged policy, got {decay}")
        self.params = list(params)
        self.decay = decay
        self.average = [p.detach().to(torch.float32, copy=True) for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """``theta_bar <- d theta_bar + (1 - d) theta`` for every parameter (one multi-tensor op)."""
        torch._foreach_lerp_(self.average, [p.detach().float() for p in self.params], 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Within the block the parameters hold ``theta_bar`` (cast to their dtype); the live weights are put back
        bit for bit on exit, also on error."""
        live = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for p, a in zip(self.params, self.average, strict=True):
                    p.copy_(a)
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.params, live, strict=True):
                    p.copy_(v)

    def state(self) -> list[Tensor]:
        return [a.detach().cpu().clone() for a in self.average]

    def load_state(self, state: Sequence[Tensor]) -> None:
        if len(state) != len(self.average):
            raise ValueError(f"the checkpoint's policy average holds {len(state)} tensors, the policy has "
                             f"{len(self.average)} trained ones")
        for a, v in zip(self.average, state, strict=True):
            if a.shape != v.shape:
                raise ValueError(f"the checkpoint's policy average has a tensor of shape {tuple(v.shape)} where the "
                                 f"policy's is {tuple(a.shape)}")
            a.copy_(v)
