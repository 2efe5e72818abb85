"""The two contracts of the trainer: the model interface a task implements (:class:`DiffusionTask`) and the
objective a training method implements (:class:`Objective`); docs/architecture.md shows where each lives.

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
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from fastnabla.mdp.schedule import DenoisingMDP

if TYPE_CHECKING:
    from fastnabla.training.plan import TransitionPlan
    from fastnabla.training.trajectories import Trajectories

Tensor = torch.Tensor
# A diagnostic: per-transition (or per-trajectory) values and the mask of rows it is defined on (None: all).
Diagnostic = tuple[Tensor, Tensor | None]


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

    def pretrained_eps(self, x: Tensor, step: Tensor, cond: Any) -> Tensor:
        """``eps#(x_t)`` of the frozen pretrained model."""
        ...

    def flow(self, x: Tensor, state: Tensor, cond: Any) -> Tensor:
        """``g_phi(x_s)``, the learned residual log-flow gradient (same shape as ``x``), evaluated through the task's
        ``flow_net`` attribute (``method.flow_ema_decay`` puts a Polyak-averaged copy there for the targets)."""
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


@runtime_checkable
class Objective(Protocol):
    """What the trainer needs from a training method (nabla-GFlowNet or a baseline, :mod:`fastnabla.methods`).

    * ``trains_flow``: the flow group is optimised (the task's flow network, or ``module`` when the objective owns
      one, as the DB baselines' scalar flow);
    * ``on_policy``: train on the batch sampled in the same iteration instead of the previous one (``D_prev``);
    * ``per_trajectory``: ``loss`` takes whole trajectories (ReFL, DRaFT), not transitions;
    * ``module``: a network the objective owns (trained in the flow group, saved in checkpoints), or ``None``.
    """

    name: str
    trains_flow: bool
    on_policy: bool
    per_trajectory: bool
    module: torch.nn.Module | None

    def prepare(
        self, task: DiffusionTask, traj: Trajectories, plan: TransitionPlan, key: tuple[int, int], chunk: int
    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """Once per pass over stored trajectories: per-state extras (gathered as ``name_t`` / ``name_next``) and
        per-step extras. Not called for per-trajectory objectives."""
        ...

    def loss(self, task: DiffusionTask, batch: Any, key: tuple[int, int]) -> tuple[Tensor, dict[str, Diagnostic]]:
        """Per-row loss ``[B]`` (with graph) and diagnostics for a :class:`TransitionBatch` (or, per-trajectory,
        :class:`Trajectories`); ``key = (seed, iteration)`` keys any random draw."""
        ...

    def after_update(self, task: DiffusionTask) -> None:
        """After every applied optimizer step (e.g. to move an averaged copy of a network)."""
        ...

    def state(self) -> dict[str, Any]:
        """State the objective carries across iterations besides ``module`` (plain data, checkpointed)."""
        ...

    def load_state(self, state: dict[str, Any]) -> None:
        ...


class ObjectiveDefaults:
    """The defaults of :class:`Objective`: an off-policy method on stored transitions, no flow, no own network,
    nothing to prepare. Objectives subclass it and override what differs."""

    name: str = ""
    trains_flow: bool = False
    on_policy: bool = False
    per_trajectory: bool = False
    module: torch.nn.Module | None = None

    def prepare(self, task, traj, plan, key, chunk) -> tuple[dict[str, Any], dict[str, Tensor]]:
        return {}, {}

    def after_update(self, task) -> None:
        return None

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"the {self.name} objective carries no state, the checkpoint holds {sorted(state)}")
