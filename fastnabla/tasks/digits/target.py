"""The target ``p#(x) R(x)^beta`` of the digits yardstick, known through self-normalised importance weights.

``p#`` is the pretrained pipeline's sampler (DDIM ``eta``, ``num_steps``, CFG ``w`` on one prompt: the trainer's
reference sampler, :mod:`fastnabla.tasks.digits.sampling`). From ``N`` samples ``x_i ~ p#``::

    w_i = R(x_i)^beta / sum_j R(x_j)^beta = softmax(beta log R)_i,      ESS = 1 / sum_i w_i^2

and any expectation under the target is ``E[f] ~ sum_i w_i f(x_i)``: the class histogram (classifier argmax), the
mean ``log R``, feature statistics. ESS (between 1 and ``N``) says how many equally weighted samples the estimate is
worth; it falls as ``beta`` grows or as the reward favours what ``p#`` rarely draws. An importance-resampled set
(systematic resampling, ``M`` indices) stands in for samples of the target where a plain set is needed.

Pretrained samples (images, classifier logits and features) are cached per pipeline, prompt and sampler settings in
``<pipeline dir>/targets/``; targets are cheap on top of them (one reward pass) and cached there as JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fastnabla.tasks.digits.classifier import CLASSIFIER_FILE, load_classifier

Tensor = torch.Tensor
TARGETS_DIR = "targets"


def importance_weights(log_reward: Tensor, beta: float) -> Tensor:
    """Self-normalised weights ``softmax(beta * log R)`` ``[N]`` in float64 (``log R`` finite; ``beta >= 0``)."""
    log_r = torch.as_tensor(log_reward, dtype=torch.float64)
    if log_r.dim() != 1 or log_r.numel() == 0:
        raise ValueError(f"importance_weights: log_reward must be a non-empty 1-D tensor, got {tuple(log_r.shape)}")
    if not bool(torch.isfinite(log_r).all()):
        raise ValueError("importance_weights: log_reward has non-finite values")
    if not (beta >= 0 and torch.isfinite(torch.tensor(beta))):
        raise ValueError(f"importance_weights: beta must be finite and >= 0, got {beta}")
    return torch.softmax(beta * log_r, dim=0)


def effective_sample_size(weights: Tensor) -> float:
    """Kish's ``(sum w)^2 / sum w^2``: ``N`` for equal weights, 1 when one sample holds all the weight."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    if w.dim() != 1 or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError("effective_sample_size: weights must be a 1-D non-negative tensor, not all zero")
    return float(w.sum() ** 2 / (w**2).sum())


