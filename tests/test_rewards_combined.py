"""A weighted sum of rewards (``sd.reward: [{name, weight}, ...]``): ``log R = sum_i w_i log R_i``, checked against
the terms computed one by one (values and pixel gradients), its config forms and errors, every method training on it
with each term logged, and the evaluation's per-term numbers."""

from __future__ import annotations

import math

import pytest
import torch

from fastnabla.config.loader import build_config
from fastnabla.methods.config import METHODS
from fastnabla.rewards import build_reward, build_reward_sum
from fastnabla.rewards.base import RewardTransform
from fastnabla.rewards.combined import record_terms
from fastnabla.run.config import RunConfig
from fastnabla.run.presets import get_preset

# two analytic terms with different transforms: brightness (log R = log score), colour target (log R = 3 (s - 0.1))
WEIGHTS = (0.7, 0.3)
SUM = ("sd.reward=[{name: brightness, weight: 0.7}, "
       "{name: color-target, weight: 0.3, transform: exp, scale: 3.0, shift: 0.1}]")
SD = ["sd.num_steps=4", "train.batch_size=4", "train.sample_batch_size=2", "train.micro_batch_size=2",
      "train.fl_batch_size=4", "train.transition_fraction=0.5", "method.db.flow_channels=[8,16]",
      "method.db.flow_hidden=16", "method.db.flow_layers=2"]


def _terms():
    return [("brightness", WEIGHTS[0], build_reward("brightness")),
            ("color-target", WEIGHTS[1], build_reward("color-target", RewardTransform("exp", 3.0, 0.1)))]


def _reference_log_r(images: torch.Tensor) -> torch.Tensor:
    """The same sum written out from the closed forms (an independent reference)."""
    x = images.float()
    bright = x.mean(dim=(1, 2, 3)).clamp(min=1e-4).log()
    rgb = x.mean(dim=(2, 3))
    target = torch.tensor([0.8, 0.3, 0.2])
    color = torch.exp(-((rgb - target) ** 2).sum(-1) / (2 * 0.25 ** 2))
    return WEIGHTS[0] * bright + WEIGHTS[1] * 3.0 * (color - 0.1)


def test_sum_equals_its_terms_in_value_and_gradient():
    reward = build_reward_sum(_terms(), chunk_size=2)
    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts = ["a"] * 5
    x = images.clone().requires_grad_(True)
    ref = _reference_log_r(x)
    (ref_grad,) = torch.autograd.grad(ref.sum(), x)
    assert torch.allclose(reward.log_reward(images, prompts), ref.detach(), atol=1e-6)
    values, grad = reward.log_reward_and_grad(images, prompts)  # chunked (2 + 2 + 1)
    assert torch.allclose(values, ref.detach(), atol=1e-6)
    assert torch.allclose(grad, ref_grad, atol=1e-6)


def test_terms_are_recorded_without_gradient_only():
    reward = build_reward_sum(_terms())
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with record_terms(reward) as recorded:
        with torch.no_grad():
            total = reward.log_reward(images, ["a"] * 3)
        reward.log_reward_and_grad(images, ["a"] * 3)  # under autograd: not recorded
    assert list(recorded) == ["brightness", "color-target"] and all(len(v) == 1 for v in recorded.values())
    recomposed = WEIGHTS[0] * recorded["brightness"][0] + WEIGHTS[1] * recorded["color-target"][0]
    assert torch.allclose(recomposed, total, atol=1e-6)
    with record_terms(build_reward("brightness")) as nothing:  # a single reward: nothing to record
        build_reward("brightness").log_reward(images, ["a"] * 3)
    assert nothing == {}


def test_repeated_names_get_distinct_labels():
    reward = build_reward_sum([("brightness", 1.0, build_reward("brightness")),
                               ("brightness", 2.0, build_reward("brightness"))])
    assert reward.model.labels == ["brightness", "brightness#2"]


