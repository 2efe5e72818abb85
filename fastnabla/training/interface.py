"""The small model interface the trainer talks to (DESIGN.md section 2).

One trainer serves the analytic benchmark, Stable Diffusion and later other diffusers models: a
task exposes its sampler as a :class:`~fastnabla.mdp.schedule.DenoisingMDP` and five functions.

Indices: ``step`` (int64 ``[B]``) numbers transitions ``x_t -> x_{t+1}``, ``t = 0 .. T-1``;
``state`` numbers states ``x_s``, ``s = 0 .. T`` (``s = T`` is terminal). ``cond`` is whatever
per-sample conditioning the task uses (prompt embeddings; ``None`` for unconditional tasks).

Optional methods the trainer uses when present: ``trainable_state_dict()`` /
``load_trainable_state_dict(state)`` (named policy + flow weights for checkpoints; without them the
parameters are saved by position); ``decode_raw(x)`` with ``decoder_dtype`` (the decoder without the
image post-processing, which the fused forward-looking op then applies itself).

Conditioning is indexed with :func:`select_cond` (tensors, lists, tuples and dicts of them); the
Stable Diffusion task uses ``{"prompts": list[str], "prompt_embeds": [n, 77, D]}``. ``log_reward``
may receive ``k`` decoded copies per sample stacked noise-major (``[k * n]``) together with the
conditioning of the ``n`` samples, or one image per row with the rows' own conditioning.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import torch

from fastnabla.mdp.schedule import DenoisingMDP

Tensor = torch.Tensor


@runtime_checkable
class DiffusionTask(Protocol):
    """What the trainer needs from a model + reward pair."""

    mdp: DenoisingMDP

    def initial_noise(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws of ``x_0``."""
        ...

    def sample_conditions(self, n: int, generator: torch.Generator | None = None) -> Any:
        """Conditioning for ``n`` trajectories (``None`` if unconditional)."""
        ...

    def policy_eps(self, x: Tensor, step: Tensor, cond: Any) -> Tensor:
        """``eps_theta(x_t)`` of the fine-tuned policy (differentiable in its parameters)."""
        ...

    def reference_eps(self, x: Tensor, step: Tensor, cond: Any) -> Tensor:
        """``eps#(x_t)`` of the frozen pretrained model."""
        ...

    def flow(self, x: Tensor, state: Tensor, cond: Any) -> Tensor:
        """``g_phi(x_s)``, the learned residual log-flow gradient (same shape as ``x``)."""
        ...

    def decode(self, x: Tensor) -> Tensor:
        """Map a state to the reward's input space (identity for the analytic task, VAE for SD)."""
        ...

    def log_reward(self, decoded: Tensor, cond: Any) -> Tensor:
        """``log R`` per sample ``[B]``, fp32, differentiable w.r.t. ``decoded``."""
        ...

    def policy_parameters(self) -> Iterable[torch.nn.Parameter]:
        ...

    def flow_parameters(self) -> Iterable[torch.nn.Parameter]:
        ...


def select_cond(cond: Any, index: Tensor) -> Any:
    """Index per-sample conditioning (tensor, list, tuple or ``None``) by trajectory ids."""
    if cond is None:
        return None
    if isinstance(cond, Tensor):
        return cond[index.to(cond.device)]
    if isinstance(cond, (list, tuple)):
        return type(cond)(cond[i] for i in index.tolist())
    if isinstance(cond, dict):
        return {k: select_cond(v, index) for k, v in cond.items()}
    raise TypeError(f"cannot index conditioning of type {type(cond).__name__}")
