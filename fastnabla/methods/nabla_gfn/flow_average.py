"""A Polyak-averaged copy of the flow network, read by the targets that chase the flow (``method.flow_ema_decay``).

With the learned flow, two targets read the flow network while it is being fitted: the policy's forward loss
regresses onto ``FL_{t+1} + g_phi(x_{t+1})`` (eq. 15), and the pathwise flow target bootstraps from
``h_{t+1} = FL_{t+1} + g_phi(x_{t+1})`` (:mod:`.pathwise`). The policy then follows the flow's fitting errors at
full speed, and the bootstrapped target feeds them back into the flow; on the analytic shape cases that made the TV
curve swing by 0.1-0.4 during training (docs/analytic-benchmark.md, "Stability"). As with the target networks of
temporal-difference learning, both targets can read an exponential moving average of the flow's weights instead,

    phi_bar <- d phi_bar + (1 - d) phi        after every applied optimizer step,

while the reverse loss (eq. 17) keeps training the live ``g_phi``. Every fixed point is unchanged: at convergence
``phi_bar = phi``. ``d = 0`` reads the live flow (the paper's and the release's).

Tasks keep their flow network in ``task.flow_net`` (the analytic, SD and flow tasks do); the averaged copy is a deep
copy of it (hooks included, so pass counters count it; a ``torch.compile`` of the live network is not carried over)
and is evaluated by ``task.flow`` with the copy put in its place.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from fastnabla.training.interface import DiffusionTask

Tensor = torch.Tensor


def flow_network(task: DiffusionTask) -> torch.nn.Module:
    net = getattr(task, "flow_net", None)
    if not isinstance(net, torch.nn.Module):
        raise TypeError(f"method.flow_ema_decay > 0 needs a task that keeps its flow network in `flow_net`; "
                        f"{type(task).__name__} has none")
    return net


class AveragedFlow:
    """The exponential moving average ``phi_bar`` of the task's flow weights, made on first use from the live
    network (so at the start ``phi_bar = phi``), updated by :meth:`update`, evaluated by :meth:`flow`."""

    def __init__(self, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"flow_ema_decay must be in (0, 1) for an averaged flow, got {decay}")
        self.decay = decay
        self.network: torch.nn.Module | None = None
        self._loaded: dict[str, Tensor] | None = None  # a checkpoint's weights, put into the copy on first use

    def _averaged(self, task: DiffusionTask) -> torch.nn.Module:
        if self.network is None:
            live = flow_network(task)
            net = copy.deepcopy(live).requires_grad_(False)
            if self._loaded is not None:
                net.load_state_dict(self._loaded)
                self._loaded = None
            self.network = net
        return self.network

    @torch.no_grad()
    def update(self, task: DiffusionTask) -> None:
        """``phi_bar <- d phi_bar + (1 - d) phi`` (buffers are copied)."""
        avg, live = self._averaged(task), flow_network(task)
        # one multi-tensor op, not a kernel launch per parameter: this runs after every optimizer step
        torch._foreach_lerp_(list(avg.parameters()), [p.detach() for p in live.parameters()], 1.0 - self.decay)
        for a, b in zip(avg.buffers(), live.buffers(), strict=True):
            a.copy_(b)

    @torch.no_grad()
    def flow(self, task: DiffusionTask, x: Tensor, state: Tensor, cond: Any) -> Tensor:
        """``g_phi_bar(x_s)``: ``task.flow`` with the averaged network in place of the live one (no graph)."""
        avg, live = self._averaged(task), flow_network(task)
        task.flow_net = avg
        try:
            return task.flow(x, state, cond)
        finally:
            task.flow_net = live

    def state(self) -> dict[str, Tensor]:
        if self.network is not None:
            return {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()}
        return dict(self._loaded or {})

    def load_state(self, state: dict[str, Tensor]) -> None:
        self.network, self._loaded = None, dict(state) if state else None