def systematic_resample(weights: Tensor, m: int, generator: torch.Generator | None = None) -> Tensor:
    """``m`` indices (int64) drawn by systematic resampling: index ``i`` appears ``floor(m w_i)`` or
    ``ceil(m w_i)`` times (the lowest-variance unbiased resampling)."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    if m < 1:
        raise ValueError(f"systematic_resample: m must be >= 1, got {m}")
    cdf = torch.cumsum(w / w.sum(), 0)
    cdf[-1] = 1.0
    u = (torch.rand((), generator=generator, dtype=torch.float64) + torch.arange(m, dtype=torch.float64)) / m
    return torch.searchsorted(cdf, u, right=True).clamp(max=len(w) - 1)


@dataclass
class PretrainedSamples:
    """Samples of the pretrained sampler: images ``[N, 3, H, W]`` in ``[0, 1]``, classifier logits ``[N, 10]`` and
    penultimate features ``[N, F]`` (fp32), and the settings that drew them."""

    images: Tensor
    logits: Tensor
    features: Tensor
    settings: dict

    @property
    def labels(self) -> Tensor:
        return self.logits.argmax(1)


@dataclass
class DigitsTarget:
    """The importance-weighted target: ``weights`` ``[N]`` over the pretrained samples, its ESS, class histogram
    ``[10]``, mean ``log R``, and ``resampled`` indices into the samples."""

    beta: float
    weights: Tensor
    ess: float
    histogram: Tensor
    mean_log_reward: float
    resampled: Tensor
    log_reward: Tensor

    def summary(self) -> dict:
        """JSON-ready numbers (no per-sample tensors)."""
        return {"beta": self.beta, "ess": self.ess, "num_samples": int(self.weights.numel()),
                "histogram": [round(v, 6) for v in self.histogram.tolist()], "mean_log_reward": self.mean_log_reward,
                "pretrained_mean_log_reward": float(self.log_reward.double().mean())}


def estimate_target(labels: Tensor, log_reward: Tensor, beta: float, num_resampled: int | None = None,
                    seed: int = 0, num_classes: int = 10) -> DigitsTarget:
    """The target from per-sample classifier ``labels`` and ``log R`` of pretrained samples (pure maths)."""
    from fastnabla.tasks.digits.metrics import class_histogram

    w = importance_weights(log_reward, beta)
    log_r = torch.as_tensor(log_reward, dtype=torch.float64)
    idx = systematic_resample(w, num_resampled or len(w), torch.Generator().manual_seed(seed))
    return DigitsTarget(float(beta), w, effective_sample_size(w), class_histogram(labels, num_classes, w),
                        float(w @ log_r), idx, log_r)


def _key(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@torch.no_grad()
def pretrained_samples(pipeline_dir: str | Path, prompt: str, n: int = 10_000, guidance_scale: float = 5.0,
                       num_steps: int = 50, eta: float = 1.0, seed: int = 0, batch_size: int = 500,
                       progress: bool = True, cache: bool = True) -> PretrainedSamples:
    """``n`` samples of the pipeline in ``pipeline_dir`` for ``prompt`` with their classifier outputs, cached in
    ``<pipeline_dir>/targets/samples-<key>.safetensors`` (``cache=False``: neither read nor written)."""
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    from fastnabla.tasks.digits.build import read_marker
    from fastnabla.tasks.digits.sampling import sample_pretrained
    from fastnabla.tasks.sd.loading import load_components

    pipeline_dir = Path(pipeline_dir)
    marker = read_marker(pipeline_dir) or {}
    settings = {"pipeline": marker.get("key", str(pipeline_dir.resolve())), "prompt": prompt, "n": int(n),
                "guidance_scale": float(guidance_scale), "num_steps": int(num_steps), "eta": float(eta),
                "seed": int(seed), "batch_size": int(batch_size)}
    path = pipeline_dir / TARGETS_DIR / f"samples-{_key(settings)}.safetensors"
    if cache and path.is_file():
        t = load_file(str(path))
        return PretrainedSamples(t["images"], t["logits"], t["features"], settings)
    parts = load_components(str(pipeline_dir), field_name="pipeline_dir")
    with tqdm(total=n, desc=f"sampling {prompt!r}", unit="img", disable=not progress) as bar:
        images = sample_pretrained(parts, prompt, n, guidance_scale, num_steps, eta, seed, batch_size,
                                   progress=bar.update)
    classifier = load_classifier(pipeline_dir / CLASSIFIER_FILE)
    outs = [classifier.logits_and_features(images[i : i + 1000]) for i in range(0, n, 1000)]
    samples = PretrainedSamples(images, torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]), settings)
    if cache:
        tensors = {"images": images.contiguous(), "logits": samples.logits.contiguous(),
                   "features": samples.features.contiguous()}
        _atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"settings": json.dumps(settings)}))
    return samples


@torch.no_grad()
def reward_log_values(reward, images: Tensor, prompt: str, chunk: int = 1000) -> Tensor:
    """``log R`` ``[N]`` (float64) of ``images`` under a :class:`~fastnabla.rewards.base.Reward`, in chunks."""
    return torch.cat([reward.log_reward(images[i : i + chunk], [prompt] * len(images[i : i + chunk])).double()
                      for i in range(0, len(images), chunk)])


def digits_target(pipeline_dir: str | Path, prompt: str, beta: float, reward: str = "digits-class",
                  reward_options: dict | None = None, n: int = 10_000, guidance_scale: float = 5.0,
                  num_steps: int = 50, eta: float = 1.0, seed: int = 0, progress: bool = True,
                  cache: bool = True) -> tuple[DigitsTarget, PretrainedSamples]:
    """The target of ``reward`` (a registered reward name with ``reward_options``, default transform) at
    ``beta`` for the pipeline's sampler on ``prompt``, with the pretrained samples it is built on.

    The reward's classifier defaults to the pipeline's own (``classifier=<pipeline_dir>``). The summary is also
    written to ``<pipeline_dir>/targets/target-<key>.json``.
    """
    from fastnabla.rewards.registry import build_reward

    options = {"classifier": str(pipeline_dir), **(reward_options or {})}
    samples = pretrained_samples(pipeline_dir, prompt, n, guidance_scale, num_steps, eta, seed, progress=progress,
                                 cache=cache)
    log_r = reward_log_values(build_reward(reward, **options), samples.images, prompt)
    target = estimate_target(samples.labels, log_r, beta, seed=seed)
    if cache:
        meta = {"samples": samples.settings, "reward": reward, "options": options, "beta": float(beta)}
        path = Path(pipeline_dir) / TARGETS_DIR / f"target-{_key(meta)}.json"
        text = json.dumps({**meta, **target.summary()}, indent=2)
        _atomic_write(path, lambda p: p.write_text(text))
    return target, samples
