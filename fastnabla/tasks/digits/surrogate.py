"""The distilled surrogate decoder of a digits pipeline: the forward-looking term's cheap decoder (docs/cost.md).

With ``method.fl_decoder=surrogate`` the forward-looking term ``beta gamma_s grad log R(decode(x_hat(x_s)))`` (eq. 15)
is computed through a cheap decoder at non-terminal states; there it is a baseline of the flow,
``log F(x_s) = beta gamma_s log R(decode(x_hat)) + g(x_s)``, and the flow network absorbs the difference. Only the
terminal state, ``log F(x_T) = beta log R(x_T)``, needs the exact decoder. For Stable Diffusion the surrogate is
TAESD (a diffusers ``AutoencoderTiny``); for a digits pipeline it is this module's: an ``AutoencoderTiny`` trained to
mimic the pipeline's ``AutoencoderKL`` decoder on the latents the forward-looking term decodes.

**Distillation.** Inputs are diffusion latents ``x = s z`` (``s`` the pipeline's scaling factor) of the training
images' posterior samples ``z``, and, since ``x_hat(x_t)`` early in a trajectory is a blurred average rather than a
clean latent, mixtures ``lambda x + (1 - lambda) x'`` and shrunk copies ``rho x`` plus Gaussian noise of a random
scale. The loss is ``|| D_tiny(x) - D(x / s) ||^2`` on the decoders' raw outputs (``[-1, 1]`` images); Adam, one
cycle. The surrogate's own ``scaling_factor`` is 1 (it takes ``x`` itself, as TAESD takes SD's latents).

**Cache.** Beside the pipeline directory, named by the pipeline's build key (its ``fastnabla_digits.json``) and a
hash of :class:`SurrogateSettings`: ``<pipeline>.fl-surrogate-<key>/`` (``save_pretrained`` layout + ``report.json``),
written to a temporary sibling and renamed into place. Deterministic for the same settings, pipeline and thread count.
``python -m fastnabla.tasks.digits.surrogate [--model DIR]`` builds it (~2.5 CPU-minutes) and prints its report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastnabla.compat import prepare_third_party_imports
from fastnabla.tasks.digits.build import MARKER, read_marker
from fastnabla.tasks.digits.data import load_split
from fastnabla.tasks.digits.training import encode_posterior

Tensor = torch.Tensor
FORMAT = 1
REPORT = "report.json"


@dataclass(frozen=True)
class SurrogateSettings:
    """Everything the distilled decoder depends on besides the pipeline (hashed into the cache key)."""

    channels: tuple[int, ...] = (16, 16, 16)  # one entry per level: 4x4 latents -> 16x16 images
    blocks: tuple[int, ...] = (1, 1, 1)  # AutoencoderTinyBlocks per level
    steps: int = 1200
    batch: int = 128
    lr: float = 3e-3
    seed: int = 0

    def key(self, pipeline_key: str) -> str:
        text = json.dumps({"format": FORMAT, "pipeline": pipeline_key, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


DEFAULT = SurrogateSettings()


def surrogate_dir(pipeline_dir: str | Path, settings: SurrogateSettings = DEFAULT) -> Path:
    """Where the surrogate of ``pipeline_dir`` is cached (it may not exist yet).

    Raises:
        FileNotFoundError: ``pipeline_dir`` is not a digits build (no ``fastnabla_digits.json``).
    """
    pipeline_dir = Path(pipeline_dir).expanduser().resolve()
    marker = read_marker(pipeline_dir)
    if marker is None:
        raise FileNotFoundError(f"{str(pipeline_dir)!r} is not a digits pipeline build (no {MARKER}): the distilled "
                                "surrogate decoder needs one (sd.model=digits)")
    return pipeline_dir.with_name(f"{pipeline_dir.name}.fl-surrogate-{settings.key(str(marker.get('key')))}")


def _tiny_decoder(s: SurrogateSettings) -> Any:
    from diffusers import AutoencoderTiny

    levels = len(s.channels)
    return AutoencoderTiny(
        in_channels=3, out_channels=3, latent_channels=4, encoder_block_out_channels=(8,) * levels,
        num_encoder_blocks=(1,) * levels, decoder_block_out_channels=s.channels, num_decoder_blocks=s.blocks,
        scaling_factor=1.0,
    )  # fmt: skip


def distillation_inputs(latents: Tensor, n: int, gen: torch.Generator) -> Tensor:
    """``n`` decoder inputs from scaled latents ``[N, 4, h, w]``: a third clean, a third mixtures of two, a third
    shrunk (``rho ~ U(0.2, 1)``) -- each plus Gaussian noise of std ``U(0, 0.3)`` (module docstring)."""
    idx = torch.randint(0, len(latents), (2, n), generator=gen)
    x, other = latents[idx[0]], latents[idx[1]]
    u = torch.rand(n, 1, 1, 1, generator=gen)
    kind = torch.arange(n) % 3
    mix = torch.where((kind == 1).reshape(-1, 1, 1, 1), u * x + (1 - u) * other, x)
    rho = 0.2 + 0.8 * torch.rand(n, 1, 1, 1, generator=gen)
    out = torch.where((kind == 2).reshape(-1, 1, 1, 1), rho * mix, mix)
    return out + 0.3 * torch.rand(n, 1, 1, 1, generator=gen) * torch.randn(out.shape, generator=gen)


def _latents(vae: Any, images: Tensor, seed: int) -> Tensor:
    mean, std = encode_posterior(vae, images)
    gen = torch.Generator().manual_seed(seed)
    return (mean + std * torch.randn(mean.shape, generator=gen)) * float(vae.config.scaling_factor)


def _exact(vae: Any, x: Tensor) -> Tensor:
    return vae.decode(x / vae.config.scaling_factor, return_dict=False)[0]


def _count_flops(module_fn, x: Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        module_fn(x)
    return int(counter.get_total_flops())


def train_surrogate(pipeline_dir: str | Path, settings: SurrogateSettings = DEFAULT, progress: bool = True
                    ) -> tuple[Any, dict]:
    """Distil the surrogate of ``pipeline_dir``'s VAE decoder; returns ``(AutoencoderTiny, report)``.

    The report compares it with the exact decoder on the held-out images' latents (clean, and the distillation's
    perturbed inputs): the images' RMSE in ``[-1, 1]``, the digits-value reward ``log R`` on both outputs (mean
    absolute difference, correlation) and the cosine between the two reward gradients in latent space, which is what
    the forward-looking term uses; plus both decoders' forward FLOPs per latent.
    """
    prepare_third_party_imports()
    from diffusers import AutoencoderKL

    from fastnabla.rewards.digits import build_digits_value

    pipeline_dir = Path(pipeline_dir).expanduser()
    t0, cpu0 = time.perf_counter(), time.process_time()
    vae = AutoencoderKL.from_pretrained(str(pipeline_dir / "vae")).eval().requires_grad_(False)
    split = load_split(int(vae.config.sample_size))
    train_x = _latents(vae, split.train_images, settings.seed)
    test_x = _latents(vae, split.test_images, settings.seed + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = _tiny_decoder(settings)
    gen = torch.Generator().manual_seed(settings.seed + 2)
    opt = torch.optim.Adam(model.decoder.parameters(), settings.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, settings.lr, total_steps=settings.steps, pct_start=0.1)
    model.train()
    for i in range(settings.steps):
        x = distillation_inputs(train_x, settings.batch, gen)
        with torch.no_grad():
            target = _exact(vae, x)
        loss = (model.decode(x, return_dict=False)[0] - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress and (i + 1) % 250 == 0:
            mse = loss.detach().item()
            print(f"digits surrogate decoder: step {i + 1}/{settings.steps}, mse {mse:.4f}", file=sys.stderr)
    model = model.eval().requires_grad_(False)
    reward = build_digits_value(classifier=str(pipeline_dir)).eval()
    report = {"format": FORMAT, "settings": dataclasses.asdict(settings), "train_seconds": 0.0}
    sets = {"held_out_clean": test_x, "held_out_perturbed": distillation_inputs(test_x, len(test_x),
                                                                              torch.Generator().manual_seed(7))}
    for name, x in sets.items():
        report[name] = compare_decoders(lambda z: _exact(vae, z), lambda z: model.decode(z, return_dict=False)[0],
                                        reward, x)
    one = test_x[:1]
    report["gflops_forward_per_latent"] = {"exact": _count_flops(lambda z: _exact(vae, z), one) / 1e9,
                                           "surrogate": _count_flops(lambda z: model.decode(z), one) / 1e9}
    report["train_seconds"] = round(time.perf_counter() - t0, 1)  # wall (a shared machine: see cpu_seconds)
    report["cpu_seconds"] = round(time.process_time() - cpu0, 1)
    report["threads"] = torch.get_num_threads()
    return model, report


def compare_decoders(exact, surrogate, reward: Any, x: Tensor) -> dict:
    """RMSE of the images (``[-1, 1]``), ``log R`` agreement and the cosine of the latent reward gradients
    ``grad_x log R(post(D(x)))`` of two decoders on latents ``x`` (``post``: ``clamp(d / 2 + 1/2, 0, 1)``)."""
    out = {}
    logs, grads = [], []
    for fn in (exact, surrogate):
        xi = x.detach().clone().requires_grad_(True)
        img = fn(xi)
        logr = reward.score((img / 2 + 0.5).clamp(0, 1), [""] * len(x))  # the digits preset: log R = score
        (g,) = torch.autograd.grad(logr.sum(), xi)
        logs.append(logr.detach())
        grads.append(g.flatten(1))
        out.setdefault("images", []).append(img.detach())
    ie, is_ = out.pop("images")
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=1)
    return {
        "num": len(x),
        "image_rmse": float((ie - is_).pow(2).mean().sqrt()),
        "log_r_mean_exact": float(logs[0].mean()),
        "log_r_mean_surrogate": float(logs[1].mean()),
        "log_r_mean_abs_diff": float((logs[0] - logs[1]).abs().mean()),
        "log_r_corr": float(torch.corrcoef(torch.stack(logs))[0, 1]),
        "grad_cosine_median": float(cos.median()),
        "grad_cosine_mean": float(cos.mean()),
    }


def build_surrogate(pipeline_dir: str | Path, settings: SurrogateSettings = DEFAULT, progress: bool = True,
                    threads: int | None = 1) -> Path:
    """The cached surrogate directory of ``pipeline_dir`` (:func:`surrogate_dir`), distilled first when missing."""
    directory = surrogate_dir(pipeline_dir, settings)
    if (directory / REPORT).is_file():
        return directory
    if progress:
        print(f"sd.fl_surrogate_decoder=digits: distilling the surrogate decoder once into {directory} (~2.5 "
              "CPU-minutes)", file=sys.stderr)
    old = torch.get_num_threads()
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        if threads:
            torch.set_num_threads(threads)
        model, report = train_surrogate(pipeline_dir, settings, progress)
        model.save_pretrained(tmp)
        (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        os.rename(tmp, directory)
    except OSError:
        if not (directory / REPORT).is_file():  # another process may have won the race
            raise
    finally:
        torch.set_num_threads(old)
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fastnabla.tasks.digits.surrogate", description=__doc__.split(
        "\n")[0])
    parser.add_argument("--model", default="digits", help="a digits pipeline directory or 'digits' (the default build)")
    parser.add_argument("--channels", type=int, nargs="+", default=list(DEFAULT.channels),
                        help="decoder channels per level (default: %(default)s)")
    parser.add_argument("--blocks", type=int, nargs="+", default=list(DEFAULT.blocks),
                        help="AutoencoderTiny blocks per level (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=DEFAULT.steps, help="distillation steps (default: %(default)s)")
    args = parser.parse_args(argv)
    if len(args.channels) != len(args.blocks):
        parser.error(f"--channels has {len(args.channels)} levels, --blocks {len(args.blocks)}: give one per level")
    from fastnabla.tasks.digits.run import resolve_digits_model

    settings = dataclasses.replace(DEFAULT, channels=tuple(args.channels), blocks=tuple(args.blocks), steps=args.steps)
    directory = build_surrogate(resolve_digits_model(args.model), settings)
    print(directory)
    print((directory / REPORT).read_text(), end="")


if __name__ == "__main__":
    main()
