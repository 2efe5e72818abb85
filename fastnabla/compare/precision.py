"""What storing sampled trajectories in bf16 / fp16 does to the transitions the losses are built from.

A transition's forward residual ``r_t = x_{t+1} - (a_t x_t + b_t eps_old_t)`` is of size ``sigma_t`` (it *is*
``sigma_t z_t``), and every score the objectives use divides it by ``sigma_t^2``. Rounding the stored states to a
low-precision dtype perturbs each state by about ``2^-(mantissa bits) |x|``: harmless while ``sigma_t`` is large,
a large fraction of ``sigma_t`` at the last steps (SD 1.5, 50 DDIM steps: ``sigma`` of the last step ~0.02 while
the latents are of size ~1).

``python -m fastnabla.compare.precision --preset tiny-sd sd.num_steps=50`` samples trajectories in fp32 and reports,
per step, the rounding error of ``r_t`` relative to ``sigma_t`` and the relative change of ``|r_t|^2 / sigma_t^2``
(the forward score term's magnitude) when the stored tensors are rounded (docs/fidelity.md).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from fastnabla.utils.dtypes import torch_dtype

Tensor = torch.Tensor


def storage_errors(states: Tensor, eps_old: Tensor, a: Tensor, b: Tensor, sigma: Tensor,
                   dtype: torch.dtype) -> list[dict[str, float]]:
    """Per step ``t``: ``sigma_t``, ``rms(r_t) / sigma_t`` (about 1), ``rms(r_t^q - r_t) / sigma_t`` (the rounding
    error of the residual as a fraction of the step's noise) and ``| |r^q|^2 / |r|^2 - 1 |`` (the forward score
    term's relative error), with ``r^q`` from states and ``eps_old`` rounded to ``dtype``. Inputs are fp32 or fp64:
    ``states [N, T+1, ...]``, ``eps_old [N, T, ...]``, coefficients ``[T]``."""
    rows = []
    q = lambda x: x.to(dtype).to(torch.float64)  # noqa: E731
    for t in range(eps_old.shape[1]):
        x, x_next, eps = (v.double() for v in (states[:, t], states[:, t + 1], eps_old[:, t]))
        r = x_next - (float(a[t]) * x + float(b[t]) * eps)
        r_q = q(states[:, t + 1]) - (float(a[t]) * q(states[:, t]) + float(b[t]) * q(eps_old[:, t]))
        s = float(sigma[t])
        rms = lambda v: float(v.square().mean().sqrt())  # noqa: E731
        rows.append({
            "step": t, "sigma": s, "residual_over_sigma": rms(r) / s, "rounding_error_over_sigma": rms(r_q - r) / s,
            "score_term_relative_error": float((r_q.square().sum() / r.square().sum() - 1).abs()),
        })
    return rows


def markdown(rows: list[dict[str, float]], dtype: str, show: Sequence[int] | None = None) -> str:
    lines = [f"| step | sigma_t | rms(r)/sigma | rms({dtype} rounding of r)/sigma | change of sum r^2/sigma^2 |",
             "|---:|---:|---:|---:|---:|"]
    for row in rows:
        if show is None or row["step"] in show:
            lines.append(f"| {row['step']} | {row['sigma']:.4g} | {row['residual_over_sigma']:.3f} | "
                         f"{row['rounding_error_over_sigma']:.3g} | {row['score_term_relative_error']:.3g} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastnabla.compare.precision", description=__doc__.split("\n")[0])
    p.add_argument("overrides", nargs="*", metavar="key.path=value")
    p.add_argument("--preset", default="tiny-sd")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    p.add_argument("--trajectories", type=int, default=8)
    args = p.parse_args(argv)
    from fastnabla.config.loader import ConfigError, build_config
    from fastnabla.run.config import RunConfig
    from fastnabla.run.driver import build_task_run
    from fastnabla.run.presets import get_preset
    from fastnabla.training.distributed import DistContext
    from fastnabla.training.trajectories import sample_trajectories

    try:
        cfg = build_config(RunConfig, get_preset(args.preset), None, [*args.overrides, "name=precision"])
        run = build_task_run(cfg, DistContext())
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    mdp = run.task.mdp
    traj = sample_trajectories(run.task, args.trajectories, torch.Generator().manual_seed(cfg.seed),
                               storage_dtype=torch.float32)
    rows = storage_errors(traj.states, traj.eps_old, mdp.a, mdp.b, mdp.sigma, torch_dtype(args.dtype))
    steps = mdp.num_steps
    show = sorted({0, 1, steps // 4, steps // 2, (3 * steps) // 4, steps - 3, steps - 2, steps - 1} & set(range(steps)))
    print(markdown(rows, args.dtype, show), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
