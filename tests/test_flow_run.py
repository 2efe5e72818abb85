"""``python -m fastnabla.train --preset tiny-sd3 | tiny-flux`` end to end on a CPU: the trained LoRA loads into
diffusers' StableDiffusion3Pipeline / FluxPipeline and samples what the trained policy samples; nabla-GFlowNet and
baselines train on both families; the sd35-* / flux-* presets' settings and their errors without weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import train_stopped_during_iteration_2
from test_flow_task_common import build_tiny_flow_task, flow_pipeline, pipeline_run, tiny_flow_config

from fastnabla import train
from fastnabla.tasks.flow.tiny import tiny_pipeline_dir
from fastnabla.tasks.sd.lora import LORA_WEIGHTS_FILE
from fastnabla.tasks.sd.sampling import sample_images

PROMPTS, SEEDS = ["cat", "a red fox on the grass"], [3, 4]
pytestmark = pytest.mark.filterwarnings("ignore:No LoRA keys associated to CLIPTextModel")


def fast(family: str) -> list[str]:
    """tiny-sd3 / tiny-flux made smaller: 4 steps, 4 trajectories, one evaluation prompt and seed."""
    return [
        "--preset", f"tiny-{family}", "flow.num_steps=4", "train.batch_size=4", "train.sample_batch_size=2",
        "train.micro_batch_size=2", "train.fl_batch_size=4", "train.transition_fraction=0.5",
        "flow.prompts.eval_seeds=[0]", "flow.prompts.eval_prompts=['a photo of a cat']", "output.progress=false",
        "output.report_to=[]",
    ]


@pytest.fixture(scope="module")
def pipeline_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-flow")
    return {f: tiny_pipeline_dir(root / f, f, 0) for f in ("sd3", "flux")}


def _final_task_state(run_dir: Path) -> dict:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return torch.load(run_dir / "checkpoints" / latest / "rank0.pt", weights_only=True)["task"]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_trained_lora_loads_into_the_pipeline_and_samples_the_trained_policy(tmp_path, pipeline_dirs, family,
                                                                             capsys):
    """The run's LoRA in the pipeline, sampled with the pipeline's Euler ODE, equals the trained policy (the final
    checkpoint's LoRA in our task) sampled with our SDE at noise level 0 from the same seeds (atol 2e-5 on [0, 1]
    images); the pretrained samples equal the bare pipeline's."""
    out = tmp_path / "run"
    assert train.main([*fast(family), "--out", str(out), "train.iterations=4", "optim.lr_policy=0.01"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["iterations"] == 4 and m["passes_per_transition"]["transformer_backward"] > 0
    assert (out / "samples" / "pretrained.png").is_file() and (out / "lora" / LORA_WEIGHTS_FILE).is_file()
    assert "transformer passes per trained transition" in capsys.readouterr().out

    cfg = tiny_flow_config(family, num_steps=4, noise_level=0.0, tiny_cache_dir=str(pipeline_dirs[family]))
    task = build_tiny_flow_task(cfg)
    task.load_trainable_state_dict(_final_task_state(out))
    ours = sample_images(task, PROMPTS, SEEDS)
    pretrained = sample_images(task, PROMPTS, SEEDS, use_pretrained=True)
    theirs, _ = pipeline_run(flow_pipeline(pipeline_dirs[family], family, out / "lora"), family, PROMPTS, SEEDS, 4)
    base, _ = pipeline_run(flow_pipeline(pipeline_dirs[family], family), family, PROMPTS, SEEDS, 4)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5)
    torch.testing.assert_close(pretrained, base, rtol=0, atol=2e-5)
    assert (ours - pretrained).abs().max() > 1e-3  # training moved the policy by far more than the tolerance


METHOD_CASES = [
    pytest.param("sd3", "residual-db", id="sd3-residual-db"),
    pytest.param("flux", "residual-db", id="flux-residual-db"),
    pytest.param("sd3", "draft-k", id="sd3-draft-k"),
    pytest.param("flux", "ddpo", id="flux-ddpo"),
]


@pytest.mark.parametrize(("family", "method"), METHOD_CASES)
def test_baselines_train_on_the_flow_task(tmp_path, family, method):
    out = tmp_path / "run"
    argv = [*fast(family), "--method", method, "--out", str(out), "train.iterations=3", "optim.lr_policy=0.01",
            "output.export_lora=false", "output.figure=false"]
    assert train.main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["iterations"] == 3 and math.isfinite(m["reward_mean"]) and not m.get("diverged")
    state = _final_task_state(out)
    assert max(float(v.abs().max()) for k, v in state.items() if "lora_B" in k) > 0  # the policy was updated


def test_noise_level_zero_is_refused_for_density_methods_and_allowed_for_draft(tmp_path, capsys):
    assert train.main([*fast("sd3"), "flow.noise_level=0", "--out", str(tmp_path / "a")]) == 2
    assert "flow.noise_level=0" in capsys.readouterr().err and not (tmp_path / "a").exists()
    argv = [*fast("sd3"), "flow.noise_level=0", "--method", "draft-k", "--out", str(tmp_path / "b"),
            "train.iterations=2", "output.export_lora=false", "output.figure=false"]
    assert train.main(argv) == 0


def _value(tree, path):
    for part in path.split("."):
        tree = tree[part]
    return tree


def test_flow_presets_hold_their_provenance_table():
    from fastnabla.config.loader import build_config, to_dict
    from fastnabla.run.config import RunConfig
    from fastnabla.run.presets import (
        FLOW_FAMILY_PROVENANCE,
        FLOW_PROVENANCE,
        PRESETS,
        SD15_COST_PROVENANCE,
        SD_PROVENANCE,
        SD_REWARD_PROVENANCE,
        get_preset,
    )

    names = {"sd35-medium-aesthetic": "sd35", "flux-dev-aesthetic": "flux"}
    assert [n for n in PRESETS if n.startswith(("sd35-", "flux-"))] == list(names)
    sd15 = to_dict(build_config(RunConfig, get_preset("sd15-aesthetic")))
    for name, family in names.items():
        flat = to_dict(build_config(RunConfig, get_preset(name)))
        settings = {**FLOW_PROVENANCE, **FLOW_FAMILY_PROVENANCE[family]}
        for path, (expected, source, why) in settings.items():
            assert _value(flat, path) == expected and source in ("paper", "release", "ours", "Flow-GRPO's") and why
        # the method and training: the sd15 release settings (not SD15_COST_PROVENANCE's layout, measured for the
        # SD task's surrogate decoder only)
        for path, (value, _, _) in {**SD_PROVENANCE, **SD_REWARD_PROVENANCE["aesthetic"]}.items():
            if path.startswith("sd.") or path in settings:
                continue
            assert _value(flat, path) == value, path
            if path not in SD15_COST_PROVENANCE:
                assert _value(flat, path) == _value(sd15, path), path
        assert flat["flow"]["reward"]["name"] == "aesthetic"
    for family in ("sd3", "flux"):
        tiny = build_config(RunConfig, get_preset(f"tiny-{family}"))
        assert tiny.task == "flow" and tiny.flow.model == f"tiny-{family}" and tiny.train.device == "cpu"


def test_docs_flow_preset_table_is_the_code_table():
    from fastnabla.run.presets import flow_provenance_markdown

    docs = (Path(__file__).resolve().parents[1] / "docs" / "presets.md").read_text()
    assert flow_provenance_markdown() in docs, "regenerate with: python -m fastnabla.run.presets --markdown flow"


ERROR_CASES = [
    pytest.param("sd35-medium-aesthetic", lambda tmp, d: [],
                 ["stabilityai/stable-diffusion-3.5-medium", "HF_HUB_OFFLINE"], id="sd35-hub-offline"),
    pytest.param("flux-dev-aesthetic", lambda tmp, d: [],
                 ["black-forest-labs/FLUX.1-dev", "HF_HUB_OFFLINE"], id="flux-hub-offline"),
    pytest.param("flux-dev-aesthetic", lambda tmp, d: ["--model", str(tmp / "missing")],
                 ["flow.model=", "no such model directory"], id="missing"),
    pytest.param("flux-dev-aesthetic", lambda tmp, d: ["--model", str(d["sd3"])],
                 ["StableDiffusion3Pipeline", "flow.family='flux' needs a FluxPipeline"], id="sd3-directory"),
    pytest.param("sd35-medium-aesthetic", lambda tmp, d: ["--model", str(d["incomplete"])],
                 ["StableDiffusion3Pipeline directory is incomplete", "text_encoder_3/ weights", "tokenizer_3/"],
                 id="incomplete-sd3-directory"),
]


@pytest.mark.parametrize(("preset", "make_argv", "messages"), ERROR_CASES)
def test_flow_preset_without_weights_names_what_is_missing(tmp_path, monkeypatch, capsys, pipeline_dirs, preset,
                                                           make_argv, messages):
    """Exit 2, one line naming the model, before the reward's weights are looked for; nothing written."""
    import shutil

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    incomplete = tmp_path / "sd3"
    shutil.copytree(pipeline_dirs["sd3"], incomplete)
    shutil.rmtree(incomplete / "tokenizer_3")
    (incomplete / "text_encoder_3" / "model.safetensors").unlink()
    argv = make_argv(tmp_path, {**pipeline_dirs, "incomplete": incomplete})
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    capsys.readouterr()
    assert train.main(["--preset", preset, *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and "aesthetic" not in err.lower()
    for message in messages:
        assert message in err, (message, err)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_tiny_flux_stop_and_resume_matches_uninterrupted(tmp_path, monkeypatch):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    common = [*fast("flux"), "output.export_lora=false", "output.figure=false", "train.iterations=3"]
    assert train.main([*common, "--out", str(straight)]) == 0
    assert train_stopped_during_iteration_2(monkeypatch, [*common, "--out", str(stopped)]) == 130
    assert not (stopped / "metrics.json").exists()
    assert train.main(["--resume", str(stopped), "output.progress=false"]) == 0
    a, b = _final_task_state(stopped), _final_task_state(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k) > 0


def test_init_lora_on_a_flow_preset_is_refused_naming_the_field(tmp_path, capsys):
    assert train.main([*fast("sd3"), "--init-lora", str(tmp_path / "lora"), "--out", str(tmp_path / "o")]) == 2
    assert "flow.lora.init" in capsys.readouterr().err and not (tmp_path / "o").exists()
