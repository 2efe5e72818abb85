"""Probe behind docs/digits.md, "The off-policy value as the forward-looking baseline": nabla-GFlowNet on ``digits``
with the forward-looking term replaced by the gradient of a value fitted off-policy to pretrained trajectories.

The residual parametrisation ``log F_s(x) = baseline_s(x) + g(x)`` (eq. 15) takes any baseline; the method's is
``beta grad log R(x_hat(x_s))``, local and sparse on this confident classifier. Here the baseline at every
non-terminal state is ``grad u(x_s, s)``, where ``u = log E_p#[R(x_T)^beta | x_s]`` is fitted first by
``value_guidance.fit_value`` (the value that, as classifier guidance of the pretrained sampler, lands near the
target: docs/digits.md, "A policy-independent value as the missing signal"); at ``x_T`` the exact reward gradient
stays, since ``log F(x_T) = beta log R(x_T)`` must hold. The flow network ``g`` and every other setting are the
preset's (with the overrides given), so the run trains, checkpoints and evaluates as ``python -m fastnabla.train``
does. A probe, not a method of the package: the value is fitted in this process and not saved in the run's
checkpoints (a resumed run would have none), and the FL VJP is never folded (``method.fold_fl_vjp=false``).

    python docs/digits/value_baseline.py OUT_DIR [--trajectories 4000] [--steps 1500] [KEY=VALUE ...]

It writes the training run to ``OUT_DIR/run`` and ``OUT_DIR/value_baseline.json`` (the fit's summary and the run's
digits evaluation), and refuses an existing ``OUT_DIR``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from value_guidance import CHUNK, fit_value, grad_u  # noqa: E402

from fastnabla.config.loader import build_config  # noqa: E402
from fastnabla.methods.nabla_gfn import fl_states  # noqa: E402
from fastnabla.methods.nabla_gfn import loss as nabla_loss  # noqa: E402
from fastnabla.run.config import RunConfig  # noqa: E402
from fastnabla.run.driver import build_task_run, build_trainer  # noqa: E402
from fastnabla.run.presets import get_preset  # noqa: E402
from fastnabla.training.distributed import DistContext  # noqa: E402
from fastnabla.training.interface import select_cond  # noqa: E402

Tensor = torch.Tensor


def value_forward_looking_fn(exact_fn, value: torch.nn.Module):
    """A drop-in for :func:`fastnabla.methods.nabla_gfn.fl_states.forward_looking_fn` whose gradient is ``grad u(x,
    s)`` on non-terminal rows (``s = step``, the state index of a non-terminal state) and ``exact_fn``'s (the exact
    reward gradient) on terminal rows."""

    def make(task, opts, fl_model=None):
        if opts.fl_noise_var > 0:
            raise ValueError("the value baseline has no reward smoothing: set method.fl_noise_var=0")
        exact = exact_fn(task, opts, fl_model)

        def fl(x: Tensor, step: Tensor, alpha_bar: Tensor, terminal: Tensor, cond, noise: Tensor | None = None):
            out = torch.empty_like(x)
            ends, inner = terminal.nonzero(as_tuple=True)[0], (~terminal).nonzero(as_tuple=True)[0]
            if ends.numel():
                out[ends] = exact(x[ends], step[ends], alpha_bar[ends], terminal[ends], select_cond(cond, ends.cpu()))
            if inner.numel():
                out[inner] = grad_u(value, x[inner], step[inner]).to(x.dtype)
            return out

        return fl

    return make


@contextlib.contextmanager
def value_baseline(value: torch.nn.Module) -> Iterator[None]:
    """Within the block every forward-looking gradient of nabla-GFlowNet (the per-state tables and the loss) is
    :func:`value_forward_looking_fn`'s."""
    exact_fn = fl_states.forward_looking_fn
    patched = value_forward_looking_fn(exact_fn, value)
    fl_states.forward_looking_fn = nabla_loss.forward_looking_fn = patched
    try:
        yield
    finally:
        fl_states.forward_looking_fn = nabla_loss.forward_looking_fn = exact_fn


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--trajectories", type=int, default=4000, help="pretrained trajectories to fit the value on")
    p.add_argument("--steps", type=int, default=1500, help="Adam steps of 512 states")
    p.add_argument("overrides", nargs="*", help="overrides of the digits preset (KEY=VALUE), for the fit's sampler "
                   "and the training run alike")
    args = p.parse_intermixed_args(argv)
    if args.trajectories < 2 or args.steps < 1:
        p.error(f"--trajectories {args.trajectories} (>= 2) and --steps {args.steps} (>= 1)")
    if args.out.exists():  # never overwrite an earlier result
        raise FileExistsError(f"{args.out} exists; give a new output directory")
    overrides = [*args.overrides, "method.fold_fl_vjp=false"]
    torch.set_num_threads(1)
    chunk = min(CHUNK, args.trajectories)
    cfg = build_config(RunConfig, get_preset("digits"), None, [
        *overrides, f"output.dir={args.out / 'run'}", f"train.batch_size={chunk}", f"train.sample_batch_size={chunk}"])
    if cfg.method.name != "nabla-gfn":
        p.error(f"method.name={cfg.method.name}: the value baseline replaces nabla-GFlowNet's forward-looking term")
    torch.manual_seed(cfg.seed)
    dist = DistContext()
    fit_run = build_task_run(cfg, dist)
    value, fit = fit_value(build_trainer(fit_run.task, cfg, dist), fit_run.task.mdp.num_steps, cfg.method.beta,
                           args.trajectories, args.steps, cfg.seed, chunk)
    fit_run.close()
    args.out.mkdir(parents=True)

    from fastnabla.train import main as train

    with value_baseline(value):
        status = train(["--preset", "digits", "--out", str(args.out / "run"), *overrides])
    if status != 0:
        raise SystemExit(f"the training run stopped with exit status {status} (see {args.out / 'run'})")
    metrics = json.loads((args.out / "run" / "metrics.json").read_text())
    result = {"value_baseline": fit, "digits": metrics.get("digits")}
    (args.out / "value_baseline.json").write_text(json.dumps(result, indent=2))
    if metrics.get("digits") and metrics["digits"].get("evaluated"):
        pol, target = metrics["digits"]["policy"], metrics["digits"]["target"]
        print(f"value baseline ({fit['trajectories']} trajectories, {args.steps} steps): mean log R "
              f"{pol['mean_log_reward']:.2f} (target {target['mean_log_reward']:.2f}), class TV {pol['class_tv']:.3f}, "
              f"diversity {pol['diversity_ratio']:.3f}, Frechet {pol['frechet']:.0f}")
    return result


if __name__ == "__main__":
    main()
