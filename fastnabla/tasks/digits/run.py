"""What a training run on a ``digits`` pipeline adds to the Stable Diffusion run
(:class:`~fastnabla.tasks.sd.run.SDRun`): documented model and prompt values, and the yardstick's evaluation at the end.

The driver (:func:`fastnabla.run.driver.build_task_run`) uses :class:`DigitsRun` for an ``sd`` run whose ``sd.model``
is a digits pipeline (a directory holding ``fastnabla_digits.json``) or one of the values of :data:`DIGITS_MODELS`;
every other SD run is untouched. Before the task is built (so ``config.yaml`` records what was used):

* ``sd.model=digits`` / ``digits-quick``: the full / quick build in the default cache
  (:func:`fastnabla.tasks.digits.build.default_pipeline_dir`), built first when missing (~6 / ~1 CPU-minutes, once;
  what and why is printed, with a progress bar);
* ``sd.prompts.source=digits:PROMPT``: the one prompt ``PROMPT`` (one of the pipeline's 15,
  :data:`fastnabla.tasks.digits.data.PROMPTS`), written to a one-line prompt file in the digits cache;
* a ``digits-class`` / ``digits-value`` reward without a ``classifier`` option scores with the pipeline's own;
* ``sd.fl_surrogate_decoder=digits``: the pipeline's distilled surrogate decoder
  (:func:`fastnabla.tasks.digits.surrogate.build_surrogate`), distilled first when missing (~2.5 CPU-minutes).

**Evaluation** (after the last iteration; written to ``metrics.json`` under ``digits``). The target is
``p#(x) R(x)^beta`` with the run's own reward (transform included) and ``method.beta``, known through self-normalised
importance weights over ``eval.final_num_samples`` pretrained samples drawn with the run's sampler settings
(:mod:`fastnabla.tasks.digits.target`; cached in ``<pipeline>/targets/``). ``eval.num_samples`` images are drawn
from the fine-tuned policy (fixed seeds, :func:`fastnabla.tasks.sd.sampling.sample_images`) and as many from the
pretrained sampler (an independent, cached set), and each set is compared with the target
(:func:`fastnabla.tasks.digits.metrics.compare_to_target`): mean log R against ``E_target[log R]``, class-histogram
TV, per-class diversity and its ratio to the target's, Frechet distance in classifier features. The target needs
one prompt and the DDIM sampler, as :func:`fastnabla.tasks.digits.sampling.sample_pretrained` draws it; other runs
are trained as usual and their ``digits`` entry says why they were not evaluated.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fastnabla.tasks.digits.build import FULL, MARKER, QUICK, BuildSettings, build_pipeline, default_pipeline_dir
from fastnabla.tasks.digits.data import PROMPTS
from fastnabla.tasks.sd.run import SDRun

if TYPE_CHECKING:
    from fastnabla.run.config import RunConfig
    from fastnabla.training.distributed import DistContext

Tensor = torch.Tensor
DIGITS_MODELS: dict[str, BuildSettings] = {"digits": FULL, "digits-quick": QUICK}
DIGITS_REWARDS = ("digits-class", "digits-value")
PROMPT_PREFIX = "digits:"
SAMPLES_FILE = "digits_samples.safetensors"  # the first SAVED_SAMPLES evaluation images (figures, compare)
SAVED_SAMPLES = 64
EVAL_SEED = 10_000_000  # policy sample i uses seed EVAL_SEED + i (training draws keyed by seed/iteration differ)
PRETRAINED_EVAL_SEED = 1  # the pretrained comparison set (the target's samples use seed 0)
BATCH = 250


def is_digits_model(model: str) -> bool:
    """``sd.model`` names a digits pipeline: a value of :data:`DIGITS_MODELS` or a directory with the marker."""
    return model in DIGITS_MODELS or (Path(model).expanduser() / MARKER).is_file()


def resolve_digits_model(model: str, progress: bool = True) -> str:
    """The pipeline directory of ``sd.model``: a :data:`DIGITS_MODELS` value is built into the default cache when
    missing (said on stderr first); a directory is returned as given."""
    if model not in DIGITS_MODELS:
        return model
    settings = DIGITS_MODELS[model]
    directory = default_pipeline_dir(settings)
    if not (directory / MARKER).is_file():
        import sys

        minutes = "~6" if settings == FULL else "~1"
        print(f"sd.model={model}: the digits pipeline is not built yet; building it once into {directory} "
              f"({minutes} CPU-minutes: classifier, VAE and UNet trained on scikit-learn's digits; later runs load "
              "it at once; `python -m fastnabla.tasks.digits build` does the same)", file=sys.stderr)
        build_pipeline(None, settings, progress=progress)
    return str(directory)


def prompt_file(source: str) -> str:
    """``digits:PROMPT`` -> a one-line prompt file in the digits cache (other sources are returned unchanged)."""
    if not source.startswith(PROMPT_PREFIX):
        return source
    from fastnabla.rewards.digits_classifier import default_cache_root
    from fastnabla.tasks.digits.target import _atomic_write, _key

    prompt = source[len(PROMPT_PREFIX):]
    if prompt not in PROMPTS:
        raise ValueError(f"sd.prompts.source={source!r}: the digits pipeline knows the prompts "
                         f"{', '.join(map(repr, PROMPTS))}")
    path = default_cache_root() / "prompts" / f"{_key({'prompt': prompt})}.txt"
    if not path.is_file():
        _atomic_write(path, lambda p: p.write_text(prompt + "\n"))
    return str(path)


def prepare_digits_config(cfg: RunConfig, progress: bool = True) -> None:
    """Resolve the documented digits values of ``cfg.sd`` in place (see the module docstring)."""
    sd = cfg.sd
    sd.model = resolve_digits_model(sd.model, progress)
    sd.prompts.source = prompt_file(sd.prompts.source)
    if sd.prompts.eval_source:
        sd.prompts.eval_source = prompt_file(sd.prompts.eval_source)
    if sd.reward.name in DIGITS_REWARDS and "classifier" not in sd.reward.options:
        sd.reward.options = {**sd.reward.options, "classifier": sd.model}
    if sd.fl_surrogate_decoder == "digits":  # the distilled surrogate decoder (docs/cost.md), built on demand
        from fastnabla.tasks.digits.surrogate import build_surrogate

        sd.fl_surrogate_decoder = str(build_surrogate(sd.model, progress=progress))


def _finite_or_none(values) -> list[float | None]:
    """Per-class values for JSON: ``None`` where a class has too few samples to define one (NaN)."""
    out = [float(v) for v in (values.tolist() if isinstance(values, Tensor) else values)]
    return [v if v == v else None for v in out]


class DigitsRun(SDRun):
    """:class:`~fastnabla.tasks.sd.run.SDRun` on a digits pipeline, with the yardstick's evaluation at the end."""

    def __init__(self, cfg: RunConfig, dist: DistContext):
        prepare_digits_config(cfg, progress=cfg.output.progress)
        super().__init__(cfg, dist)
        self.pipeline_dir = Path(cfg.sd.model)
        self.target_info: dict[str, Any] | None = None

    # --- the target ----------------------------------------------------------------------------
    def _why_not(self) -> str | None:
        sd = self.cfg.sd
        if len(set(self.task.prompts)) != 1:
            return (f"the target is defined for one prompt; the run trains on {len(set(self.task.prompts))} "
                    f"(sd.prompts.source=digits:PROMPT sets one)")
        if sd.sampler != "ddim":
            return f"the target's sampler is DDIM; sd.sampler={sd.sampler!r}"
        if sd.resolution and sd.resolution != int(self.task.unet.config.sample_size) * 4:
            return f"sd.resolution={sd.resolution} is not the pipeline's native size"
        return None

    @torch.no_grad()
    def _target(self) -> dict[str, Any]:
        """Weighted pretrained samples of the run's sampler with the run's reward (cached samples; ~1 s after)."""
        from fastnabla.tasks.digits.target import estimate_target, pretrained_samples

        sd, e = self.cfg.sd, self.cfg.eval
        prompt = self.task.prompts[0]
        common = {"guidance_scale": sd.guidance_scale, "num_steps": sd.num_steps, "eta": sd.eta,
                  "progress": self.cfg.output.progress}
        base = pretrained_samples(self.pipeline_dir, prompt, e.final_num_samples, seed=0, **common)
        log_r = self._log_reward(base.images, prompt)
        target = estimate_target(base.labels, log_r, self.cfg.method.beta)
        other = pretrained_samples(self.pipeline_dir, prompt, e.num_samples, seed=PRETRAINED_EVAL_SEED, **common)
        return {"prompt": prompt, "samples": base, "target": target, "pretrained": other,
                "pretrained_log_r": self._log_reward(other.images, prompt)}

    def _log_reward(self, images: Tensor, prompt: str) -> Tensor:
        out = [self.task.log_reward(images[i : i + 1000].to(self.task.device), {"prompts": [prompt]}).double().cpu()
               for i in range(0, len(images), 1000)]
        return torch.cat(out)

    def _compare(self, labels: Tensor, features: Tensor, log_r: Tensor) -> dict[str, Any]:
        from fastnabla.tasks.digits.metrics import compare_to_target

        t = self.target_info
        base, target = t["samples"], t["target"]
        m = compare_to_target(labels, features, log_r, base.labels, base.features, target.log_reward, target.weights)
        keep = ("mean_log_reward", "class_tv", "diversity_ratio", "frechet", "histogram")
        return {**{k: m[k] for k in keep}, "diversity": _finite_or_none(m["diversity"])}

    def start(self, out_dir: Path, resume: bool, records: list[dict[str, Any]], trainer) -> None:
        """The SD run's pretrained grid, then the target and the pretrained comparison set (sampled once, cached:
        ~8 CPU-minutes for 10,000 samples the first time)."""
        super().start(out_dir, resume, records, trainer)
        self.prepare_evaluation()

    def prepare_evaluation(self) -> None:
        """Decide whether the run can be evaluated (``why_not``) and, if so, load the target and the pretrained
        comparison set; :meth:`evaluate_digits` needs it (the docs/digits/ scripts call it without training)."""
        self.why_not = self._why_not()
        if self.why_not is None:
            self.target_info = self._target()

    # --- the evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate_digits(self, out_dir: Path) -> dict[str, Any]:
        """``eval.num_samples`` policy samples against the target, beside the pretrained sampler's."""
        from safetensors.torch import save as safetensors_save

        from fastnabla.rewards.digits_classifier import CLASSIFIER_FILE, load_classifier
        from fastnabla.tasks.sd.image_grid import save_image_grid
        from fastnabla.tasks.sd.sampling import sample_images
        from fastnabla.utils.io import atomic_write

        if self.why_not is not None:
            return {"evaluated": False, "why": self.why_not}
        t0 = time.perf_counter()
        t, n = self.target_info, self.cfg.eval.num_samples
        prompt = t["prompt"]
        seeds = [EVAL_SEED + i for i in range(n)]
        images = sample_images(self.task, [prompt] * n, seeds, batch_size=BATCH).float()
        log_r = self._log_reward(images, prompt)
        classifier = load_classifier(self.pipeline_dir / CLASSIFIER_FILE).to(images.device)
        outs = [classifier.logits_and_features(images[i : i + 1000]) for i in range(0, n, 1000)]
        logits, features = torch.cat([o[0] for o in outs]).cpu(), torch.cat([o[1] for o in outs]).cpu()
        other = t["pretrained"]
        target = t["target"]
        result: dict[str, Any] = {
            "evaluated": True, "prompt": prompt, "beta": self.cfg.method.beta, "num_samples": n,
            "target": {"num_samples": int(target.weights.numel()), "ess": target.ess,
                       "mean_log_reward": target.mean_log_reward, "histogram": target.histogram.tolist()},
            "policy": self._compare(logits.argmax(1), features, log_r),
            "pretrained": self._compare(other.labels, other.features, t["pretrained_log_r"]),
        }
        from fastnabla.tasks.digits.metrics import class_tv_floor

        result["target"]["class_tv_floor"] = class_tv_floor(t["samples"].labels, target.weights, n)
        div_target = self._target_diversity()
        result["target"]["diversity"] = div_target
        result["seconds"] = time.perf_counter() - t0
        images = images.cpu()
        keep = images[:SAVED_SAMPLES].contiguous()
        atomic_write(out_dir / SAMPLES_FILE, lambda f: f.write(safetensors_save({"images": keep})))
        if self.cfg.output.figure:
            (out_dir / "samples").mkdir(exist_ok=True)
            zoomed = torch.nn.functional.interpolate(keep, scale_factor=4, mode="nearest")
            save_image_grid(zoomed, out_dir / "samples" / "digits-final.png", nrow=8)
        return result

    def _target_diversity(self) -> list[float]:
        from fastnabla.tasks.digits.metrics import per_class_diversity

        t = self.target_info
        return _finite_or_none(per_class_diversity(t["samples"].features, t["samples"].labels,
                                                   weights=t["target"].weights))

    def finish(self, out_dir: Path, records: list[dict[str, Any]], train_seconds: float) -> dict[str, Any]:
        summary = super().finish(out_dir, records, train_seconds)
        summary["digits"] = self.evaluate_digits(out_dir)
        return summary

    def summary(self, s: dict[str, Any], out_dir: Path) -> str:
        text = super().summary(s, out_dir)
        d = s.get("digits", {})
        if not d.get("evaluated"):
            return text + f"\ndigits evaluation skipped: {d.get('why', '?')}"
        p, q, t = d["policy"], d["pretrained"], d["target"]
        f = t.get("class_tv_floor")  # absent from runs evaluated before it existed
        floor = f" (an exact sampler: {f['mean']:.3f}, 95 % below {f['p95']:.3f})" if f else ""
        lines = [f"digits ({d['num_samples']} samples; target: beta {d['beta']:g}, ESS {t['ess']:.0f} of "
                 f"{t['num_samples']}):",
                 f"  mean log R  {q['mean_log_reward']:.3f} (pretrained) -> {p['mean_log_reward']:.3f} "
                 f"(target {t['mean_log_reward']:.3f})",
                 f"  class TV    {q['class_tv']:.3f} -> {p['class_tv']:.3f}{floor}",
                 f"  diversity   {q['diversity_ratio']:.3f} -> {p['diversity_ratio']:.3f} of the target's",
                 f"  Frechet     {q['frechet']:.1f} -> {p['frechet']:.1f}"]
        return text + "\n" + "\n".join(lines)

