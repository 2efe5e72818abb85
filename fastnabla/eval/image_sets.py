"""Sample a model on the evaluation prompts x seeds and summarise the images into metrics.

:func:`collect_image_set` samples every ``(prompt, seed)`` pair of an :class:`EvalPlan` with the task's sampler
(``fastnabla.tasks.sd.sampling.sample_images``: each image depends only on its pair, so the pretrained model and every
checkpoint see the same initial noise and step noise) and keeps, per image, the reward score (the run's reward with
the image's own prompt), ``log R``, and the features of the diversity and prior-following extractors -- the images
themselves are dropped batch by batch. For a weighted sum of rewards (``sd.reward.terms``) the score is the sum's
``log R = sum_i w_i log R_i`` and each term's ``log R`` is kept as well (``log_reward_terms``).

:func:`summarize_image_set` turns that into the metrics record written to JSON: reward mean/std over all images,
and per prompt the reward statistics (:mod:`~fastnabla.eval.reward_stats`), the diversity of the prompt's images
(:mod:`~fastnabla.eval.diversity`) and the Frechet distance between the prompt's images and the pretrained model's
images of the same prompt (:mod:`~fastnabla.eval.frechet`); diversity and distance are then averaged over prompts
(the paper's per-prompt FID, section 4). Each record carries ``diversity_kind`` / ``fid_kind``
(:mod:`~fastnabla.eval.labels`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fastnabla.eval.diversity import feature_variance, mean_pairwise_cosine_distance
from fastnabla.eval.extractor import ImageFeatureExtractor
from fastnabla.eval.frechet import frechet_distance_from_features
from fastnabla.eval.labels import DIVERSITY_LABELS, FID_LABELS, diversity_kind, fid_kind
from fastnabla.eval.reward_stats import reward_statistics
from fastnabla.rewards.combined import concat_terms, record_terms
from fastnabla.tasks.sd.sampling import sample_images

Tensor = torch.Tensor


@dataclass
class EvalPlan:
    """The evaluation prompts and seeds (every prompt is sampled with every seed) and the sampling batch size."""

    prompts: list[str]
    seeds: list[int]
    batch_size: int = 16

    def __post_init__(self):
        self.prompts = list(dict.fromkeys(self.prompts))  # a repeated prompt would merge two image sets
        self.seeds = [int(s) for s in self.seeds]
        if not self.prompts or not all(isinstance(p, str) for p in self.prompts):
            raise ValueError(f"evaluation prompts must be a non-empty list of strings, got {self.prompts!r}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ValueError(f"evaluation seeds must be distinct integers >= 0, got {self.seeds}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")

    @property
    def images_per_prompt(self) -> int:
        return len(self.seeds)

    def pairs(self) -> tuple[list[str], list[int]]:
        """Every ``(prompt, seed)`` pair, prompt-major: prompt ``i`` owns rows ``i n .. (i + 1) n - 1``."""
        return [p for p in self.prompts for _ in self.seeds], [s for _ in self.prompts for s in self.seeds]

    def to_dict(self) -> dict[str, Any]:
        return {"prompts": self.prompts, "seeds": self.seeds, "images_per_prompt": self.images_per_prompt,
                "batch_size": self.batch_size}


@dataclass
class MetricExtractors:
    """The feature extractors of the diversity and prior-following metrics (None: that metric is off)."""

    diversity: ImageFeatureExtractor | None = None
    fid: ImageFeatureExtractor | None = None

    def __post_init__(self):
        self.diversity_kind = diversity_kind(self.diversity) if self.diversity is not None else None
        self.fid_kind = fid_kind(self.fid) if self.fid is not None else None

    def describe(self) -> dict[str, Any]:
        """What the diversity and prior-following numbers are (kind, label, extractor weights), for the JSON."""
        out: dict[str, Any] = {"diversity": None, "prior": None}
        if self.diversity is not None:
            out["diversity"] = {"kind": self.diversity_kind, "label": DIVERSITY_LABELS[self.diversity_kind],
                                "extractor": self.diversity.description}
        if self.fid is not None:
            out["prior"] = {"kind": self.fid_kind, "label": FID_LABELS[self.fid_kind],
                            "extractor": self.fid.description}
        return out


@dataclass
class ImageSet:
    """Per prompt (plan order): reward scores ``[n]``, ``log R`` ``[n]``, diversity and FID features ``[n, D]``."""

    scores: dict[str, Tensor] = field(default_factory=dict)
    log_rewards: dict[str, Tensor] = field(default_factory=dict)
    diversity: dict[str, Tensor] = field(default_factory=dict)
    fid: dict[str, Tensor] = field(default_factory=dict)
    terms: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # a weighted sum: label -> prompt -> log R_i


def _split(rows: list[Tensor], prompts: list[str], n: int) -> dict[str, Tensor]:
    if not rows:
        return {}
    stacked = torch.cat(rows)
    return {p: stacked[i * n : (i + 1) * n] for i, p in enumerate(prompts)}


@torch.no_grad()
def collect_image_set(task, plan: EvalPlan, extractors: MetricExtractors, use_pretrained: bool = False,
                      progress=None) -> ImageSet:
    """Sample ``task`` (its policy, or the pretrained model when ``use_pretrained``) on ``plan`` and keep rewards and
    features per prompt (CPU). ``progress``: a tqdm bar advanced by the number of images of each batch."""
    prompts, seeds = plan.pairs()
    rows: dict[str, list[Tensor]] = {"scores": [], "log_rewards": [], "diversity": [], "fid": []}
    terms: dict[str, list[Tensor]] = {}
    for start in range(0, len(prompts), plan.batch_size):
        batch_prompts, batch_seeds = prompts[start : start + plan.batch_size], seeds[start : start + plan.batch_size]
        images = sample_images(task, batch_prompts, batch_seeds, use_pretrained=use_pretrained)  # [b, 3, H, W]
        with record_terms(task.reward) as recorded:
            score = task.reward.score(images, batch_prompts)  # [b] fp32
        for label, values in concat_terms(recorded).items():
            terms.setdefault(label, []).append(values)
        rows["scores"].append(score.cpu())
        rows["log_rewards"].append(task.reward.transform(score).cpu())
        if extractors.diversity is not None:
            rows["diversity"].append(extractors.diversity(images).cpu())
        if extractors.fid is not None:
            rows["fid"].append(extractors.fid(images).cpu())
        if progress is not None:
            progress.update(len(batch_prompts))
    n = plan.images_per_prompt
    return ImageSet(**{k: _split(v, plan.prompts, n) for k, v in rows.items()},
                    terms={label: _split(v, plan.prompts, n) for label, v in terms.items()})


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def summarize_image_set(images: ImageSet, reference: ImageSet | None, extractors: MetricExtractors) -> dict[str, Any]:
    """The metrics record of ``images`` (module docstring); ``reference``: the pretrained model's image set of the
    same plan (the Frechet distance is left out without it)."""
    prompts = list(images.scores)
    per_prompt: dict[str, dict[str, float]] = {}
    for p in prompts:
        reward, log_reward = reward_statistics(images.scores[p]), reward_statistics(images.log_rewards[p])
        record = {"reward_mean": reward["mean"], "reward_std": reward["std"],
                  "log_reward_mean": log_reward["mean"], "log_reward_std": log_reward["std"]}
        if images.diversity:
            record["diversity_pairwise_distance"] = mean_pairwise_cosine_distance(images.diversity[p])
            record["diversity_feature_variance"] = feature_variance(images.diversity[p])
        if images.fid and reference is not None:
            record["frechet_distance"] = frechet_distance_from_features(images.fid[p], reference.fid[p])
        if images.terms:
            record["log_reward_terms"] = {label: reward_statistics(v[p])["mean"] for label, v in images.terms.items()}
        per_prompt[p] = record
    reward = reward_statistics(torch.cat([images.scores[p] for p in prompts]))
    log_reward = reward_statistics(torch.cat([images.log_rewards[p] for p in prompts]))
    out: dict[str, Any] = {"images": reward["count"], "reward_mean": reward["mean"], "reward_std": reward["std"],
                           "log_reward_mean": log_reward["mean"], "log_reward_std": log_reward["std"]}
    if images.terms:
        out["log_reward_terms"] = {label: reward_statistics(torch.cat([v[p] for p in prompts]))["mean"]
                                   for label, v in images.terms.items()}
    if images.diversity:
        out["diversity_kind"] = extractors.diversity_kind
        for key in ("diversity_pairwise_distance", "diversity_feature_variance"):
            out[key] = _mean([per_prompt[p][key] for p in prompts])
    if images.fid and reference is not None:
        out["fid_kind"] = extractors.fid_kind
        out["frechet_distance"] = _mean([per_prompt[p]["frechet_distance"] for p in prompts])
    out["per_prompt"] = per_prompt
    return out
