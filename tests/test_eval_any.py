"""``fastnabla-eval evaluate --model DIR [--lora PATH ...]``: any diffusers model directory, alone or with LoRAs
that fastnabla did not train (one made by diffusers/peft directly and saved by diffusers' ``save_lora_weights``),
scored as diffusers' own pipeline with ``load_lora_weights`` samples and the same weights loaded our way score."""

from __future__ import annotations

import json

import pytest
import torch

from fastnabla.eval import cli
from fastnabla.rewards.analytic import BrightnessReward
from fastnabla.tasks.sd.lora import LORA_WEIGHTS_FILE
from fastnabla.tasks.sd.tiny import tiny_pipeline_dir

PROMPTS = ["a photo of a cat", "a red bird on a tree"]
SEEDS, STEPS, RANK = [0, 1], 4, 4
TOL = 5e-6  # mean brightness of images that differ by < 5e-5 per pixel (tests/test_sd_lora_export.py)
PRESET = ["--preset", "tiny-sd", "--set", f"sd.num_steps={STEPS}", "--set", "sd.reward.name=brightness",
          "--metrics", "reward", "--images-per-prompt", str(len(SEEDS)), "--batch-size", "3", "--no-progress",
          "--no-plots"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("any")
    model = tiny_pipeline_dir(root / "model", seed=0)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return {"root": root, "model": model, "prompts": root / "prompts.txt", "lora": _peft_lora(model, root / "peer")}


def _peft_lora(model, directory):
    """A LoRA made the way diffusers' train_text_to_image_lora.py makes one: peft's LoraConfig added to the UNet,
    saved with ``save_lora_weights`` (no adapter metadata: alpha = rank), weights random so that it matters."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(str(model / "unet"))
    torch.manual_seed(0)  # peft draws lora_A from the global generator
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(str(directory), unet_lora_layers=state, safe_serialization=True)
    assert (directory / LORA_WEIGHTS_FILE).is_file()
    return directory


def _diffusers_scores(model, lora) -> torch.Tensor:
    """Brightness scores of diffusers' own pipeline (``load_lora_weights``), prompt-major as the evaluation."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    prompts = [p for p in PROMPTS for _ in SEEDS]
    generators = [torch.Generator().manual_seed(s) for _ in PROMPTS for s in SEEDS]
    images = pipe(prompts, num_inference_steps=STEPS, guidance_scale=5.0, eta=1.0, generator=generators,
                  output_type="pt").images.float()
    return BrightnessReward().score(images, prompts)


@pytest.fixture(scope="module")
def results(workspace):
    out = workspace["root"] / "eval"
    argv = ["evaluate", "--model", str(workspace["model"]), "--lora", str(workspace["lora"]),
            "--prompts", str(workspace["prompts"]), "--out", str(out), *PRESET]
    assert cli.main(argv) == 0
    return json.loads((out / "results.json").read_text())


@pytest.mark.filterwarnings("ignore:No LoRA keys associated to CLIPTextModel")
def test_a_peer_lora_scores_as_diffusers_samples_it(results, workspace):
    (run,) = results["runs"]
    assert run["kind"] == "lora" and run["name"] == "peer" and run["method"] is None
    (checkpoint,) = run["checkpoints"]
    ours = checkpoint["metrics"]["reward_mean"]
    theirs = float(_diffusers_scores(workspace["model"], workspace["lora"]).mean())
    # the same sampler with the arithmetic in another order: images within 5e-5 (tests/test_sd_lora_export.py)
    assert ours == pytest.approx(theirs, abs=TOL)
    (pretrained,) = results["pretrained"]
    base = float(_diffusers_scores(workspace["model"], None).mean())
    assert pretrained["metrics"]["reward_mean"] == pytest.approx(base, abs=TOL)
    assert abs(ours - pretrained["metrics"]["reward_mean"]) > 50 * TOL  # the LoRA changed the images


def test_the_same_weights_loaded_our_way_score_the_same(results, workspace):
    """The LoRA as a fastnabla task's initial policy (``sd.lora.init``), sampled by our sampler."""
    from fastnabla.config.loader import build_config
    from fastnabla.run.config import RunConfig
    from fastnabla.run.presets import get_preset
    from fastnabla.tasks.sd.build import build_sd_task
    from fastnabla.tasks.sd.sampling import sample_images

    cfg = build_config(RunConfig, get_preset("tiny-sd"), None, [
        f"sd.model={workspace['model']}", f"sd.num_steps={STEPS}", "sd.reward.name=brightness",
        f"sd.lora.rank={RANK}", f"sd.lora.alpha={RANK}", f"sd.lora.init={workspace['lora']}"])
    task = build_sd_task(cfg.sd, "cpu", seed=0)
    prompts, seeds = [p for p in PROMPTS for _ in SEEDS], [s for _ in PROMPTS for s in SEEDS]
    torch.set_num_threads(1)  # the evaluation's threads (tiny-sd: 1) and batches (3), so the same arithmetic
    images = torch.cat([sample_images(task, prompts[i:i + 3], seeds[i:i + 3]) for i in range(0, len(prompts), 3)])
    ours = float(BrightnessReward().score(images, prompts).mean())
    assert results["runs"][0]["checkpoints"][0]["metrics"]["reward_mean"] == pytest.approx(ours, abs=1e-7)


def test_the_model_alone(workspace):
    out = workspace["root"] / "alone"
    argv = ["evaluate", "--model", str(workspace["model"]), "--prompts", str(workspace["prompts"]), "--out", str(out),
            *PRESET]
    assert cli.main(argv) == 0
    alone = json.loads((out / "results.json").read_text())
    assert alone["runs"] == [] and len(alone["pretrained"]) == 1
    assert alone["pretrained"][0]["metrics"]["reward_mean"] == pytest.approx(
        float(_diffusers_scores(workspace["model"], None).mean()), abs=TOL)


@pytest.mark.parametrize(("argv", "message"), [
    pytest.param(["--lora", "x"], "--lora needs --model", id="lora-without-model"),
    pytest.param([], "needs run directories, or --model", id="nothing"),
    pytest.param(["--model", "tiny", "--lora", "/nonexistent/lora"], "no such file", id="missing-lora"),
])
def test_errors_name_the_flag(tmp_path, capsys, argv, message):
    assert cli.main(["evaluate", "--out", str(tmp_path / "o"), *argv, *PRESET]) == 2
    assert message in capsys.readouterr().err
