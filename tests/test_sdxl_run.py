"""``python -m fastnabla.train --preset tiny-sdxl`` end to end on a CPU: the trained LoRA loads into diffusers'
StableDiffusionXLPipeline and samples what the trained policy samples; stop + --resume equals an uninterrupted run;
the LoRA export for DDIM / DDPM and non-square images; the sdxl-* presets' settings and their errors without
weights."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import train_stopped_during_iteration_2
from test_sd_common import perturb_lora
from test_sdxl_common import build_tiny_sdxl_task, pipeline_images, sdxl_pipeline, tiny_sdxl_config

from fastnabla import train
from fastnabla.tasks.sd.lora import LORA_WEIGHTS_FILE
from fastnabla.tasks.sd.sampling import sample_images
from fastnabla.tasks.sd.tiny import tiny_pipeline_dir

# tiny-sdxl made smaller: 4 denoising steps, 4 trajectories, one evaluation prompt and seed
FAST = [
    "--preset", "tiny-sdxl",
    "sd.num_steps=4",
    "train.batch_size=4",
    "train.sample_batch_size=2",
    "train.micro_batch_size=2",
    "train.fl_batch_size=4",
    "train.transition_fraction=0.5",
    "sd.prompts.eval_seeds=[0]",
    "sd.prompts.eval_prompts=['a photo of a cat']",
    "output.progress=false",
    "output.tensorboard=false",
]
PROMPTS, SEEDS = ["cat", "a red fox on the grass"], [3, 4]
pytestmark = pytest.mark.filterwarnings("ignore:No LoRA keys associated to CLIPTextModel")


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory):
    """The tiny SDXL pipeline of tiny-sdxl's seed, saved for diffusers."""
    return tiny_pipeline_dir(tmp_path_factory.mktemp("tiny-sdxl") / "pipeline", seed=0, family="sdxl")


def _final_task_state(run_dir) -> dict:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return torch.load(run_dir / "checkpoints" / latest / "rank0.pt", weights_only=True)["task"]


