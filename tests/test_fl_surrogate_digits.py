"""The distilled surrogate decoder of a digits pipeline (``sd.fl_surrogate_decoder=digits``): cache location, its
distillation (a short one on the quick build) and the comparison it reports."""

from __future__ import annotations

import json

import pytest
import torch
from digits_common import quick_build_dir

from fastnabla.tasks.digits.surrogate import (
    REPORT,
    SurrogateSettings,
    build_surrogate,
    compare_decoders,
    distillation_inputs,
    surrogate_dir,
)

SHORT = SurrogateSettings(steps=60, batch=32)


def test_surrogate_dir_needs_a_digits_build(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a digits pipeline build"):
        surrogate_dir(tmp_path)


def test_cache_key_follows_the_settings_and_the_build():
    build = quick_build_dir()
    a, b = surrogate_dir(build, SHORT), surrogate_dir(build, SurrogateSettings(steps=61, batch=32))
    assert a != b and a.parent == build.parent and a.name.startswith(build.name + ".fl-surrogate-")


def test_distillation_inputs_are_keyed_and_mix_three_kinds():
    latents = torch.randn(50, 4, 4, 4)
    one = distillation_inputs(latents, 30, torch.Generator().manual_seed(1))
    assert torch.equal(one, distillation_inputs(latents, 30, torch.Generator().manual_seed(1)))
    assert one.shape == (30, 4, 4, 4)
    assert not torch.equal(one, distillation_inputs(latents, 30, torch.Generator().manual_seed(2)))


def test_compare_decoders_against_itself_and_a_wrong_decoder():
    from digits_common import quick_build_classifier

    from fastnabla.rewards.digits import DigitsValueReward

    reward = DigitsValueReward(quick_build_classifier()).eval()
    weight = torch.randn(3, 4, 3, 3, generator=torch.Generator().manual_seed(0))

    def decoder(z):
        return torch.tanh(torch.nn.functional.conv2d(torch.nn.functional.interpolate(z, scale_factor=4), weight,
                                                     padding=1))

    x = torch.randn(16, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    same = compare_decoders(decoder, decoder, reward, x)
    assert same["image_rmse"] == 0 and same["log_r_mean_abs_diff"] == 0
    assert same["grad_cosine_median"] == pytest.approx(1.0, abs=1e-5)
    flipped = compare_decoders(decoder, lambda z: -decoder(z), reward, x)
    assert flipped["image_rmse"] > 0.1 and flipped["grad_cosine_median"] < 0.99


@pytest.mark.slow
def test_short_distillation_on_the_quick_build_is_cached_and_loads():
    """~1 CPU-minute: a 60-step surrogate of the quick build costs under half the exact decoder's FLOPs, is cached
    and loads as the task loads it."""
    from fastnabla.tasks.sd.loading import load_fl_surrogate_decoder

    directory = build_surrogate(quick_build_dir(), SHORT, progress=False)
    assert build_surrogate(quick_build_dir(), SHORT, progress=False) == directory  # cached
    report = json.loads((directory / REPORT).read_text())
    assert report["gflops_forward_per_latent"]["surrogate"] < report["gflops_forward_per_latent"]["exact"] / 2
    assert report["held_out_clean"]["image_rmse"] < 0.5
    model = load_fl_surrogate_decoder(str(directory), torch.float32, "cpu")
    assert model.config.scaling_factor == 1.0


def test_the_cli_builds_the_settings_it_is_given(monkeypatch, capsys, tmp_path):
    """``--channels/--blocks/--steps`` reach the settings (hence the cache key); mismatched levels exit 2."""
    from fastnabla.tasks.digits import surrogate

    (tmp_path / REPORT).write_text("{}\n")
    built = []
    monkeypatch.setattr(surrogate, "build_surrogate", lambda d, s: built.append((d, s)) or tmp_path)
    surrogate.main(["--model", str(quick_build_dir()), "--channels", "32", "32", "32", "--blocks", "2", "2", "2",
                    "--steps", "3000"])
    assert built == [(str(quick_build_dir()), SurrogateSettings(channels=(32, 32, 32), blocks=(2, 2, 2), steps=3000))]
    assert capsys.readouterr().out == f"{tmp_path}\n{{}}\n"
    with pytest.raises(SystemExit) as err:
        surrogate.main(["--channels", "32", "32", "--blocks", "2", "2", "2"])
    assert err.value.code == 2 and "one per level" in capsys.readouterr().err
