"""LoRA export: a diffusers StableDiffusionPipeline loads it and samples what our sampler samples."""

from __future__ import annotations

import pytest
import torch
from test_sd_common import build_tiny_task, perturb_lora, tiny_config

from fastnabla.tasks.sd.lora import LORA_WEIGHTS_FILE
from fastnabla.tasks.sd.sampling import sample_images
from fastnabla.tasks.sd.tiny import tiny_pipeline_dir

PROMPTS, SEEDS, STEPS = ["cat", "a red fox on the grass"], [3, 4], 5


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_pipeline_dir(tmp_path_factory.mktemp("tiny") / "pipeline", seed=0)


def diffusers_images(tiny_dir, lora_dir, sampler: str) -> torch.Tensor:
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir), safety_checker=None, requires_safety_checker=False)
    scheduler_cls = DDIMScheduler if sampler == "ddim" else DDPMScheduler
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipe.load_lora_weights(str(lora_dir))
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    out = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=5.0, eta=1.0, generator=generators,
               output_type="pt")
    return out.images.float()


@pytest.mark.filterwarnings("ignore:No LoRA keys associated to CLIPTextModel")
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_exported_lora_loads_into_a_diffusers_pipeline(tmp_path, tiny_dir, sampler):
    cfg = tiny_config(tiny_cache_dir=str(tiny_dir), num_steps=STEPS, sampler=sampler)
    cfg.lora.rank, cfg.lora.alpha = 4, 8.0  # alpha != rank: the exported metadata must carry the scaling
    task = build_tiny_task(cfg)
    perturb_lora(task, std=0.3)
    exported = task.export_lora(tmp_path / "lora")
    assert (exported / LORA_WEIGHTS_FILE).is_file()

    ours = sample_images(task, PROMPTS, SEEDS)
    theirs = diffusers_images(tiny_dir, exported, sampler)
    base = diffusers_images(tiny_dir, None, sampler)
    reference = sample_images(task, PROMPTS, SEEDS, use_pretrained=True)
    assert ours.shape == theirs.shape == (2, 3, 32, 32)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=5e-5)  # the same sampler, arithmetic in another order
    torch.testing.assert_close(reference, base, rtol=0, atol=5e-5)  # adapters off = the pipeline without LoRA
    assert (ours - reference).abs().max() > 2e-2


def test_export_is_atomic_and_replaces(tmp_path):
    task = build_tiny_task()
    perturb_lora(task, seed=1)
    first = task.export_lora(tmp_path / "lora")
    size_1 = (first / LORA_WEIGHTS_FILE).read_bytes()
    perturb_lora(task, seed=2)
    second = task.export_lora(tmp_path / "lora")
    assert second == first and (second / LORA_WEIGHTS_FILE).read_bytes() != size_1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"], "temporary directories left behind"
