"""``--init-lora PATH`` / ``sd.lora.init``: a policy started from an exported diffusers LoRA samples what the LoRA's
own policy sampled (and what diffusers' pipeline with ``load_lora_weights`` samples), a different alpha is rescaled
exactly, mismatches are refused naming the settings that fit, and a run started from a LoRA reproduces it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_sd_common import build_tiny_task, perturb_lora, tiny_config
from test_sd_lora_export import diffusers_images

from fastnabla import train
from fastnabla.tasks.sd.lora import LORA_WEIGHTS_FILE, read_lora_file
from fastnabla.tasks.sd.sampling import sample_images
from fastnabla.tasks.sd.tiny import tiny_pipeline_dir

PROMPTS, SEEDS, STEPS = ["cat", "a red fox on the grass"], [3, 4], 5
FAST = ["--preset", "tiny-sd", "sd.num_steps=4", "train.batch_size=4", "train.sample_batch_size=2",
        "train.micro_batch_size=2", "train.fl_batch_size=4", "train.transition_fraction=0.5", "optim.lr_policy=0.05",
        "sd.prompts.eval_seeds=[0]", "sd.prompts.eval_prompts=['a photo of a cat']", "output.progress=false",
        "output.report_to=[]"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_pipeline_dir(tmp_path_factory.mktemp("tiny") / "pipeline", seed=0)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_dir):
    """A policy with random LoRA weights (rank 4, alpha 8) and its export."""
    cfg = tiny_config(tiny_cache_dir=str(tiny_dir), num_steps=STEPS)
    cfg.lora.rank, cfg.lora.alpha = 4, 8.0
    task = build_tiny_task(cfg)
    perturb_lora(task, std=0.3)
    return task, task.export_lora(tmp_path_factory.mktemp("lora") / "lora")


def _started_from(path, tiny_dir, rank: int = 4, alpha: float = 8.0, targets=None):
    cfg = tiny_config(tiny_cache_dir=str(tiny_dir), num_steps=STEPS)
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.init = rank, alpha, str(path)
    if targets is not None:
        cfg.lora.target_modules = targets
    return build_tiny_task(cfg)


@pytest.mark.filterwarnings("ignore:No LoRA keys associated to CLIPTextModel")
@pytest.mark.parametrize("alpha", [pytest.param(8.0, id="same-alpha"), pytest.param(2.0, id="other-alpha")])
def test_started_policy_samples_what_the_lora_samples(exported, tiny_dir, alpha):
    task, lora_dir = exported
    started = _started_from(lora_dir, tiny_dir, alpha=alpha)
    ours = sample_images(started, PROMPTS, SEEDS)
    torch.testing.assert_close(ours, sample_images(task, PROMPTS, SEEDS), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours, diffusers_images(tiny_dir, lora_dir, "ddim"), rtol=0, atol=5e-5)
    # the pretrained model (adapters off) is still the base model, not the LoRA
    assert torch.equal(sample_images(started, PROMPTS, SEEDS, use_pretrained=True),
                       sample_images(task, PROMPTS, SEEDS, use_pretrained=True))


def test_the_file_is_described_as_written(exported):
    _, lora_dir = exported
    info = read_lora_file(lora_dir)
    assert (info.rank, info.alpha, info.alpha_source) == (4, 8.0, "adapter metadata")
    assert info.target_modules == ["to_k", "to_out.0", "to_q", "to_v"]
    assert read_lora_file(lora_dir / LORA_WEIGHTS_FILE).state.keys() == info.state.keys()


@pytest.mark.parametrize(("change", "message"), [
    pytest.param({"rank": 2}, "has rank 4, sd.lora.rank is 2; set sd.lora.rank=4", id="rank"),
    pytest.param({"targets": ["to_q", "to_v"]}, "adapts other modules", id="target-modules"),
])
def test_mismatched_settings_are_refused_with_the_fix(exported, tiny_dir, change, message):
    with pytest.raises(ValueError, match=message) as err:
        _started_from(exported[1], tiny_dir, **change)
    assert "sd.lora.target_modules=[to_k,to_out.0,to_q,to_v]" in str(err.value)


@pytest.mark.parametrize("case", ["missing", "pickle", "text-encoder"])
def test_unusable_files_are_refused(exported, tmp_path, case):
    if case == "missing":
        path, message = tmp_path / "nothing", "no such file"
    elif case == "pickle":
        path, message = tmp_path / "lora.bin", "only .safetensors"
        path.write_bytes(b"x")
    else:
        state = load_file(exported[1] / LORA_WEIGHTS_FILE)
        state["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32)
        path, message = tmp_path / LORA_WEIGHTS_FILE, "text-encoder LoRA"
        save_file(state, str(path))
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        read_lora_file(path)


def test_a_run_started_from_an_exported_lora_reproduces_it(tmp_path, capsys):
    first = tmp_path / "first"
    assert train.main([*FAST, "train.iterations=2", "--out", str(first)]) == 0
    trained = json.loads((first / "metrics.json").read_text())
    assert trained["eval_log_reward"] != trained["eval_log_reward_pretrained"]  # the LoRA changed the samples
    # one iteration only samples: the final policy is the initial one
    second = tmp_path / "second"
    assert train.main([*FAST, "train.iterations=1", "--init-lora", str(first / "lora"), "--out", str(second)]) == 0
    started = json.loads((second / "metrics.json").read_text())
    assert started["eval_log_reward"] == pytest.approx(trained["eval_log_reward"], abs=1e-6)
    assert started["eval_log_reward_pretrained"] == trained["eval_log_reward_pretrained"]
    assert started["reward_mean_first"] != trained["reward_mean_first"]  # sampled by the LoRA, not the base model
    assert f"init: {first / 'lora'}" in (second / "config.yaml").read_text()
    assert train.main(["--resume", str(second), "--init-lora", str(first / "lora")]) == 2
    assert "--resume takes the run's own config.yaml" in capsys.readouterr().err
