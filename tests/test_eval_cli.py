"""``python -m fastnabla.eval`` end to end on a tiny-sd run trained here, with tiny random CLIP / Inception weights
written to temporary files (the loaders' real paths; nothing is downloaded)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fastnabla import train
from fastnabla.eval import cli
from fastnabla.eval.inception import build_inception
from fastnabla.rewards.aesthetic import random_clip_image_encoder
from fastnabla.rewards.analytic import ColorTargetReward
from fastnabla.rewards.tiny import TINY_CLIP_VISION

PROMPTS = ["a photo of a cat", "a red bird on a tree"]
# tiny-sd made smaller still (as tests/test_train_sd_run.py), a large LoRA learning rate so that one training epoch
# visibly moves the policy, and every checkpoint kept: step 1 (sampling only, the pretrained weights) and step 2
TRAIN = [
    "--preset", "tiny-sd", "sd.num_steps=4", "train.iterations=2", "train.batch_size=4", "train.sample_batch_size=2",
    "train.micro_batch_size=2", "train.fl_batch_size=4", "train.transition_fraction=0.5", "train.keep_checkpoints=5",
    "optim.lr_policy=0.05", "sd.prompts.eval_seeds=[0]", "sd.prompts.eval_prompts=['a photo of a cat']",
    "output.progress=false", "output.tensorboard=false", "output.figure=false", "output.export_lora=false",
]


@torch.no_grad()
def _calibrated_random_inception() -> dict[str, torch.Tensor]:
    """Random Inception-v3 weights whose batch-norm statistics are those of one batch of random images: with the
    default statistics (mean 0, variance 1) the 2048 pool features of a random network are ~1e-9 and constant."""
    model = build_inception().train()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # the running statistics become the batch's
    model(torch.rand(4, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    return model.state_dict()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    assert train.main([*TRAIN, "--out", str(root / "run")]) == 0
    random_clip_image_encoder(**TINY_CLIP_VISION).model.save_pretrained(root / "clip")
    torch.save(_calibrated_random_inception(), root / "pt_inception-2015-12-05-test.pth")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return {"root": root, "run": root / "run", "clip": root / "clip", "prompts": root / "prompts.txt",
            "inception": root / "pt_inception-2015-12-05-test.pth"}


def _evaluate(ws: dict[str, Path], out: Path, *extra: str) -> int:
    return cli.main(["evaluate", str(ws["run"]), "--out", str(out), "--clip", str(ws["clip"]), "--no-progress",
                     *extra])


def _error(capsys, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    return capsys.readouterr().err


def test_errors_name_the_file_or_flag(workspace, tmp_path, capsys):
    run, clip = str(workspace["run"]), str(workspace["clip"])
    bare = tmp_path / "bare"
    bare.mkdir()
    assert "does not exist" in _error(capsys, ["evaluate", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert f"{bare / 'config.yaml'} is missing" in _error(capsys, ["evaluate", str(bare), "--out", str(tmp_path)])
    (bare / "config.yaml").write_text((workspace["run"] / "config.yaml").read_text())
    assert "holds no complete checkpoint" in _error(capsys, ["evaluate", str(bare), "--out", str(tmp_path / "o")])
    err = _error(capsys, ["evaluate", run, "--out", str(tmp_path / "o"), "--clip", "nobody-here/no-clip",
                          "--images-per-prompt", "2"])
    assert "--clip" in err and "config.json" in err
    err = _error(capsys, ["evaluate", run, "--out", str(tmp_path / "o"), "--clip", clip, "--images-per-prompt", "2",
                          "--inception", str(tmp_path / "missing.pth")])
    assert f"--inception={tmp_path / 'missing.pth'}: no such file" in err
    assert "at least 2 images per prompt" in _error(capsys, ["evaluate", run, "--out", str(tmp_path / "o"),
                                                             "--clip", clip])
    assert "--dreamsim-type needs --dreamsim" in _error(capsys, ["evaluate", run, "--out", str(tmp_path / "o"),
                                                               "--dreamsim-type", "dino_vitb16"])
    assert "sd.reward.name" in _error(capsys, ["evaluate", run, "--out", str(tmp_path / "o"), "--clip", clip,
                                               "--set", "sd.reward.name=nonsense", "--images-per-prompt", "2"])
    assert not (tmp_path / "o" / "results.json").exists()


@pytest.fixture(scope="module")
def full_results(workspace) -> tuple[Path, dict]:
    """Every checkpoint, FID with the (random) FID-layout Inception, diversity on CLIP features; batches of 3 over
    2 prompts x 2 seeds, so one batch holds images of both prompts."""
    out = workspace["root"] / "full"
    rc = _evaluate(workspace, out, "--inception", str(workspace["inception"]), "--prompts", str(workspace["prompts"]),
                   "--images-per-prompt", "2", "--batch-size", "3", "--checkpoints", "all")
    assert rc == 0
    return out, json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def fallback_results(workspace) -> tuple[Path, dict]:
    out = workspace["root"] / "fallback"
    assert _evaluate(workspace, out, "--images-per-prompt", "2") == 0
    return out, json.loads((out / "results.json").read_text())


def test_results_per_run_checkpoint_and_prompt(full_results, workspace):
    out, results = full_results
    assert results["complete"] and results["settings"]["prompts"] == PROMPTS
    assert results["settings"]["seeds"] == [0, 1]
    assert results["metrics"]["diversity"]["kind"] == "clip-features"
    assert results["metrics"]["prior"]["kind"] == "inception-fid"
    (pretrained,) = results["pretrained"]
    (run,) = results["runs"]
    assert run["name"] == "run" and run["method"] == "nabla-gfn" and run["finished"] and pretrained["runs"] == ["run"]
    assert [(c["step"], c["final"]) for c in run["checkpoints"]] == [(1, False), (2, True)]
    for m in [pretrained["metrics"], *(c["metrics"] for c in run["checkpoints"])]:
        assert m["images"] == 4 and list(m["per_prompt"]) == PROMPTS
        assert (m["diversity_kind"], m["fid_kind"]) == ("clip-features", "inception-fid")
        per = m["per_prompt"].values()
        for key in ("diversity_pairwise_distance", "diversity_feature_variance", "frechet_distance"):
            assert m[key] == pytest.approx(sum(p[key] for p in per) / len(PROMPTS), rel=1e-12)
        assert m["reward_mean"] == pytest.approx(sum(p["reward_mean"] for p in per) / len(PROMPTS), rel=1e-12)
    assert json.loads((out / "runs" / "run.json").read_text())["run"] == run
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert pngs == ["diversity_over_training.png", "prior_distance_over_training.png", "reward_over_training.png",
                    "tradeoff_reward_diversity.png", "tradeoff_reward_prior_distance.png"]
    assert all((out / "plots" / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_checkpoint_metrics_follow_the_weights(full_results):
    """Step 1 holds the pretrained weights (LoRA B = 0): the same images, so the same reward and diversity and a zero
    Frechet distance; step 2 was trained: a positive distance to the pretrained images."""
    _, results = full_results
    pretrained = results["pretrained"][0]["metrics"]
    step1, step2 = (c["metrics"] for c in results["runs"][0]["checkpoints"])
    assert pretrained["frechet_distance"] <= 1e-6
    assert step1["reward_mean"] == pytest.approx(pretrained["reward_mean"], rel=1e-6)
    assert step1["diversity_feature_variance"] == pytest.approx(pretrained["diversity_feature_variance"], rel=1e-5)
    assert step1["frechet_distance"] <= 1e-6 * max(step2["frechet_distance"], 1e-12)
    assert step2["frechet_distance"] > 1e-4
    assert step2["reward_mean"] != pytest.approx(pretrained["reward_mean"], rel=1e-6)


def test_pretrained_reward_matches_a_direct_computation(full_results, workspace):
    """The pretrained per-prompt rewards against images sampled here and scored by a freshly built reward."""
    from fastnabla.config.loader import build_config
    from fastnabla.run.config import RunConfig
    from fastnabla.tasks.sd.build import build_sd_task
    from fastnabla.tasks.sd.sampling import sample_images

    _, results = full_results
    cfg = build_config(RunConfig, None, workspace["run"] / "config.yaml")
    task = build_sd_task(cfg.sd, "cpu", seed=cfg.seed)
    reward = ColorTargetReward()
    for prompt in PROMPTS:
        images = sample_images(task, [prompt] * 2, [0, 1], use_pretrained=True)
        scores = reward.score(images, [prompt] * 2).double()
        got = results["pretrained"][0]["metrics"]["per_prompt"][prompt]
        assert got["reward_mean"] == pytest.approx(float(scores.mean()), rel=1e-5)
        assert got["log_reward_mean"] == pytest.approx(float(scores.log().mean()), rel=1e-5)


def _keys(obj) -> set[str]:
    if isinstance(obj, dict):
        return set(obj) | {k for v in obj.values() for k in _keys(v)}
    if isinstance(obj, list):
        return {k for v in obj for k in _keys(v)}
    return set()


def test_fallbacks_are_labelled_and_never_named_as_the_real_metric(fallback_results):
    out, results = fallback_results
    assert results["metrics"]["diversity"]["kind"] == "clip-features"
    assert results["metrics"]["prior"]["kind"] == "clip-frechet"
    assert "not DreamSim" in results["metrics"]["diversity"]["label"]
    assert "not FID" in results["metrics"]["prior"]["label"]
    final = results["runs"][0]["checkpoints"][0]["metrics"]
    assert (final["diversity_kind"], final["fid_kind"]) == ("clip-features", "clip-frechet")
    named_like_real = {k for k in _keys(results) if ("fid" in k.lower() and k != "fid_kind") or "dreamsim" in k.lower()}
    assert not named_like_real
    assert not [p for p in (out / "plots").glob("*") if "fid" in p.name or "dreamsim" in p.name]
    assert [c["step"] for c in results["runs"][0]["checkpoints"]] == [2]  # --checkpoints final (default)


def test_metrics_subset(workspace, tmp_path):
    assert _evaluate(workspace, tmp_path / "out", "--metrics", "reward", "--no-plots") == 0
    m = json.loads((tmp_path / "out" / "results.json").read_text())
    assert m["metrics"] == {"diversity": None, "prior": None}
    final = m["runs"][0]["checkpoints"][0]["metrics"]
    assert "diversity_kind" not in final and "fid_kind" not in final and final["images"] == 1
    assert not (tmp_path / "out" / "plots").exists()


def test_finished_evaluation_is_not_overwritten_by_accident(fallback_results, workspace, capsys):
    out, _ = fallback_results
    argv = ["evaluate", str(workspace["run"]), "--out", str(out), "--images-per-prompt", "2"]
    assert "pass --overwrite" in _error(capsys, argv)


def test_interrupted_evaluation_never_looks_complete(workspace, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"complete": true}')  # a previous evaluation, being replaced
    from fastnabla.eval import driver

    real, calls = driver.collect_image_set, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(driver, "collect_image_set", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _evaluate(workspace, out, "--images-per-prompt", "2", "--overwrite")
    assert not (out / "results.json").exists() and not list((out / "runs").glob("*.json"))


def test_plot_merges_results_of_the_same_kinds(full_results, fallback_results, tmp_path, capsys):
    full_out, _ = full_results
    fallback_out, _ = fallback_results
    files = [str(full_out / "results.json"), str(full_out / "results.json")]
    assert cli.main(["plot", *files, "--out", str(tmp_path / "plots")]) == 0
    assert len(list((tmp_path / "plots").glob("*.png"))) == 5
    err = _error(capsys, ["plot", str(full_out / "results.json"), str(fallback_out / "results.json"), "--out",
                          str(tmp_path / "mixed")])
    assert "different kinds" in err


def _no_clip_in_the_hub_cache(monkeypatch, tmp_path) -> None:
    """An empty hub cache: the default CLIP tower (openai/clip-vit-large-patch14) cannot be found."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-home" / "hub"))