def test_trained_lora_loads_into_the_sdxl_pipeline_and_samples_the_trained_policy(tmp_path, xl_dir, capsys):
    out = tmp_path / "run"
    assert train.main([*FAST, "--out", str(out), "train.iterations=4", "optim.lr_policy=0.01"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["iterations"] == 4 and m["passes_per_transition"]["unet_backward"] > 0
    assert (out / "samples" / "pretrained.png").is_file() and (out / "lora" / LORA_WEIGHTS_FILE).is_file()
    assert "UNet passes per trained transition" in capsys.readouterr().out

    # the trained policy: the run's task (same seed, same weights) with the final checkpoint's LoRA and flow
    cfg = tiny_sdxl_config(tiny_cache_dir=str(xl_dir), num_steps=4)
    task = build_tiny_sdxl_task(cfg)
    task.load_trainable_state_dict(_final_task_state(out))
    ours = sample_images(task, PROMPTS, SEEDS)
    pretrained = sample_images(task, PROMPTS, SEEDS, use_pretrained=True)
    theirs = pipeline_images(sdxl_pipeline(xl_dir, lora_dir=out / "lora"), PROMPTS, SEEDS, 4)
    base = pipeline_images(sdxl_pipeline(xl_dir), PROMPTS, SEEDS, 4)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=5e-5)
    torch.testing.assert_close(pretrained, base, rtol=0, atol=5e-5)
    assert (ours - pretrained).abs().max() > 1e-3  # training moved the policy by far more than the tolerance


def test_tiny_sdxl_stop_and_resume_matches_uninterrupted(tmp_path, monkeypatch):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert train.main([*FAST, "--out", str(straight), "output.export_lora=false"]) == 0
    stopped_argv = [*FAST, "--out", str(stopped), "output.export_lora=false"]
    assert train_stopped_during_iteration_2(monkeypatch, stopped_argv) == 130
    assert not (stopped / "metrics.json").exists()
    assert train.main(["--resume", str(stopped), "output.progress=false"]) == 0
    a, b = _final_task_state(stopped), _final_task_state(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k) > 0


EXPORT_CASES = [
    pytest.param("ddim", {}, (2, 3, 32, 32), id="ddim"),
    pytest.param("ddpm", {}, (2, 3, 32, 32), id="ddpm"),
    pytest.param("ddim", {"height": 32, "width": 48}, (2, 3, 32, 48), id="ddim-non-square"),
]


@pytest.mark.parametrize(("sampler", "size", "shape"), EXPORT_CASES)
def test_exported_lora_samples_identically_in_the_pipeline(tmp_path, xl_dir, sampler, size, shape):
    cfg = tiny_sdxl_config(tiny_cache_dir=str(xl_dir), num_steps=5, sampler=sampler, **size)
    cfg.lora.rank, cfg.lora.alpha = 4, 8.0  # alpha != rank: the exported metadata must carry the scaling
    task = build_tiny_sdxl_task(cfg)
    # std 0.1, not SD's 0.3: with 0.3 x alpha/r = 2 the tiny SDXL UNet is so ill-conditioned that a 1e-6 rounding
    # difference in x_1 (another summation order) grows to 4e-3 in the image; 0.1 still moves the images by ~0.2
    perturb_lora(task, std=0.1)
    exported = task.export_lora(tmp_path / "lora")
    ours = sample_images(task, PROMPTS, SEEDS)
    theirs = pipeline_images(sdxl_pipeline(xl_dir, sampler, exported), PROMPTS, SEEDS, 5, **size)
    pretrained = sample_images(task, PROMPTS, SEEDS, use_pretrained=True)
    base = pipeline_images(sdxl_pipeline(xl_dir, sampler), PROMPTS, SEEDS, 5, **size)
    assert ours.shape == theirs.shape == shape
    torch.testing.assert_close(ours, theirs, rtol=0, atol=5e-5)
    torch.testing.assert_close(pretrained, base, rtol=0, atol=5e-5)
    assert (ours - pretrained).abs().max() > 2e-2


def test_sdxl_presets_hold_their_provenance_table():
    from fastnabla.config.loader import build_config, to_dict
    from fastnabla.run.config import RunConfig
    from fastnabla.run.presets import PRESETS, SD15_COST_PROVENANCE, SD_PROVENANCE, SDXL_PROVENANCE, get_preset

    names = [n for n in PRESETS if n.startswith("sdxl-")]
    assert names == ["sdxl-aesthetic", "sdxl-hpsv2"]
    for name in names:
        sd15 = to_dict(build_config(RunConfig, get_preset(name.replace("sdxl-", "sd15-"))))
        flat = to_dict(build_config(RunConfig, get_preset(name)))

        def value(tree, path):
            for part in path.split("."):
                tree = tree[part]
            return tree

        for path, (expected, source, why) in SDXL_PROVENANCE.items():
            assert value(flat, path) == expected and source in ("paper", "release", "ours") and why, path
        for path, (sd15_value, _, _) in SD_PROVENANCE.items():  # everything else is the sd15 release settings
            if path in SDXL_PROVENANCE:
                continue
            assert value(flat, path) == sd15_value, path
            if path not in SD15_COST_PROVENANCE:  # the sd15 presets' cost layout is not measured for SDXL
                assert value(flat, path) == value(sd15, path), path
    tiny = build_config(RunConfig, get_preset("tiny-sdxl"))
    assert tiny.sd.model == "tiny-sdxl" and tiny.train.device == "cpu"


@pytest.fixture
def sd_dir(tmp_path_factory):
    return tiny_pipeline_dir(tmp_path_factory.mktemp("tiny-sd") / "pipeline", seed=0)


ERROR_CASES = [
    pytest.param(lambda tmp, sd, xl: ["--model", str(tmp / "missing")], ["no such model directory"], id="missing"),
    pytest.param(lambda tmp, sd, xl: [], ["stabilityai/stable-diffusion-xl-base-1.0", "HF_HUB_OFFLINE"],
                 id="hub-offline"),
    pytest.param(lambda tmp, sd, xl: ["--model", str(sd)],
                 ["sd.family='sdxl'", "Stable Diffusion 1.x / 2.x pipeline"], id="sd-directory"),
    pytest.param(lambda tmp, sd, xl: ["--model", str(xl)], ["SDXL pipeline directory is incomplete",
                                                            "text_encoder_2/ weights", "tokenizer_2/"],
                 id="incomplete-sdxl-directory"),
]


@pytest.mark.parametrize(("make_argv", "messages"), ERROR_CASES)
def test_sdxl_preset_without_weights_names_what_is_missing(tmp_path, monkeypatch, capsys, sd_dir, xl_dir,
                                                           make_argv, messages):
    """Exit 2, one line naming the model, before the reward's weights are looked for; nothing written."""
    import shutil

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    incomplete = tmp_path / "xl"
    shutil.copytree(xl_dir, incomplete)
    shutil.rmtree(incomplete / "tokenizer_2")
    (incomplete / "text_encoder_2" / "model.safetensors").unlink()
    argv = make_argv(tmp_path, sd_dir, incomplete)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    capsys.readouterr()
    assert train.main(["--preset", "sdxl-aesthetic", *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and "aesthetic" not in err.lower()
    for message in messages:
        assert message in err, (message, err)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
