"""Probe behind docs/digits.md, "A policy-independent value as the missing signal": learn the residual log-flow
``log F~_s(x) = log E_p#[R(x_T)^beta | x_s = x]`` from the pretrained sampler's own trajectories, then sample the
pretrained model guided by its gradient -- no fine-tuning, no reward gradient.

``F~_s`` depends on the pretrained sampler and the reward only, not on any policy, so it can be fitted off-policy.
A small MLP ``u(x_s, s)`` (the 4x4x4 latent flattened, a sinusoidal embedding of ``s``) minimises
``E[y e^{-u} + u]`` with ``y = R(x_T)^beta`` of the trajectory each state lies on; the minimiser is
``u = log E[y | x_s]``, so no log of a noisy average is ever taken. Sampling then shifts both halves of the CFG pair
by ``delta`` (:func:`eps_shift`; by default ``-scale sqrt(1 - abar_s) grad_x u(x_s, s)``, classifier guidance: the
tilted sampler of ``p# R^beta`` when ``u`` is exact and the steps are small; ``--shift db-*`` moves the step's mean
by nabla-GFlowNet's ``sigma_s^2 grad log F~`` instead, read at the pretrained mean, over draws of the pretrained or
of the shifted next state, or at the current state), and the preset's end-of-run evaluation scores the samples.
10 % of the trajectories are held out; the held-out loss per state is printed while fitting.

    python docs/digits/value_guidance.py OUT_DIR [--trajectories 4000] [--steps 1500] [--scale 1]
        [--shift score|db-mean|db-draw|db-policy|db-state] [--draws K] [--iterations N] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from fastnabla.config.loader import build_config
from fastnabla.mdp.gaussian_policy import cfg_combine
from fastnabla.run.config import RunConfig
from fastnabla.run.driver import build_task_run, build_trainer
from fastnabla.run.presets import get_preset
from fastnabla.training.distributed import DistContext

CHUNK = 500  # trajectories per sampling call
FIRST_ITERATION = 20_000  # sampling keys no training run of the preset uses


class LogValue(nn.Module):
    """``u(x_s, s)``: an MLP on the flattened latent and 8 sine/cosine frequencies of ``s / T``."""

    def __init__(self, latent_dim: int, num_steps: int, width: int = 256):
        super().__init__()
        self.num_steps = num_steps
        self.net = nn.Sequential(nn.Linear(latent_dim + 16, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        angles = (state.float() / self.num_steps)[:, None] * (2.0 ** torch.arange(8.0))[None] * math.pi
        return self.net(torch.cat([x.flatten(1), angles.sin(), angles.cos()], 1)).squeeze(1)


SHIFTS = ("score", "db-mean", "db-draw", "db-policy", "db-state")


def grad_u(value: nn.Module, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """``grad_x u(x, state)`` in float32, whether or not the caller runs under ``no_grad``."""
    with torch.enable_grad():
        xg = x.detach().float().requires_grad_(True)
        return torch.autograd.grad(value(xg, state).sum(), xg)[0]


def eps_shift(value: nn.Module, x: torch.Tensor, step: torch.Tensor, eps: torch.Tensor, coeffs: dict,
              shift: str = "score", scale: float = 1.0, generator: torch.Generator | None = None,
              draws: int = 1, iterations: int = 1) -> torch.Tensor:
    """``delta`` added to both halves of the CFG pair at state ``x = x_s`` (``eps``: the pretrained CFG-combined
    noise prediction; ``coeffs``: the step's ``a, b, sigma, alpha_bar`` with ``x_{s+1} = a x + b eps + sigma z``).

    * ``score``: ``delta = -scale sqrt(1 - abar_s) grad u(x_s, s)``, classifier guidance on the score;
    * ``db-mean``: the step's mean moves by ``scale sigma_s^2 grad u(mu#, s+1)`` (``delta = that / b``), the mean
      shift that nabla-GFlowNet's forward loss (eq. 16) asks of the policy, at the pretrained mean ``mu# = a x + b
      eps`` for ``x_{s+1}``;
    * ``db-draw``: the same averaged over ``draws`` draws ``x' = mu# + sigma z`` (``z`` from ``generator``): the
      forward loss's regression target is one such draw, and its mean over draws is what a policy trained by it
      learns (the draws here come from the pretrained step, the policy's from its own);
    * ``db-policy``: the draws from the shifted step instead, ``x' = mu# + d + sigma z``, the mean shift ``d``
      iterated ``iterations`` times from 0 towards the fixed point ``d = scale sigma_s^2 E_z[grad u(mu# + d + sigma
      z, s+1)]`` (the same ``z`` in every iteration): what on-policy training converges to, since the policy's own
      next states carry its shift (for a quadratic ``u`` the fixed point is the exact tilted step's mean);
    * ``db-state``: ``scale sigma_s^2 grad u(x_s, s)``, the shift read at the current state.
    """
    a, b, sigma, abar = coeffs["a"], coeffs["b"], coeffs["sigma"], coeffs["alpha_bar"]
    if shift == "score":
        return -scale * (1 - abar).sqrt() * grad_u(value, x, step)
    if shift == "db-state":
        return scale * sigma**2 * grad_u(value, x, step) / b
    if shift not in ("db-mean", "db-draw", "db-policy"):
        raise ValueError(f"shift must be one of {SHIFTS}, got {shift!r}")
    if draws < 1 or iterations < 1:
        raise ValueError(f"draws and iterations must be >= 1, got {draws} and {iterations}")
    mean = a * x + b * eps
    if shift == "db-mean":
        return scale * sigma**2 * grad_u(value, mean, step + 1) / b
    noise = [sigma * torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
             for _ in range(draws)]
    mean_shift = torch.zeros_like(mean)
    for _ in range(iterations if shift == "db-policy" else 1):
        grads = torch.stack([grad_u(value, mean + mean_shift + z, step + 1) for z in noise])
        mean_shift = scale * sigma**2 * grads.mean(0)
    return mean_shift / b


def log_mean_loss(u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``mean(y e^{-u} + u)``: for each ``x`` its minimiser over ``u`` is ``log E[y | x]`` (the derivative
    ``1 - E[y | x] e^{-u}`` vanishes there), so ``u`` learns the log of an average without averaging in log space."""
    return (y * torch.exp(-u) + u).mean()


def fit_value(trainer, num_steps: int, beta: float, trajectories: int, steps: int, seed: int,
              chunk: int = CHUNK) -> tuple[LogValue, dict]:
    """Sample ``trajectories`` pretrained trajectories with ``trainer`` (its policy must still be the pretrained model)
    and fit :class:`LogValue` to them by :func:`log_mean_loss` (``steps`` Adam steps of 512 states, lr 1e-3; 10 % of
    the trajectories held out). Returns the value and a summary (``trajectories``, ``steps``, ``seed``, the fit set's
    mean log R, the held-out loss at five states, the last 500 steps' mean loss, sampling and fitting seconds)."""
    t0 = time.perf_counter()
    states, log_r = [], []
    with torch.no_grad():
        for i in range(math.ceil(trajectories / chunk)):
            traj = trainer.sample(FIRST_ITERATION + i)
            states.append(traj.states.float().cpu())
            log_r.append(traj.log_reward.double().cpu())
    x_all, log_r_all = torch.cat(states)[:trajectories], torch.cat(log_r)[:trajectories]
    sampling_seconds = time.perf_counter() - t0
    y = torch.exp(beta * (log_r_all - log_r_all.max())).float()  # R^beta up to a constant factor
    n_train = max(1, int(0.9 * len(y)))
    value = LogValue(x_all[0, 0].numel(), num_steps)
    opt = torch.optim.Adam(value.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed + 1)
    losses, held_out = [], {}
    for step in range(1, steps + 1):
        rows = torch.randint(n_train, (512,), generator=gen)
        s = torch.randint(num_steps + 1, (512,), generator=gen)
        u = value(x_all[rows, s], s)
        loss = log_mean_loss(u, y[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 500 == 0 or step == steps:
            held_out = _held_out_loss(value, x_all[n_train:], y[n_train:], num_steps)
            print(f"step {step}: loss {statistics.fmean(losses[-500:]):.4f}, held out per state "
                  f"{ {s: round(v, 4) for s, v in held_out.items()} }", flush=True)
    fit = {"trajectories": int(len(y)), "steps": steps, "seed": seed,
           "pretrained_mean_log_reward_of_fit_set": float(log_r_all.mean()), "held_out_loss": held_out,
           "final_loss": statistics.fmean(losses[-500:]) if losses else None,
           "sampling_seconds": sampling_seconds, "fit_seconds": time.perf_counter() - t0 - sampling_seconds}
    return value.requires_grad_(False), fit


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--trajectories", type=int, default=4000, help="pretrained trajectories to fit on")
    p.add_argument("--steps", type=int, default=1500, help="Adam steps of 512 states")
    p.add_argument("--scale", type=float, default=1.0, help="guidance scale (1: the tilt by R^beta)")
    p.add_argument("--shift", default="score", choices=SHIFTS, help="where and how the guidance reads grad u "
                   "(eps_shift): the score form, or nabla-GFlowNet's mean shift at the pretrained mean, averaged "
                   "over draws of the pretrained or of the shifted next state, or at the current state")
    p.add_argument("--draws", type=int, default=1, help="next-state draws averaged by --shift db-draw / db-policy")
    p.add_argument("--iterations", type=int, default=1, help="fixed-point iterations of --shift db-policy's mean "
                   "shift (1: db-draw)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="overrides of the digits preset (KEY=VALUE)")
    args = p.parse_intermixed_args(argv)
    if args.draws < 1 or (args.draws != 1 and args.shift not in ("db-draw", "db-policy")):
        p.error(f"--draws {args.draws}: a count >= 1, and only --shift db-draw / db-policy average over draws")
    if args.iterations < 1 or (args.iterations != 1 and args.shift != "db-policy"):
        p.error(f"--iterations {args.iterations}: a count >= 1, and only --shift db-policy iterates")
    if args.out.exists():  # never overwrite an earlier result
        raise FileExistsError(f"{args.out} exists; give a new output directory")
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    chunk = min(CHUNK, args.trajectories)
    cfg = build_config(RunConfig, get_preset("digits"), None, [
        f"output.dir={args.out}", f"train.batch_size={chunk}", f"train.sample_batch_size={chunk}", *args.overrides])
    dist = DistContext()
    run = build_task_run(cfg, dist)
    task = run.task
    trainer = build_trainer(task, cfg, dist)
    args.out.mkdir(parents=True)
    value, fit = fit_value(trainer, task.mdp.num_steps, cfg.method.beta, args.trajectories, args.steps, args.seed,
                           chunk)

    pretrained_pair = task.eps_pair

    draws = torch.Generator().manual_seed(args.seed + 2)  # db-draw's / db-policy's next-state draws

    def guided_pair(x, step, cond, pretrained=False):
        eps_u, eps_c = pretrained_pair(x, step, cond, pretrained=True)
        step = step.to(task.device)
        eps = eps_c if eps_u is None else cfg_combine(eps_u, eps_c, task.guidance_scale)
        coeffs = task.mdp.gather(step, x.dim(), torch.float32)
        delta = eps_shift(value, x, step, eps, coeffs, args.shift, args.scale, draws, args.draws,
                          args.iterations)
        return (None if eps_u is None else eps_u + delta), eps_c + delta

    task.eps_pair = guided_pair
    run.prepare_evaluation()
    if run.why_not is not None:
        raise SystemExit(f"the digits evaluation cannot score this configuration: {run.why_not}")
    result = run.evaluate_digits(args.out)
    result["value_guidance"] = {
        **fit, "scale": args.scale, "shift": args.shift, "draws": args.draws, "iterations": args.iterations}
    (args.out / "value_guidance.json").write_text(json.dumps(result, indent=2))
    pol, target = result["policy"], result["target"]
    print(f"value guidance ({fit['trajectories']} trajectories, {args.steps} steps, {args.shift} shift, scale "
          f"{args.scale}): mean log R {pol['mean_log_reward']:.2f} (target {target['mean_log_reward']:.2f}), class TV "
          f"{pol['class_tv']:.3f} (floor {target['class_tv_floor']['mean']:.3f}), diversity "
          f"{pol['diversity_ratio']:.3f}, Frechet {pol['frechet']:.0f}")
    print("histogram", [round(v, 3) for v in pol["histogram"]], "target", [round(v, 3) for v in target["histogram"]])
    run.close()
    return result


@torch.no_grad()
def _held_out_loss(value: LogValue, x: torch.Tensor, y: torch.Tensor, num_steps: int) -> dict[int, float]:
    """The fitting loss on held-out trajectories at five states from noise (0) to the sample (T)."""
    if len(y) == 0:
        return {}
    out = {}
    for s in sorted({0, num_steps // 4, num_steps // 2, 3 * num_steps // 4, num_steps}):
        state = torch.full((len(y),), s)
        u = value(x[:, s], state)
        out[s] = float(log_mean_loss(u, y))
    return out


if __name__ == "__main__":
    main()
