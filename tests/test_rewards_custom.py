"""Custom rewards by import path (``sd.reward.name: module:factory``): the three factory return forms give the
scores of the function they wrap, every broken contract is refused at start-up with an error naming it, and a run
takes the reward from the command line and from YAML (and refuses a broken one before writing anything)."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from fastnabla import train
from fastnabla.eval import cli
from fastnabla.rewards import RewardCheckError, build_reward, check_reward
from fastnabla.rewards.custom import load_factory
from fastnabla.run.driver import NEEDS_REWARD_GRADIENT

MODULE = "fastnabla_test_custom_rewards"
SOURCE = '''
import torch
from torch import nn

from fastnabla.rewards.base import RewardModel


def mean_distance(images, prompts, target=0.4):
    return -((images.mean(dim=(1, 2, 3)) - target) ** 2)


def plain(target=0.4):
    """A plain callable."""
    return lambda images, prompts: mean_distance(images, prompts, target)


class Scorer(nn.Module):
    """An object with score(): an nn.Module with a buffer (moved to the task's device)."""

    def __init__(self, target):
        super().__init__()
        self.register_buffer("target", torch.tensor(float(target)))

    def score(self, images, prompts):
        return mean_distance(images, prompts, self.target)


def scorer(target=0.4):
    return Scorer(target)


class Model(RewardModel):
    name = "my-model"

    def score(self, images, prompts):
        return mean_distance(images, prompts)


def model():
    return Model()


def column(target=0.4):
    return lambda images, prompts: mean_distance(images, prompts, target)[:, None]


def integers():
    return lambda images, prompts: (images.mean(dim=(1, 2, 3)) * 100).long()


def non_finite():
    return lambda images, prompts: images.mean(dim=(1, 2, 3)) / 0.0


def detached():
    return lambda images, prompts: mean_distance(images, prompts).detach()


def numpy_scores():
    return lambda images, prompts: images.mean(dim=(1, 2, 3)).detach().numpy()


def raises():
    def f(images, prompts):
        raise RuntimeError("boom")
    return f


def needs_option(path):
    return plain()


def broken_factory():
    raise OSError("weights not found")


NOT_CALLABLE = 3
'''
# tiny-sd made smaller still (as tests/test_train_sd_run.py)
FAST = ["--preset", "tiny-sd", "sd.num_steps=4", "train.iterations=2", "train.batch_size=4",
        "train.sample_batch_size=2", "train.micro_batch_size=2", "train.fl_batch_size=4",
        "train.transition_fraction=0.5", "sd.prompts.eval_seeds=[0]", "sd.prompts.eval_prompts=['a photo of a cat']",
        "output.progress=false", "output.report_to=[]", "output.figure=false", "output.export_lora=false"]


@pytest.fixture
def module(tmp_path, monkeypatch):
    (tmp_path / f"{MODULE}.py").write_text(SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield MODULE


def _reference(images: torch.Tensor, target: float) -> torch.Tensor:
    return -((images.mean(dim=(1, 2, 3)) - target) ** 2)


@pytest.mark.parametrize("factory", ["plain", "scorer", "model"])
def test_every_return_form_scores_like_the_function(module, factory):
    options = {} if factory == "model" else {"target": 0.3}
    target = 0.4 if factory == "model" else 0.3
    reward = build_reward(f"{module}:{factory}", **options)
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(reward.log_reward(images, ["a"] * 3), _reference(images, target), atol=1e-7)
    check_reward(reward, 16, needs_gradient=True)  # valid for every method
    if factory == "scorer":
        assert [n for n, _ in reward.named_buffers()] == ["model.inner.target"]  # moves with .to(device)


@pytest.mark.parametrize(("spec", "message"), [
    pytest.param("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'", id="missing-module"),
    pytest.param(f"{MODULE}:nope", f"module '{MODULE}' has no attribute 'nope'", id="missing-attribute"),
    pytest.param(f"{MODULE}:NOT_CALLABLE", "is a int, not a callable factory", id="not-callable"),
    pytest.param(f"{MODULE}:broken_factory", "the factory raised OSError: weights not found", id="factory-raises"),
    pytest.param(f"{MODULE}:needs_option", r"does not take the options \[\]", id="missing-option"),
])
def test_loading_errors_name_the_problem(module, spec, message):
    with pytest.raises(ValueError, match=message):
        build_reward(spec)


def test_unknown_names_point_at_import_paths():
    with pytest.raises(ValueError, match="or an import path 'package.module:factory'"):
        build_reward("not-a-reward")
    with pytest.raises(ValueError, match="looks like 'package.module:factory'"):
        load_factory("just_a_module")


@pytest.mark.parametrize(("factory", "needs_gradient", "message"), [
    pytest.param("column", False, r"returned shape \(2, 1\) for 2 images", id="shape-B1"),
    pytest.param("integers", False, "dtype torch.int64", id="integer-dtype"),
    pytest.param("non_finite", False, "non-finite scores", id="non-finite"),
    pytest.param("numpy_scores", False, "returned a ndarray", id="not-a-tensor"),
    pytest.param("raises", False, "raised RuntimeError: boom", id="raises"),
    pytest.param("detached", True, "not differentiable w.r.t. the images", id="detached-for-a-gradient-method"),
])
def test_broken_rewards_are_refused_with_a_clear_error(module, factory, needs_gradient, message):
    reward = build_reward(f"{module}:{factory}")
    with pytest.raises(RewardCheckError, match=message):
        check_reward(reward, 16, needs_gradient=needs_gradient)


def test_a_detached_reward_is_fine_for_the_value_only_methods(module):
    check_reward(build_reward(f"{module}:detached"), 16, needs_gradient=False)
    assert set(NEEDS_REWARD_GRADIENT) == {"nabla-gfn", "refl", "draft-k", "draft-lv"}


def test_a_run_takes_the_reward_from_the_command_line_and_from_yaml(module, tmp_path):
    out = tmp_path / "cli"
    assert train.main([*FAST, f"sd.reward.name={module}:plain", "sd.reward.transform=auto",
                       "sd.reward.options={target: 0.3}", "--out", str(out)]) == 0
    cli_metrics = json.loads((out / "metrics.json").read_text())
    config = tmp_path / "run.yaml"
    config.write_text(textwrap.dedent(f"""\
        sd:
          reward:
            name: "{module}:plain"
            transform: auto
            options: {{target: 0.3}}
        """))
    out = tmp_path / "yaml"
    assert train.main([*FAST, "--config", str(config), "--out", str(out)]) == 0
    yaml_metrics = json.loads((out / "metrics.json").read_text())
    assert cli_metrics["eval_log_reward_pretrained"] == yaml_metrics["eval_log_reward_pretrained"]
    assert cli_metrics["eval_log_reward_pretrained"] < 0  # -(mean - 0.3)^2: the custom reward, not colour-target
    # fastnabla-eval rebuilds the custom reward from the run's config: the same grid, the same pretrained log R
    evaluated = tmp_path / "eval"
    assert cli.main(["evaluate", str(tmp_path / "cli"), "--out", str(evaluated), "--metrics", "reward",
                     "--no-progress", "--no-plots"]) == 0
    results = json.loads((evaluated / "results.json").read_text())
    assert results["pretrained"][0]["metrics"]["log_reward_mean"] == pytest.approx(
        cli_metrics["eval_log_reward_pretrained"], rel=1e-5)
    assert results["pretrained"][0]["reward"] == f"{module}:plain"


def test_a_broken_reward_stops_the_run_before_it_writes(module, tmp_path, capsys):
    out = tmp_path / "run"
    rc = train.main([*FAST, f"sd.reward.name={module}:detached", "sd.reward.transform=auto", "--out", str(out)])
    assert rc == 2 and not out.exists()
    assert "not differentiable w.r.t. the images" in capsys.readouterr().err
    # the same reward with a method that uses reward values only
    assert train.main([*FAST, f"sd.reward.name={module}:detached", "sd.reward.transform=auto", "--method", "ddpo",
                       "--out", str(out)]) == 0
