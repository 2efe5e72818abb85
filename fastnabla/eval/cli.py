"""``python -m fastnabla.eval``: evaluate fine-tuned Stable Diffusion runs; plot evaluation results.

Examples::

    python -m fastnabla.eval evaluate runs/nabla runs/refl --out evals/aesthetic \\
        --inception /models/pt_inception-2015-12-05-6726825d.pth --dreamsim /models/dreamsim \\
        --images-per-prompt 64 --checkpoints all
    python -m fastnabla.eval evaluate runs/tiny --out evals/tiny --clip /models/clip-vit-large-patch14
    python -m fastnabla.eval evaluate --model /models/sd15 --lora /loras/peer --lora runs/nabla/lora \
        --preset sd15-aesthetic --out evals/any                     # any diffusers model, any diffusers LoRA
    python -m fastnabla.eval plot evals/a/results.json evals/b/results.json --out evals/plots

``evaluate`` writes ``OUT/runs/<run>.json`` per run as it finishes, the plots under ``OUT/plots/``, and last
``OUT/results.json`` (``"complete": true``); docs/evaluation.md describes every metric, weight file and fallback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from fastnabla.config.loader import ConfigError

METRICS = ("reward", "diversity", "fid")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastnabla.eval",
                                description="Evaluate fine-tuned Stable Diffusion runs: reward, diversity, prior "
                                            "following (docs/evaluation.md).")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("evaluate", help="evaluate run directories and their pretrained model")
    e.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run directories written by python -m fastnabla.train")
    e.add_argument("--model", metavar="DIR", help="evaluate this diffusers model (a pipeline directory, a hub id or "
                   "'tiny') with the settings of --preset and --set, and its pretrained samples as the reference")
    e.add_argument("--lora", action="append", default=[], metavar="PATH", help="with --model: a diffusers-format LoRA "
                   "(pytorch_lora_weights.safetensors or its directory: fastnabla's OUT/lora, a peer's "
                   "save_lora_weights output); repeatable; without it the model alone is evaluated")
    e.add_argument("--preset", default="sd15-aesthetic", metavar="NAME", help="with --model: the preset whose "
                   "sampler, reward and prompts are used (default sd15-aesthetic: the release's settings)")
    e.add_argument("--out", required=True, metavar="DIR", help="output directory")
    e.add_argument("--checkpoints", choices=("final", "all"), default="final",
                   help="evaluate the final weights only, or every kept checkpoint (curves over training)")
    e.add_argument("--prompts", metavar="FILE", help="evaluation prompts: a prompt file or directory, as "
                   "sd.prompts.source (default: the first run's sd.prompts.eval_prompts, else all its held-out prompts "
                   "(sd.prompts.eval_source, or a published set's), else the first 4 of its training prompts)")
    e.add_argument("--images-per-prompt", type=int, metavar="N",
                   help="images per prompt, seeds 0..N-1 (default: the first run's sd.prompts.eval_seeds; the paper "
                   "uses 64)")
    e.add_argument("--batch-size", type=int, default=16, metavar="B", help="images per sampling batch (default 16)")
    e.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: CUDA when available")
    e.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: the first run's threads "
                   "setting; 0: torch's default)")
    e.add_argument("--metrics", default=",".join(METRICS),
                   help=f"comma-separated subset of {','.join(METRICS)} (default: all)")
    e.add_argument("--dreamsim", metavar="DIR", help="DreamSim weight directory (needs the dreamsim package); "
                   "without it diversity is measured on CLIP features and labelled clip-features")
    e.add_argument("--dreamsim-type", metavar="NAME", help="DreamSim variant (the package's dreamsim_type)")
    e.add_argument("--inception", metavar="FILE", help="Inception-v3 weights for FID (pytorch-fid's "
                   "pt_inception-2015-12-05-*.pth or torchvision's inception_v3_google-*.pth); without it the "
                   "prior-following metric is a CLIP-feature Frechet distance, labelled clip-frechet")
    e.add_argument("--fallback-features", choices=("clip", "pixels"), default="clip",
                   help="features of diversity / prior following without --dreamsim / --inception: CLIP image "
                   "features (needs CLIP weights) or downsampled pixels (no weights); labelled as fallbacks")
    e.add_argument("--clip", metavar="PATH", help="CLIP image tower for the fallbacks: transformers directory, hub id "
                   "or OpenAI/open_clip file (default: openai/clip-vit-large-patch14 from the hub cache)")
    e.add_argument("--clip-architecture", default="ViT-L-14-quickgelu", metavar="NAME",
                   help="open_clip architecture of a --clip checkpoint file")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="config override applied to every run (e.g. sd.model=/models/sd15, "
                   "sd.reward.options.mlp=/models/sac+logos+ava1-l14-linearMSE.pth); repeatable")
    e.add_argument("--name", action="append", default=[], metavar="LABEL",
                   help="label of each run in results and plots (repeat once per run; default: directory names)")
    e.add_argument("--overwrite", action="store_true", help="replace a finished evaluation in --out")
    e.add_argument("--no-plots", action="store_true", help="write JSON only")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    pl = sub.add_parser("plot", help="plot one or more results.json files together")
    pl.add_argument("results", nargs="+", metavar="RESULTS_JSON")
    pl.add_argument("--out", required=True, metavar="DIR", help="directory for the PNG files")
    return p


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available here")
    return torch.device(name)


def _metrics(text: str) -> set[str]:
    chosen = {m.strip() for m in text.split(",") if m.strip()}
    unknown = chosen - set(METRICS)
    if unknown or "reward" not in chosen:
        raise ValueError(f"--metrics={text!r}: choose from {METRICS} (reward always included)")
    return chosen


def _run_names(runs: Sequence[str], names: Sequence[str]) -> list[str]:
    if names and len(names) != len(runs):
        raise ValueError(f"--name given {len(names)} times for {len(runs)} runs (once per run, or not at all)")
    chosen = list(names) or [Path(r).expanduser().resolve().name for r in runs]
    seen: dict[str, int] = {}
    unique = []
    for n in chosen:
        seen[n] = seen.get(n, 0) + 1
        unique.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return unique


def _plan(args, first_run):
    from fastnabla.eval.image_sets import EvalPlan
    from fastnabla.tasks.sd.prompts import held_out_prompts, load_prompts, load_task_prompts

    prompts_cfg = first_run.cfg.sd.prompts
    if args.prompts:
        prompts = load_prompts(args.prompts, field_name="--prompts")
    else:
        prompts = list(prompts_cfg.eval_prompts) or held_out_prompts(prompts_cfg) or load_task_prompts(prompts_cfg)[1]
    if args.images_per_prompt is not None:
        if args.images_per_prompt < 1:
            raise ValueError(f"--images-per-prompt must be >= 1, got {args.images_per_prompt}")
        seeds = list(range(args.images_per_prompt))
    else:
        seeds = list(prompts_cfg.eval_seeds)
    return EvalPlan(prompts, seeds, args.batch_size)


def _extractors(args, metrics: set[str], device: torch.device):
    from fastnabla.eval.clip_features import load_clip_features
    from fastnabla.eval.dreamsim_features import load_dreamsim_features
    from fastnabla.eval.image_sets import MetricExtractors
    from fastnabla.eval.inception import load_inception_features
    from fastnabla.eval.pixel_features import PixelFeatures

    clip = None

    def clip_features():
        nonlocal clip
        if clip is None:
            clip = (PixelFeatures(device=device) if args.fallback_features == "pixels"
                    else load_clip_features(args.clip, device, architecture=args.clip_architecture))
        return clip

    diversity = fid = None
    if "diversity" in metrics:
        diversity = (load_dreamsim_features(args.dreamsim, device, args.dreamsim_type) if args.dreamsim
                     else clip_features())
    if "fid" in metrics:
        fid = load_inception_features(args.inception, device) if args.inception else clip_features()
    return MetricExtractors(diversity=diversity, fid=fid)


def _check_out(out: Path, overwrite: bool) -> None:
    results = out / "results.json"
    if results.exists() and not overwrite:
        raise FileExistsError(f"{results} exists (a finished evaluation); pass --overwrite or another --out")


def _prepare_out(out: Path) -> None:
    results = out / "results.json"
    out.mkdir(parents=True, exist_ok=True)
    results.unlink(missing_ok=True)  # from here until the end the directory is an unfinished evaluation
    for stale in [*(out / "runs").glob("*.json"), *(out / "plots").glob("*.png")]:
        stale.unlink()


def evaluate_command(args) -> int:
    from fastnabla.eval.driver import evaluate_runs
    from fastnabla.eval.plots import write_plots
    from fastnabla.eval.runs import open_model, open_run
    from fastnabla.utils.io import write_json

    metrics = _metrics(args.metrics)
    if args.dreamsim_type and not args.dreamsim:
        raise ValueError("--dreamsim-type needs --dreamsim DIR (the DreamSim weight directory)")
    if args.fallback_features == "pixels" and args.clip:
        raise ValueError("--clip is for the CLIP fallback; --fallback-features pixels needs no weights")
    device = _device(args.device)
    if args.lora and not args.model:
        raise ValueError("--lora needs --model DIR (the diffusers model the LoRA applies to)")
    if not args.runs and not args.model:
        raise ValueError("evaluate needs run directories, or --model DIR (with --lora PATH ...)")
    entries = [*args.runs, *args.lora]
    names = _run_names(entries, args.name) if entries else list(args.name)
    runs = [open_run(path, args.overrides, name) for path, name in zip(args.runs, names, strict=False)]
    if args.model:
        runs += open_model(args.model, args.lora, args.preset, args.overrides,
                           names[len(args.runs):] if args.name else None)
    for run in runs:
        if run.kind == "run" and not run.finished:
            print(f"note: {run.path} has no metrics.json (unfinished run): evaluating its newest checkpoint "
                  f"(step {run.final.step})", file=sys.stderr)
    threads = args.threads if args.threads is not None else runs[0].cfg.threads
    if threads < 0:
        raise ValueError(f"--threads must be >= 0, got {threads}")
    if threads:
        torch.set_num_threads(threads)
    plan = _plan(args, runs[0])
    if metrics & {"diversity", "fid"} and plan.images_per_prompt < 2:
        raise ValueError(f"diversity and FID need at least 2 images per prompt, the plan has {plan.images_per_prompt}"
                         " (sd.prompts.eval_seeds of the first run); pass --images-per-prompt N (the paper uses 64)")
    out = Path(args.out).expanduser()
    _check_out(out, args.overwrite)
    extractors = _extractors(args, metrics, device)  # missing weights fail before anything is written
    _prepare_out(out)
    results = evaluate_runs(runs, plan, extractors, out, device, args.checkpoints, progress=not args.no_progress)
    if not args.no_plots:
        results["plots"] = [str(p) for p in write_plots(results, out / "plots")]
    write_json(out / "results.json", results)
    _print_summary(results, out)
    return 0


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def _print_summary(results: dict, out: Path) -> None:
    described = results["metrics"]
    div = described["diversity"]["kind"] if described["diversity"] else None
    fid = described["prior"]["kind"] if described["prior"] else None
    header = f"{'model':32s} {'step':>6s} {'reward':>10s} {'std':>8s}"
    header += f" {'div[' + div + ']':>26s}" if div else ""
    header += f" {fid:>26s}" if fid else ""
    print(header)

    def row(name: str, step: str, m: dict) -> None:
        line = f"{name[:32]:32s} {step:>6s} {_fmt(m['reward_mean']):>10s} {_fmt(m['reward_std']):>8s}"
        line += f" {_fmt(m.get('diversity_pairwise_distance')):>26s}" if div else ""
        line += f" {_fmt(m.get('frechet_distance')):>26s}" if fid else ""
        print(line)

    for p in results["pretrained"]:
        row(p["id"], "-", p["metrics"])
    for run in results["runs"]:
        for c in run["checkpoints"]:
            row(run["name"], str(c["step"]), c["metrics"])
    print(f"results in {out / 'results.json'}")


def plot_command(args) -> int:
    from fastnabla.eval.plots import merge_results, write_plots

    loaded = []
    for name in args.results:
        path = Path(name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"results file {path} does not exist")
        loaded.append(json.loads(path.read_text()))
    for path in write_plots(merge_results(loaded), Path(args.out).expanduser()):
        print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return evaluate_command(args) if args.command == "evaluate" else plot_command(args)
    except (FileNotFoundError, FileExistsError, ImportError, ValueError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
