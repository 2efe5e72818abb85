"""The digits pipeline build: data split and prompts, a standard diffusers directory that the SD loader (and
diffusers itself) loads, caching, determinism, classifier accuracy, the CLI."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
from digits_common import quick_build_classifier, quick_build_dir

from fastnabla.tasks.digits import data
from fastnabla.tasks.digits.build import (
    FORMAT,
    MARKER,
    PROMPTS_FILE,
    QUICK,
    build_pipeline,
    default_pipeline_dir,
    read_marker,
)
from fastnabla.tasks.digits.classifier import accuracy
from fastnabla.tasks.sd.loading import load_components, missing_pipeline_files


@pytest.fixture
def quick_dir():
    return quick_build_dir()


@pytest.fixture
def quick_classifier():
    return quick_build_classifier()


TINY = dataclasses.replace(QUICK, vae_steps=3, unet_steps=3, classifier_steps=3, unet_batch=8)


def test_split_is_a_fixed_stratified_partition():
    images, labels = data.load_raw_digits()
    train, test = data.split_indices(labels)
    assert len(images) == len(labels) == 1797
    assert sorted(train.tolist() + test.tolist()) == list(range(1797))
    for k in range(10):
        n_k, t_k = int((labels == k).sum()), int((labels[test] == k).sum())
        assert t_k == round(0.2 * n_k)
    again = data.split_indices(labels)
    assert (again[0] == train).all() and (again[1] == test).all()


def test_images_are_rgb_in_range_and_upsampled():
    split = data.load_split(16)
    assert split.train_images.shape[1:] == (3, 16, 16) and len(split.test_images) == 359
    assert float(split.train_images.min()) >= -1 and float(split.train_images.max()) <= 1
    assert torch.equal(split.train_images[:, 0], split.train_images[:, 2])
    with pytest.raises(ValueError, match="resolution"):
        data.load_split(4)


def test_each_digit_has_one_prompt_of_each_kind():
    table = data.prompts_by_class()
    for k, prompts in enumerate(table):
        assert len(prompts) == len(data.PROMPT_KINDS) == 4
        assert all(k in data.PROMPTS[p] for p in prompts)
        assert prompts[-1] == f"the digit {k}"
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat(50)
    drawn = data.draw_training_prompts(labels, 0.1, gen)
    assert all(p == "" or int(y) in data.PROMPTS[p] for p, y in zip(drawn, labels.tolist(), strict=True))
    assert 10 < sum(p == "" for p in drawn) < 90
    with pytest.raises(ValueError, match="kind_weights"):
        data.draw_training_prompts(labels, 0.1, gen, (1.0, 1.0))
    with pytest.raises(ValueError, match="known prompts"):
        data.prompt_classes("a cat")


def test_quick_build_loads_through_the_sd_loader(quick_dir):
    assert missing_pipeline_files(quick_dir) == []
    parts = load_components(str(quick_dir))
    assert type(parts.unet).__name__ == "UNet2DConditionModel" and type(parts.vae).__name__ == "AutoencoderKL"
    assert type(parts.text_encoder).__name__ == "CLIPTextModel" and len(parts.tokenizer) == 49408
    assert parts.vae_scale_factor == 4 and parts.unet.config.sample_size == 4
    assert parts.scheduler_config["beta_schedule"] == "scaled_linear" and parts.scheduler_config["steps_offset"] == 1
    assert not any(p.requires_grad for p in parts.unet.parameters())
    marker = read_marker(quick_dir)
    assert marker["format"] == FORMAT and marker["key"] == QUICK.key()
    assert abs(parts.vae.config.scaling_factor - marker["scaling_factor"]) < 1e-9
    assert (quick_dir / PROMPTS_FILE).read_text().splitlines() == list(data.PROMPTS)


def test_quick_build_runs_in_diffusers_own_pipeline(quick_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(quick_dir), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("the digit 3", height=16, width=16, num_inference_steps=3, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()


def test_quick_classifier_reaches_95_percent_held_out(quick_classifier):
    split = data.load_split(16)
    acc = accuracy(quick_classifier, split.test_images, split.test_labels)
    assert acc >= 0.95, f"held-out accuracy {acc:.4f}"


def test_second_call_returns_the_cache_at_once(quick_dir):
    t0 = time.perf_counter()
    assert build_pipeline(None, QUICK, progress=False) == quick_dir
    assert time.perf_counter() - t0 < 2.0
    assert quick_dir == default_pipeline_dir(QUICK)


def test_builds_are_deterministic(tmp_path):
    a = build_pipeline(tmp_path / "a", TINY, progress=False)
    b = build_pipeline(tmp_path / "b", TINY, progress=False)
    for rel in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors", "classifier.safetensors", "unet/config.json", "vae/config.json"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directories left


def test_foreign_directory_is_never_overwritten(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a digits pipeline"):
        build_pipeline(tmp_path, TINY, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / MARKER).exists()


def test_settings_change_the_cache_key():
    assert QUICK.key() != TINY.key() and QUICK.key() == dataclasses.replace(QUICK).key()
    assert QUICK.key().startswith(f"v{FORMAT}-")


def test_cli_build_prints_the_directory_last(quick_dir, capsys):
    from fastnabla.tasks.digits.__main__ import main

    assert main(["build", "--quick", "--no-progress"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith(str(quick_dir))
