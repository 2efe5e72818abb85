"""Loading SDXL pipelines: family detection from model_index.json, the files an SDXL directory needs, unsupported
pipeline classes, sd.family, the VAE's dtype (force_upcast under fp16) and a replacement VAE (sd.vae)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_sd_common import tiny_config
from test_sdxl_common import build_tiny_sdxl_task, tiny_sdxl_config

from fastnabla.tasks.sd.loading import load_components, missing_pipeline_files, pipeline_family, vae_dtype_for
from fastnabla.tasks.sd.tiny import build_tiny_sdxl_components, tiny_pipeline_dir


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory):
    return tiny_pipeline_dir(tmp_path_factory.mktemp("tiny-sdxl") / "pipeline", seed=0, family="sdxl")


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return tiny_pipeline_dir(tmp_path_factory.mktemp("tiny-sd") / "pipeline", seed=0)


@pytest.fixture
def copy_of(xl_dir, tmp_path):
    def make():
        dst = tmp_path / "copy"
        shutil.copytree(xl_dir, dst)
        return dst

    return make


def _set_index(root, **changes):
    path = root / "model_index.json"
    index = json.loads(path.read_text())
    index.update(changes)
    path.write_text(json.dumps(index))


def test_loaded_parts_equal_the_in_memory_build(xl_dir):
    loaded = load_components(str(xl_dir))
    built = build_tiny_sdxl_components(seed=0)
    assert loaded.family == built.family == "sdxl" and pipeline_family(xl_dir) == "sdxl"
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(loaded, name).state_dict(), getattr(built, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        assert not any(p.requires_grad for p in getattr(loaded, name).parameters())
    for name in ("tokenizer", "tokenizer_2"):
        ids = [getattr(parts, name)("a photo of a cat", padding="max_length", max_length=77).input_ids
               for parts in (loaded, built)]
        assert ids[0] == ids[1], name
    assert type(loaded.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert loaded.text_width == 80 and loaded.pooled_width == 24 and loaded.force_zeros_for_empty_prompt
    assert loaded.scheduler_config["_class_name"] == "EulerDiscreteScheduler"


REQUIRED = [
    pytest.param("text_encoder_2/config.json", "text_encoder_2/config.json", id="text-encoder-2-config"),
    pytest.param("text_encoder_2/model.safetensors", "text_encoder_2/ weights", id="text-encoder-2-weights"),
    pytest.param("tokenizer_2", "tokenizer_2/ files", id="tokenizer-2"),
    pytest.param("model_index.json", "model_index.json", id="model-index"),
    pytest.param("unet/config.json", "unet/config.json", id="unet-config"),
]


@pytest.mark.parametrize(("relpath", "named"), REQUIRED)
def test_missing_file_is_named(copy_of, relpath, named):
    root = copy_of()
    target = root / relpath
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    assert pipeline_family(root) == "sdxl"  # without model_index.json: text_encoder_2/ decides
    assert any(named in m for m in missing_pipeline_files(root))
    with pytest.raises(FileNotFoundError, match="sd.model.*SDXL pipeline directory is incomplete") as err:
        load_components(str(root))
    assert named in str(err.value)


UNSUPPORTED = [
    pytest.param({"_class_name": "StableDiffusion3Pipeline"}, "'StableDiffusion3Pipeline'", id="sd3"),
    pytest.param({"_class_name": "FluxPipeline"}, "'FluxPipeline'", id="flux"),
    pytest.param({"_class_name": "StableDiffusionXLImg2ImgPipeline"}, "refiner", id="refiner-class"),
    pytest.param({"text_encoder": [None, None]}, "without text_encoder", id="refiner-components"),
]


@pytest.mark.parametrize(("changes", "message"), UNSUPPORTED)
def test_unsupported_pipelines_are_named(copy_of, changes, message):
    root = copy_of()
    _set_index(root, **changes)
    with pytest.raises(ValueError, match=message):
        load_components(str(root))


def test_required_family_is_checked(xl_dir, sd_dir):
    with pytest.raises(ValueError, match="sd.family='sd' but .* is an SDXL pipeline"):
        load_components(str(xl_dir), family="sd")
    with pytest.raises(ValueError, match="sd.family='sdxl' but .* is a Stable Diffusion 1.x / 2.x pipeline"):
        load_components(str(sd_dir), family="sdxl")
    assert load_components(str(sd_dir), family="sd").family == "sd"
    with pytest.raises(ValueError, match="sd.family: 'sd' does not match sd.model='tiny-sdxl'"):
        tiny_sdxl_config(family="sd").validate()
    with pytest.raises(ValueError, match="sd.family: 'sdxl' does not match sd.model='tiny'"):
        tiny_config(family="sdxl").validate()


VAE_DTYPES = [
    # (frozen dtype, force_upcast in the VAE config, family, the VAE's dtype)
    pytest.param(torch.float16, True, "sdxl", torch.float32, id="sdxl-fp16-upcast"),
    pytest.param(torch.float16, None, "sdxl", torch.float32, id="sdxl-fp16-absent-means-upcast"),
    pytest.param(torch.float16, False, "sdxl", torch.float16, id="sdxl-fp16-fix-vae"),
    pytest.param(torch.bfloat16, True, "sdxl", torch.bfloat16, id="sdxl-bf16"),
    pytest.param(torch.float32, True, "sdxl", torch.float32, id="sdxl-fp32"),
    pytest.param(torch.float16, True, "sd", torch.float16, id="sd-never-upcasts"),
]


@pytest.mark.parametrize(("dtype", "force", "family", "expected"), VAE_DTYPES)
def test_vae_dtype(dtype, force, family, expected):
    config = {} if force is None else {"force_upcast": force}
    assert vae_dtype_for(dtype, config, family) == expected


def test_fp16_loading_keeps_the_sdxl_vae_in_fp32_and_the_fp16_fix_vae_in_fp16(xl_dir, tmp_path):
    parts = load_components(str(xl_dir), dtype=torch.float16)
    assert parts.unet.conv_in.weight.dtype == torch.float16 and parts.text_encoder_2.dtype == torch.float16
    assert parts.vae.dtype == torch.float32
    memory = build_tiny_sdxl_components(dtype=torch.float16)  # the in-memory tiny pipeline follows the same rule
    assert memory.vae.dtype == torch.float32 and memory.unet.dtype == torch.float16
    fixed = tmp_path / "vae-fp16-fix"
    vae = build_tiny_sdxl_components(seed=3).vae
    vae.register_to_config(force_upcast=False)
    vae.save_pretrained(fixed)
    parts = load_components(str(xl_dir), dtype=torch.float16, vae=str(fixed))
    assert parts.vae.dtype == torch.float16
    a, b = parts.vae.state_dict(), vae.state_dict()
    assert all(torch.equal(a[k].float(), b[k].half().float()) for k in a)


def test_replacement_vae_decodes_and_a_bad_one_is_named(xl_dir, tmp_path):
    other = tmp_path / "vae"
    build_tiny_sdxl_components(seed=3).vae.save_pretrained(other)
    task = build_tiny_sdxl_task(tiny_sdxl_config(tiny_cache_dir=str(xl_dir), vae=str(other)))
    own = build_tiny_sdxl_task(tiny_sdxl_config(tiny_cache_dir=str(xl_dir)))
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert (task.decode(z) - own.decode(z)).abs().max() > 1e-3
    (other / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"sd.vae=.*missing: weights"):
        build_tiny_sdxl_task(tiny_sdxl_config(tiny_cache_dir=str(xl_dir), vae=str(other)))
    with pytest.raises(FileNotFoundError, match="no such VAE directory"):
        build_tiny_sdxl_task(tiny_sdxl_config(tiny_cache_dir=str(xl_dir), vae="./no/such/vae"))


def test_tiny_caches_of_both_families_are_distinct(tmp_path):
    cache = tmp_path / "cache"
    tiny_pipeline_dir(cache, seed=0, family="sdxl")
    assert pipeline_family(cache) == "sdxl"
    tiny_pipeline_dir(cache, seed=0)  # the SD pipeline of the same seed: rebuilt in place
    assert pipeline_family(cache) == "sd" and not (cache / "text_encoder_2").exists()
