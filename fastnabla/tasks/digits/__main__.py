"""``python -m fastnabla.tasks.digits``: build the pipeline, sample it, estimate targets.

    python -m fastnabla.tasks.digits build [--out DIR] [--quick] [--force]
    python -m fastnabla.tasks.digits grid --model DIR --out docs/digits/samples.png [--guidance 5]
    python -m fastnabla.tasks.digits target --model DIR [--prompt P] [--reward digits-class] [--classes 3]
        [--beta 1 2 4] [--n 10000] [--guidance 5]
    python -m fastnabla.tasks.digits histograms --model DIR [--n 500] [--guidance 5]
    python -m fastnabla.tasks.digits compare --presets digits digits-refl --seeds 0 1 2 --out docs/digits/compare
        [--runs runs/digits-compare] [--model DIR] [--no-train] [--overrides key=value ...]

Pretrained samples are cached in DIR/targets/ (sampling 10,000 takes ~8 CPU-minutes; later calls are instant).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from fastnabla.tasks.digits.data import DEFAULT_PROMPT, PROMPTS


def _build(args: argparse.Namespace) -> int:
    from fastnabla.tasks.digits.build import FULL, QUICK, build_pipeline, read_marker

    t0 = time.perf_counter()
    path = build_pipeline(args.out, QUICK if args.quick else FULL, progress=not args.no_progress,
                          threads=args.threads or None, force=args.force)
    marker = read_marker(path) or {}
    print(f"classifier held-out accuracy {marker.get('classifier_held_out_accuracy', float('nan')):.4f}, "
          f"build seconds {marker.get('seconds')}, this call {time.perf_counter() - t0:.1f} s")
    print(f"digits pipeline ({'quick' if args.quick else 'full'}): {path}")
    return 0


def _grid(args: argparse.Namespace) -> int:
    import torch

    from fastnabla.tasks.digits.sampling import sample_pretrained
    from fastnabla.tasks.sd.image_grid import save_image_grid
    from fastnabla.tasks.sd.loading import load_components

    parts = load_components(args.model, field_name="--model")
    prompts = args.prompts or list(PROMPTS)[:5]
    rows = [sample_pretrained(parts, p, args.per_prompt, args.guidance, args.steps, 1.0, args.seed) for p in prompts]
    images = torch.stack(rows, 1).flatten(0, 1)  # row r = sample r of every prompt (one column per prompt)
    upscaled = torch.nn.functional.interpolate(images, scale_factor=args.zoom, mode="nearest")
    path = save_image_grid(upscaled, args.out, nrow=len(prompts))
    print(f"columns: {prompts}\ngrid: {path}")
    return 0


def _target(args: argparse.Namespace) -> int:
    from fastnabla.tasks.digits.metrics import compare_to_target
    from fastnabla.tasks.digits.target import digits_target

    options: dict = {}
    if args.classes is not None:
        options["classes"] = args.classes
    for beta in args.beta:
        target, samples = digits_target(args.model, args.prompt, beta, args.reward, options, args.n, args.guidance,
                                        args.steps, progress=not args.no_progress)
        prior = compare_to_target(samples.labels, samples.features, target.log_reward, samples.labels,
                                  samples.features, target.log_reward, target.weights)
        row = {"prompt": args.prompt, "reward": args.reward, **options, "guidance": args.guidance, "beta": beta,
               "n": len(target.weights), "ess": round(target.ess, 1),
               "target_histogram": [round(v, 4) for v in target.histogram.tolist()],
               "pretrained_histogram": [round(v, 4) for v in prior["histogram"]],
               "target_mean_log_r": round(target.mean_log_reward, 4),
               "pretrained_mean_log_r": round(prior["mean_log_reward"], 4),
               "pretrained_tv": round(prior["class_tv"], 4), "pretrained_frechet": round(prior["frechet"], 3),
               "pretrained_diversity_ratio": round(prior["diversity_ratio"], 4)}
        print(json.dumps(row))
    return 0


def _histograms(args: argparse.Namespace) -> int:
    from fastnabla.tasks.digits.target import pretrained_samples

    prompts = args.prompts or list(PROMPTS)
    print(f"| prompt (CFG {args.guidance:g}, {args.n} samples) | in set | " + " | ".join(map(str, range(10))) + " |")
    print("|---|---|" + "---|" * 10)
    for p in prompts:
        s = pretrained_samples(args.model, p, args.n, args.guidance, args.steps, progress=not args.no_progress)
        h = s.labels.bincount(minlength=10).double() / args.n
        inside = float(h[list(PROMPTS[p])].sum()) if p in PROMPTS else float("nan")
        print(f"| {p} | {inside:.3f} | " + " | ".join(f"{v:.3f}" for v in h.tolist()) + " |")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from fastnabla.tasks.digits.compare import compare

    print(compare(args.presets, args.seeds, args.out, args.runs, args.model, args.overrides, not args.no_train,
                  args.available), end="")
    print(f"table, results.json and sample grids in {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastnabla.tasks.digits", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train and cache the digits pipeline (prints its directory last)")
    b.add_argument("--out", type=Path, default=None, help="pipeline directory (default: the cache)")
    b.add_argument("--quick", action="store_true", help="the ~1-minute low-quality build for tests")
    b.add_argument("--force", action="store_true", help="rebuild even when cached")
    b.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(run=_build)
    g = sub.add_parser("grid", help="PNG grid of pretrained samples, one column per prompt")
    g.add_argument("--model", required=True)
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--prompts", nargs="*", default=None)
    g.add_argument("--per-prompt", type=int, default=8)
    g.add_argument("--guidance", type=float, default=5.0)
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--zoom", type=int, default=4, help="nearest-neighbour upscaling of the 16x16 images")
    g.set_defaults(run=_grid)
    t = sub.add_parser("target", help="importance-weighted target p# R^beta: ESS, histogram, mean log R (JSON lines)")
    t.add_argument("--model", required=True)
    t.add_argument("--prompt", default=DEFAULT_PROMPT)
    t.add_argument("--reward", default="digits-class")
    t.add_argument("--classes", type=int, nargs="+", default=None)
    t.add_argument("--beta", type=float, nargs="+", default=[1.0])
    t.add_argument("--n", type=int, default=10_000)
    t.add_argument("--guidance", type=float, default=5.0)
    t.add_argument("--steps", type=int, default=50)
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(run=_target)
    h = sub.add_parser("histograms", help="class histogram of pretrained samples per prompt (a Markdown table)")
    h.add_argument("--model", required=True)
    h.add_argument("--prompts", nargs="*", default=None)
    h.add_argument("--n", type=int, default=500)
    h.add_argument("--guidance", type=float, default=5.0)
    h.add_argument("--steps", type=int, default=50)
    h.add_argument("--no-progress", action="store_true")
    h.set_defaults(run=_histograms)

    c = sub.add_parser("compare", help="train presets x seeds, tabulate the digits evaluation, one sample grid each")
    c.add_argument("--presets", nargs="+", required=True)
    c.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    c.add_argument("--out", type=Path, required=True, help="table.md, results.json, <preset>.png")
    c.add_argument("--runs", type=Path, default=Path("runs/digits-compare"), help="run directories (reused)")
    c.add_argument("--model", default=None, help="digits pipeline directory (default: each preset's sd.model)")
    c.add_argument("--overrides", nargs="*", default=[], help="config overrides for every run (key.path=value)")
    c.add_argument("--no-train", action="store_true", help="tabulate existing runs only")
    c.add_argument("--available", action="store_true", help="with --no-train: each preset's finished seeds only")
    c.set_defaults(run=_compare, threads=0)
    for p in (g, t, h):
        p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.command != "build" and args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    try:
        return args.run(args)
    except (FileNotFoundError, FileExistsError, ValueError, subprocess.CalledProcessError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
