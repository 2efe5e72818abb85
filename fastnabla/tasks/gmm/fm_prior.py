"""Does the rectified-flow SDE with the exact velocity reproduce the prior? Its discretisation error, measured.

:func:`prior_fit` samples the pretrained sampler of a task (for :class:`~fastnabla.tasks.gmm.flow_matching.GMMFlowTask`
the mixture's exact velocity) and scores its final states against the prior the sampler should reproduce
(``task.prior``): mode-weight TV to the prior's weights, energy distance to exact prior draws, and the worst per-axis
std ratio. Without a task it scores exact prior draws instead: the sampling floor of every metric at those sizes.
``python -m fastnabla.compare.flow_prior`` runs it over step counts (docs/flow-matching.md).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fastnabla.tasks.gmm.metrics import energy_distance, mode_weights, total_variation
from fastnabla.tasks.gmm.model import GMMTask
from fastnabla.training.trajectories import sample_trajectories


@dataclass
class PriorFit:
    label: str
    tv: list[float]  # mode-weight TV to the prior's weights, one per seed
    energy: list[float]  # energy distance to exact prior draws, one per seed
    std_ratio: list[float]  # worst |std / prior std - 1| over axes, one per seed


def prior_fit(task: GMMTask, num_samples: int, energy_samples: int, seeds: Sequence[int], label: str,
              exact: bool = False) -> PriorFit:
    """Score ``num_samples`` final states of ``task``'s pretrained sampler (``exact``: draws from ``task.prior``)
    per seed; the energy distance takes the first ``energy_samples`` against as many independent exact draws."""
    prior = task.prior
    out = PriorFit(label, [], [], [])
    for seed in seeds:
        gen = torch.Generator().manual_seed(1000 + seed)
        if exact:
            x, _ = prior.sample(num_samples, gen)
        else:
            with torch.no_grad():
                x = sample_trajectories(task, num_samples, gen, use_pretrained=True).states[:, -1]
        x = x.double()
        ref, _ = prior.sample(max(energy_samples, num_samples), torch.Generator().manual_seed(2000 + seed))
        out.tv.append(total_variation(mode_weights(x, prior), prior.weights))
        out.energy.append(energy_distance(x[:energy_samples], ref[:energy_samples]))
        out.std_ratio.append(float((x.std(0) / ref.std(0) - 1).abs().max()))
    return out


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def prior_fit_table(rows: list[PriorFit]) -> str:
    """Markdown table of :class:`PriorFit` rows (mean ± std over seeds)."""
    lines = ["| sampler | mode-weight TV to prior | energy distance to prior | worst std ratio − 1 |",
             "|---|---|---|---|"]
    lines += [f"| {r.label} | {_fmt(r.tv)} | {_fmt(r.energy)} | {_fmt(r.std_ratio)} |" for r in rows]
    return "\n".join(lines) + "\n"
