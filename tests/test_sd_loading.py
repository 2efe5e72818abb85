"""Loading pipeline parts: the tiny pipeline through the local-directory path, incomplete directories,
hub ids offline, and the tiny-pipeline cache."""

from __future__ import annotations

import shutil

import pytest
import torch
from test_sd_common import build_tiny_task, tiny_config

from fastnabla.mdp.schedule import SD15_SCHEDULER_CONFIG, build_mdp
from fastnabla.tasks.sd.loading import load_components, looks_like_hub_id, missing_pipeline_files, with_variant
from fastnabla.tasks.sd.tiny import TINY_MARKER, build_tiny_components, tiny_pipeline_dir

# Stable Diffusion 1.5's scheduler/scheduler_config.json as shipped (a PNDM config).
SD15_SHIPPED_SCHEDULER = """{
  "_class_name": "PNDMScheduler",
  "_diffusers_version": "0.6.0",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "num_train_timesteps": 1000,
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "steps_offset": 1,
  "trained_betas": null,
  "clip_sample": false
}
"""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_pipeline_dir(tmp_path_factory.mktemp("tiny") / "pipeline", seed=0)


@pytest.fixture
def copy_of(tiny_dir, tmp_path):
    def make():
        dst = tmp_path / "copy"
        shutil.copytree(tiny_dir, dst)
        return dst

    return make


def test_loaded_parts_equal_the_in_memory_build(tiny_dir):
    loaded = load_components(str(tiny_dir))
    built = build_tiny_components(seed=0)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(loaded, name).state_dict(), getattr(built, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert not any(p.requires_grad for p in getattr(loaded, name).parameters())
    ids = lambda tok: tok("a photo of a cat", padding="max_length", max_length=77).input_ids  # noqa: E731
    assert ids(loaded.tokenizer) == ids(built.tokenizer)
    assert build_mdp(loaded.scheduler_config, 50).timesteps.equal(build_mdp(built.scheduler_config, 50).timesteps)
    assert loaded.vae_scale_factor == 4 and loaded.text_width == 32


def test_loading_in_bf16(tiny_dir):
    parts = load_components(str(tiny_dir), dtype=torch.bfloat16)
    assert {p.dtype for m in (parts.unet, parts.vae, parts.text_encoder) for p in m.parameters()} == {torch.bfloat16}


REQUIRED = [
    pytest.param("model_index.json", "model_index.json", id="model_index"),
    pytest.param("unet/config.json", "unet/config.json", id="unet-config"),
    pytest.param("unet/diffusion_pytorch_model.safetensors", "unet/ weights", id="unet-weights"),
    pytest.param("vae/config.json", "vae/config.json", id="vae-config"),
    pytest.param("vae/diffusion_pytorch_model.safetensors", "vae/ weights", id="vae-weights"),
    pytest.param("text_encoder/config.json", "text_encoder/config.json", id="text-encoder-config"),
    pytest.param("text_encoder/model.safetensors", "text_encoder/ weights", id="text-encoder-weights"),
    pytest.param("scheduler/scheduler_config.json", "scheduler/scheduler_config.json", id="scheduler"),
]


@pytest.mark.parametrize("relpath,named", REQUIRED)
def test_missing_file_is_named(copy_of, relpath, named):
    root = copy_of()
    (root / relpath).unlink()
    assert any(named in m for m in missing_pipeline_files(root))
    with pytest.raises(FileNotFoundError, match="sd.model.*incomplete") as err:
        load_components(str(root))
    assert named in str(err.value)


def test_tokenizer_files(copy_of):
    root = copy_of()
    prompt = "a red fox, jumping"
    fast = load_components(str(root)).tokenizer(prompt, padding="max_length", max_length=77).input_ids
    (root / "tokenizer" / "tokenizer.json").unlink()  # vocab.json + merges.txt must load the same tokenizer
    assert missing_pipeline_files(root) == []
    slow = load_components(str(root)).tokenizer(prompt, padding="max_length", max_length=77).input_ids
    assert slow == fast and len(set(slow)) > 3
    (root / "tokenizer" / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer/ files.*missing merges.txt"):
        load_components(str(root))


def test_all_missing_files_are_listed_at_once(tmp_path):
    (tmp_path / "empty").mkdir()
    missing = missing_pipeline_files(tmp_path / "empty")
    assert len(missing) == 9  # model_index, 3 configs, 3 weights, tokenizer, scheduler
    with pytest.raises(FileNotFoundError) as err:
        load_components(str(tmp_path / "empty"))
    for item in ("model_index.json", "unet/config.json", "vae/ weights", "tokenizer/", "scheduler/"):
        assert item in str(err.value)


def test_variant_weights(copy_of):
    root = copy_of()
    assert any("variant 'fp16'" in m for m in missing_pipeline_files(root, variant="fp16"))
    weights = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
               "text_encoder": "model.safetensors"}
    for folder, name in weights.items():
        (root / folder / name).rename(root / folder / with_variant(name, "fp16"))
    assert missing_pipeline_files(root, variant="fp16") == []
    assert load_components(str(root), variant="fp16").unet is not None
    assert with_variant("diffusion_pytorch_model.safetensors.index.json", "fp16") == (
        "diffusion_pytorch_model.safetensors.index.fp16.json"
    )


def test_nonexistent_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="sd.model=.*no such model directory"):
        load_components(str(tmp_path / "not-here"))
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        load_components("./models/sd15")


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
def test_hub_id_offline_names_the_setting(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"sd.model='fastnabla-test/no-such-model'.*HF_HUB_OFFLINE.*local pipeline"):
        load_components("fastnabla-test/no-such-model")


