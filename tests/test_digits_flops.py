"""``python -m fastnabla.flops --preset digits``: the digits pipeline's own networks are counted (not SD 1.5's), its
classifier reward with the run's options, and replayed batches amortise its sampling."""

from __future__ import annotations

import json

import pytest
import torch
from digits_common import quick_build_classifier, quick_build_dir

from fastnabla.flops.cli import main
from fastnabla.flops.counting import count_flops


def _report(capsys, *overrides: str, model: str | None = None) -> dict:
    assert main(["--preset", "digits", f"sd.model={model or quick_build_dir()}", *overrides, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_digits_preset_counts_its_own_pipeline_and_classifier(capsys):
    quick_build_dir()  # built into the default cache, where sd.model=digits-quick resolves, as a run resolves it
    report = _report(capsys, "--no-release", model="digits-quick")
    assert report["resolution"] == 16 and report["reward"] == "digits-value"
    assert report["tflops_per_trained_transition"] < 1e-2  # SD 1.5's is ~14 TF: its networks were not counted
    # the reward pass equals the quick build's classifier counted for real on a 16 x 16 image
    classifier = quick_build_classifier()
    real = count_flops(lambda: classifier(torch.rand(1, 3, 16, 16)))
    assert report["gflops_per_row"]["reward.forward"] * 1e9 == pytest.approx(real, rel=1e-9)


def test_replayed_batches_amortise_the_digits_sampling(capsys):
    plain = _report(capsys, "--no-release")
    replay = _report(capsys, "--no-release", "train.batch_size=6", "train.replay_batches=3")
    assert plain["trained_per_trajectory"] == 11  # the preset's 10 chunks + the terminal transition of 50 steps
    assert replay["trained_per_trajectory"] == 3 * 11
    assert replay["tflops_per_trained_transition_incl_sampling"] == pytest.approx(
        replay["tflops_per_trained_transition"] + replay["tflops_sampling_per_trajectory"] / 33)