def test_reward_only_needs_no_clip_weights(workspace, tmp_path, monkeypatch):
    _no_clip_in_the_hub_cache(monkeypatch, tmp_path)
    out = tmp_path / "reward"
    argv = ["evaluate", str(workspace["run"]), "--out", str(out), "--metrics", "reward", "--no-progress"]
    assert cli.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["metrics"]["diversity"] is None and results["metrics"]["prior"] is None
    assert math.isfinite(results["runs"][0]["checkpoints"][0]["metrics"]["reward_mean"])


def test_pixel_space_fallback_needs_no_weights_and_says_so(workspace, tmp_path, monkeypatch, capsys):
    _no_clip_in_the_hub_cache(monkeypatch, tmp_path)
    out = tmp_path / "pixels"
    argv = ["evaluate", str(workspace["run"]), "--out", str(out), "--fallback-features", "pixels",
            "--images-per-prompt", "2", "--checkpoints", "all", "--no-progress"]
    assert cli.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert (results["metrics"]["diversity"]["kind"], results["metrics"]["prior"]["kind"]) == (
        "pixel-features", "pixel-frechet")
    pretrained = results["pretrained"][0]["metrics"]
    step1, step2 = (c["metrics"] for c in results["runs"][0]["checkpoints"])
    assert pretrained["frechet_distance"] <= 1e-6  # the pretrained images against themselves
    assert step1["frechet_distance"] <= 1e-6 < step2["frechet_distance"]  # step 1 holds the pretrained weights
    assert "--clip is for the CLIP fallback" in _error(capsys, [*argv[:-1], "--clip", str(workspace["clip"])])


def test_pixel_features_are_area_downsampled_pixels():
    from fastnabla.eval.pixel_features import PixelFeatures

    images = torch.rand(3, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    want = images.reshape(3, 3, 16, 2, 16, 3).mean(dim=(3, 5)).flatten(1)  # 2x3 blocks averaged, by hand
    torch.testing.assert_close(PixelFeatures()(images), want, rtol=1e-6, atol=1e-7)
