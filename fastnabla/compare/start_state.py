"""The start-state bias of Proposition 4 on the analytic task: ``x_0`` is drawn from ``N(0, I)``, never reweighted.

The residual conditions fix the fine-tuned policy only up to the flow at the start state: at their optimum the
sampler draws ``x_0 ~ N(0, I)`` and then ``x_T`` from the pretrained conditional tilted by ``R^beta``,

    p_reached(x_T) = E_{x_0 ~ N(0, I)} [ p#(x_T | x_0) R(x_T)^beta / F(x_0) ],   F(x_0) = E#[R(x_T)^beta | x_0],

while the target of Proposition 4, ``P#(x_T) R(x_T)^beta / Z`` with ``P#`` the pretrained sampler's marginal (from
``x_0 ~ N(0, I)``), would also reweight ``x_0`` by ``F(x_0) / Z``. The two agree when ``log F(x_0)`` is constant
over ``x_0``; ``Var_{x_0}[log F(x_0)]`` measures how far they can drift apart.

Both are estimated by importance weighting joint draws ``(x_T, x_0)`` of the exact noising process: ``x_T`` from the
prior mixture, ``x_0`` its noising to ``abar_0`` (the sampler's first state), for which ``F`` is in closed form
(:meth:`fastnabla.tasks.gmm.model.GMMTask.oracle_log_flow`). Relative to that joint, starting from ``N(0, I)``
instead of the noised prior ``p#_0`` weighs ``N(x_0) / p#_0(x_0)``: target weights ``R^beta N / p#_0``, reached
weights ``R^beta N / (p#_0 F)``.

``python -m fastnabla.compare.start_state --presets gmm-default gmm-narrow-bump gmm-loglinear``
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass
class StartStateBias:
    var_log_flow_x0: float  # Var over x_0 ~ N(0, I) of log F(x_0)
    tv_target_to_reached: float  # mode-weight TV between the target and the reached optimum
    mode_weights_target: Tensor
    mode_weights_reached: Tensor
    mean_log_reward_target: float
    mean_log_reward_reached: float
    effective_sample_size: float  # of the reached weights (how well the estimate is supported)


def _normal_log_prob(x: Tensor) -> Tensor:
    return -0.5 * (x.square().sum(-1) + x.shape[-1] * math.log(2 * math.pi))


def start_state_bias(task, num: int = 200_000, seed: int = 0) -> StartStateBias:
    """Estimate the bias for a :class:`~fastnabla.tasks.gmm.model.GMMTask` (module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    prior, reward, beta = task.prior.to(torch.float64), task.reward, task.beta
    state0 = torch.zeros(num, dtype=torch.int64)
    abar0 = float(task.state_alpha_bar[0])
    x_t, _ = prior.sample(num, gen)
    x0 = abar0**0.5 * x_t + (1 - abar0) ** 0.5 * torch.randn(x_t.shape, generator=gen, dtype=torch.float64)
    log_r = reward.log_reward(x_t).double()
    log_f0 = task.oracle_log_flow(x0, state0).double()
    log_w_start = _normal_log_prob(x0) - prior.log_prob(x0, abar0)  # x_0 from N(0, I), not the noised prior
    log_w_target = beta * log_r + log_w_start
    log_w_reached = log_w_target - log_f0
    w_target = torch.softmax(log_w_target, 0)
    w_reached = torch.softmax(log_w_reached, 0)
    resp = task.target.responsibilities(x_t)
    noise = torch.randn(num, prior.dim, generator=gen, dtype=torch.float64)
    log_f_noise = task.oracle_log_flow(noise, state0).double()
    mw_target, mw_reached = w_target @ resp, w_reached @ resp
    return StartStateBias(
        var_log_flow_x0=float(log_f_noise.var()),
        tv_target_to_reached=0.5 * float((mw_target - mw_reached).abs().sum()),
        mode_weights_target=mw_target,
        mode_weights_reached=mw_reached,
        mean_log_reward_target=float(w_target @ log_r),
        mean_log_reward_reached=float(w_reached @ log_r),
        effective_sample_size=float(1.0 / w_reached.square().sum()),
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastnabla.compare.start_state", description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["gmm-default", "gmm-narrow-bump", "gmm-loglinear"])
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                   help="config override applied to every preset (repeatable)")
    p.add_argument("--samples", type=int, default=200_000)
    args = p.parse_args(argv)
    from fastnabla.config.loader import ConfigError, build_config
    from fastnabla.run.config import RunConfig
    from fastnabla.run.presets import get_preset
    from fastnabla.tasks.gmm.build import build_gmm_task

    print("| preset | Var log F(x_0) | TV target vs reached | mean log R target / reached | ESS |")
    print("|---|---:|---:|---:|---:|")
    for preset in args.presets:
        try:
            cfg = build_config(RunConfig, get_preset(preset), None, args.overrides)
            task = build_gmm_task(cfg)
        except (ConfigError, ValueError) as err:
            print(f"error: {preset}: {err}", file=sys.stderr)
            return 2
        b = start_state_bias(task, args.samples)
        print(f"| {preset} | {b.var_log_flow_x0:.3g} | {b.tv_target_to_reached:.3g} | "
              f"{b.mean_log_reward_target:.4f} / {b.mean_log_reward_reached:.4f} | {b.effective_sample_size:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
