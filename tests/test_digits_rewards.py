"""The digits rewards: values against brute force, gradients against finite differences (gradcheck in float64)
and against an independent re-implementation, the registry path, and clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from digits_common import quick_build_classifier, quick_build_dir

from fastnabla.rewards import available_rewards, build_reward
from fastnabla.rewards.digits import DigitsClassReward, DigitsValueReward
from fastnabla.tasks.digits.data import load_split


@pytest.fixture
def quick_dir():
    return quick_build_dir()


@pytest.fixture
def quick_classifier():
    return quick_build_classifier()


@pytest.fixture(scope="module")
def images():
    """8 held-out digits as reward inputs (``[0, 1]``), plus 2 noisy ones (the classifier is unsure there)."""
    x = (load_split(16).test_images[::45][:8] + 1) / 2
    noisy = (x[:2] + 0.3 * torch.randn(x[:2].shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    return torch.cat([x, noisy])


def _brute_class(logits: torch.Tensor, classes: list[int]) -> torch.Tensor:
    p = logits.double().exp() / logits.double().exp().sum(1, keepdim=True)
    return torch.log(sum(p[:, k] for k in classes))


@pytest.mark.parametrize("classes", [[3], [0, 2, 4, 6, 8], [1, 7, 9]])
def test_class_reward_matches_brute_force(quick_dir, quick_classifier, images, classes):
    reward = build_reward("digits-class", classes=classes, classifier=str(quick_dir))
    got = reward.log_reward(images, ["a handwritten digit"] * len(images))
    want = _brute_class(quick_classifier(images), classes)
    assert got.dtype == torch.float32 and got.shape == (len(images),)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert bool((got <= 1e-6).all())


def test_value_reward_matches_brute_force(quick_dir, quick_classifier, images):
    reward = build_reward("digits-value", classifier=str(quick_dir / "classifier.safetensors"))
    got = reward.log_reward(images, [""] * len(images))
    logits = quick_classifier(images).double()
    want = sum(k * torch.softmax(logits, 1)[:, k] for k in range(10))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    custom = build_reward("digits-value", values=[1, 0, 0, 0, 0, 0, 0, 0, 0, -1], classifier=str(quick_dir))
    torch.testing.assert_close(custom.score(images, [""] * len(images)).double(),
                               torch.softmax(logits, 1)[:, 0] - torch.softmax(logits, 1)[:, 9], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature", [1, 2.5, 10.0], ids=["T1", "T2.5", "T10"])
def test_value_reward_at_a_temperature_matches_brute_force(quick_dir, quick_classifier, images, temperature):
    reward = build_reward("digits-value", temperature=temperature, classifier=str(quick_dir))
    got = reward.log_reward(images, [""] * len(images))
    probs = torch.softmax(quick_classifier(images).double() / temperature, 1)
    torch.testing.assert_close(got.double(), sum(k * probs[:, k] for k in range(10)), rtol=1e-5, atol=1e-5)


def test_a_temperature_makes_the_value_reward_gradient_informative(quick_classifier, images):
    """The classifier is confident, so the expected digit is flat at T = 1; at T = 10 the pixel gradient is denser
    (the reason for the option, docs/digits.md)."""
    norms = {}
    for temperature in (1.0, 10.0):
        x = images.clone().requires_grad_(True)
        DigitsValueReward(quick_classifier, temperature=temperature).score(x, [""] * len(x)).sum().backward()
        norms[temperature] = x.grad.flatten(1).norm(dim=1).median()
    assert norms[10.0] > 10 * norms[1.0]


def test_gradients_match_finite_differences_in_float64(quick_classifier, images):
    clf64 = copy.deepcopy(quick_classifier).double()
    x = images[[0, 8]].double().requires_grad_(True)
    for model in (DigitsClassReward(clf64, [3, 5]), DigitsValueReward(clf64), DigitsValueReward(clf64, temperature=4)):
        # fast mode: finite differences of v^T J u for random u, v (the full Jacobian takes 10x longer)
        assert torch.autograd.gradcheck(lambda im, m=model: m.score(im, ["", ""]), (x,), eps=1e-6, atol=1e-6,
                                         fast_mode=True)


def test_pixel_gradient_matches_an_independent_implementation(quick_dir, quick_classifier, images):
    reward = build_reward("digits-class", classes=[0, 3], classifier=str(quick_dir), chunk_size=3)
    values, grads = reward.log_reward_and_grad(images, ["p"] * len(images))
    x = images.clone().requires_grad_(True)
    want = _brute_class(quick_classifier(x), [0, 3])
    (g,) = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(values.double(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads, g.float(), rtol=1e-4, atol=1e-6)
    assert float(grads.abs().sum()) > 0


def test_other_resolutions_are_resized(quick_dir, images):
    reward = build_reward("digits-class", classes=[3], classifier=str(quick_dir))
    big = torch.nn.functional.interpolate(images, scale_factor=2, mode="nearest")
    value = reward.log_reward(big, [""] * len(big))
    assert value.shape == (len(images),) and torch.isfinite(value).all()


def test_registered_with_descriptions():
    rewards = available_rewards()
    assert "digits-class" in rewards and "digits-value" in rewards


@pytest.mark.parametrize("classes, match", [([], "non-empty"), ([10], "digits 0..9"), ([1, 1], "duplicates"),
                                            (list(range(10)), "all 10 digits"), ("3", "digits 0..9"),
                                            ([True], "digits 0..9")])
def test_bad_class_sets_are_rejected(quick_dir, classes, match):
    with pytest.raises(ValueError, match=match):
        build_reward("digits-class", classes=classes, classifier=str(quick_dir))


def test_bad_values_and_options_are_rejected(quick_dir):
    with pytest.raises(ValueError, match="10 finite numbers"):
        build_reward("digits-value", values=[1, 2, 3], classifier=str(quick_dir))
    with pytest.raises(ValueError, match="10 finite numbers"):
        build_reward("digits-value", values=[float("nan")] * 10, classifier=str(quick_dir))
    for temperature in (0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            build_reward("digits-value", temperature=temperature, classifier=str(quick_dir))
    with pytest.raises(ValueError, match="valid options"):
        build_reward("digits-class", clases=[3])
    reward = build_reward("digits-class", classes=3, classifier=str(quick_dir))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        reward.log_reward(torch.rand(2, 16, 16), ["", ""])


def test_missing_classifier_names_the_file_and_the_build_command(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTNABLA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match=r"classifier.safetensors.*python -m fastnabla.tasks.digits build"):
        build_reward("digits-class")
    with pytest.raises(FileNotFoundError, match=r"nowhere.*python -m fastnabla.tasks.digits build --out DIR"):
        build_reward("digits-value", classifier=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty" / "classifier.safetensors")):
        (tmp_path / "empty").mkdir()
        build_reward("digits-class", classifier=str(tmp_path / "empty"))


def test_a_foreign_safetensors_file_is_rejected(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not a digits classifier"):
        build_reward("digits-class", classifier=str(path))


def test_the_full_build_in_the_default_cache_publishes_the_default_classifier(tmp_path, monkeypatch):
    """The rewards' default classifier is a copy the full build writes next to it (FULL replaced by a tiny build)."""
    import dataclasses

    from fastnabla.tasks.digits import build

    tiny = dataclasses.replace(build.QUICK, vae_steps=2, unet_steps=2, classifier_steps=2, unet_batch=4)
    monkeypatch.setenv("FASTNABLA_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "FULL", tiny)
    directory = build.build_pipeline(None, tiny, progress=False)
    published = tmp_path / "digits" / "classifier.safetensors"
    assert published.read_bytes() == (directory / "classifier.safetensors").read_bytes()
    published.unlink()
    assert build.build_pipeline(None, tiny, progress=False) == directory and published.is_file()  # restored
    assert build_reward("digits-class").score(torch.rand(2, 3, 16, 16), ["", ""]).shape == (2,)
    build.build_pipeline(tmp_path / "elsewhere", tiny, progress=False)  # not the default location: no copy
    assert not (tmp_path / "classifier.safetensors").exists()