def test_list_form_and_explicit_form_are_the_same_config(tmp_path):
    listed = build_config(RunConfig, get_preset("tiny-sd"), None, [SUM])
    assert listed.sd.reward.name == "sum" and [t.weight for t in listed.sd.reward.terms] == list(WEIGHTS)
    terms = ("      - {name: brightness, weight: 0.7}\n"
             "      - {name: color-target, weight: 0.3, transform: exp, scale: 3.0, shift: 0.1}\n")
    yaml = tmp_path / "list.yaml"
    yaml.write_text("sd:\n  reward:\n" + terms.replace("      ", "    "))
    assert build_config(RunConfig, get_preset("tiny-sd"), str(yaml)).sd.reward == listed.sd.reward
    yaml = tmp_path / "explicit.yaml"  # tiny-sd sets sd.reward.transform: log, which a sum must not keep
    yaml.write_text("sd:\n  reward:\n    name: sum\n    transform: auto\n    terms:\n" + terms)
    assert build_config(RunConfig, get_preset("tiny-sd"), str(yaml)).sd.reward == listed.sd.reward


@pytest.mark.parametrize(("overrides", "message"), [
    pytest.param(["sd.reward={name: sum}"], "needs at least one term", id="sum-without-terms"),
    pytest.param(["sd.reward.name=sum", "sd.reward.terms=[{name: brightness}]"], "list form",
                 id="sum-keeping-a-presets-transform"),
    pytest.param(["sd.reward=[{name: sum}]"], r"terms\[0\].name", id="nested-sum"),
    pytest.param(["sd.reward=[{name: brightness, weight: 1, nope: 2}]"], "nope", id="unknown-term-field"),
    pytest.param(["sd.reward.terms=[{name: brightness}]"], "set sd.reward.name=sum", id="terms-on-a-single-reward"),
    pytest.param(["sd.reward=[{name: brightness, transform: exp, scale: 0}]"], "scale", id="zero-scale"),
])
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_config(RunConfig, get_preset("tiny-sd"), None, overrides)


@pytest.mark.parametrize("name", METHODS)
def test_every_method_trains_on_a_sum_and_logs_each_term(name):
    from fastnabla.run.driver import build_trainer, check_task_reward
    from fastnabla.tasks.sd.build import build_sd_task
    from fastnabla.training.distributed import DistContext
    from fastnabla.utils.profiling import PhaseTimer

    cfg = build_config(RunConfig, get_preset("tiny-sd"), None, [*SD, SUM, f"method.name={name}"])
    task = build_sd_task(cfg.sd, "cpu", seed=0)
    check_task_reward(task, name)
    tr = build_trainer(task, cfg, DistContext(), PhaseTimer())
    records = [tr.step() for _ in range(2)]
    trained = [r for r in records if "transitions" in r]
    assert trained and all(math.isfinite(r["loss"]) for r in trained)
    for r in records:
        terms = r["reward_terms"]
        assert list(terms) == ["brightness", "color-target"]
        recomposed = WEIGHTS[0] * terms["brightness"]["mean"] + WEIGHTS[1] * terms["color-target"]["mean"]
        assert recomposed == pytest.approx(r["reward_mean"], abs=1e-5)


def test_evaluation_reports_each_term():
    from fastnabla.eval.image_sets import EvalPlan, MetricExtractors, collect_image_set, summarize_image_set
    from fastnabla.tasks.sd.build import build_sd_task

    cfg = build_config(RunConfig, get_preset("tiny-sd"), None, [*SD, SUM])
    task = build_sd_task(cfg.sd, "cpu", seed=0)
    plan = EvalPlan(["a photo of a cat", "a red bird"], [0, 1], batch_size=3)
    images = collect_image_set(task, plan, MetricExtractors(), use_pretrained=True)
    summary = summarize_image_set(images, images, MetricExtractors())
    terms = summary["log_reward_terms"]
    assert set(terms) == {"brightness", "color-target"}
    assert WEIGHTS[0] * terms["brightness"] + WEIGHTS[1] * terms["color-target"] == pytest.approx(
        summary["log_reward_mean"], abs=1e-5)