def test_hub_id_syntax():
    assert looks_like_hub_id("stable-diffusion-v1-5/stable-diffusion-v1-5") and looks_like_hub_id("gpt2")
    assert not looks_like_hub_id("./sd15") and not looks_like_hub_id("/models/sd15") and not looks_like_hub_id("a/b/c")


def test_real_sd15_scheduler_config_gives_the_reference_mdp(copy_of):
    root = copy_of()
    (root / "scheduler" / "scheduler_config.json").write_text(SD15_SHIPPED_SCHEDULER)
    for sampler in ("ddim", "ddpm"):
        task = build_tiny_task(tiny_config(model=str(root), num_steps=50, sampler=sampler))
        ref = build_mdp(SD15_SCHEDULER_CONFIG, 50, sampler, 1.0)
        assert task.mdp.timesteps.equal(ref.timesteps) and task.mdp.timesteps[[0, -1]].tolist() == [981, 1]
        for name in ("alpha_bar", "alpha_bar_next", "a", "b", "sigma"):
            assert torch.equal(getattr(task.mdp, name), getattr(ref, name)), (sampler, name)


def test_tiny_cache_is_written_once_and_reused(tmp_path):
    cache = tmp_path / "cache"
    assert tiny_pipeline_dir(cache, seed=3) == cache and (cache / TINY_MARKER).is_file()
    stamp = (cache / "unet" / "config.json").stat().st_mtime_ns
    tiny_pipeline_dir(cache, seed=3)
    assert (cache / "unet" / "config.json").stat().st_mtime_ns == stamp
    tiny_pipeline_dir(cache, seed=4)  # another seed: rebuilt in place
    w3 = build_tiny_components(seed=3).unet.conv_in.weight
    assert not torch.equal(load_components(str(cache)).unet.conv_in.weight, w3)
    assert not list(tmp_path.glob(".cache.*")), "temporary directories left behind"


def test_tiny_cache_never_overwrites_other_directories(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="sd.tiny_cache_dir.*not a tiny-pipeline cache"):
        tiny_pipeline_dir(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_task_from_tiny_cache_dir_matches_in_memory(tmp_path):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    step = torch.tensor([0, 3])
    cached = build_tiny_task(tiny_config(tiny_cache_dir=str(tmp_path / "tiny")))
    memory = build_tiny_task(tiny_config())
    assert cached.mdp.timesteps.equal(memory.mdp.timesteps)
    cond_a, cond_b = cached.conditions_for(["cat", "dog"]), memory.conditions_for(["cat", "dog"])
    assert torch.equal(cond_a["prompt_embeds"], cond_b["prompt_embeds"])
    with torch.no_grad():
        assert torch.equal(cached.policy_eps(x, step, cond_a), memory.policy_eps(x, step, cond_b))
