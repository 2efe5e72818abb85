"""Feature extractors of the evaluation: weight loading in every supported layout (random weights written to temporary
files; nothing is downloaded), the FID pooling of the Inception graph against a block-by-block computation and, where
installed, pytorch-fid; the DreamSim wrapper against a stand-in package; and how each extractor labels its metric."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from fastnabla.eval.clip_features import load_clip_features
from fastnabla.eval.dreamsim_features import load_dreamsim_features
from fastnabla.eval.image_sets import MetricExtractors
from fastnabla.eval.inception import InceptionPoolFeatures, apply_fid_pooling, build_inception, load_inception_features
from fastnabla.rewards.aesthetic import random_clip_image_encoder
from fastnabla.rewards.preprocess import ImagePreprocess, resize_bicubic
from fastnabla.rewards.tiny import TINY_CLIP_VISION, register_tiny_open_clip


def _images(n: int = 2, size: int = 40, seed: int = 3) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _randomise_batch_norm(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(5)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.rand(module.running_mean.shape, generator=gen) * 0.2 - 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)


# --- CLIP ---------------------------------------------------------------------------------------------------------


def test_clip_transformers_directory_roundtrip(tmp_path):
    encoder = random_clip_image_encoder(**TINY_CLIP_VISION).eval()
    encoder.model.save_pretrained(tmp_path / "clip")
    features = load_clip_features(str(tmp_path / "clip"))
    x = _images()
    expected = encoder(ImagePreprocess(size=TINY_CLIP_VISION["image_size"])(x))
    assert features.kind == "clip" and str(tmp_path / "clip") in features.description
    torch.testing.assert_close(features(x), expected, rtol=1e-5, atol=1e-6)
    assert features(x).shape == (2, TINY_CLIP_VISION["projection_dim"])


def test_clip_open_clip_checkpoint_file(tmp_path):
    import open_clip

    architecture = register_tiny_open_clip()
    model = open_clip.create_model(architecture, pretrained=None).eval()
    torch.save(model.state_dict(), tmp_path / "tiny-clip.pt")
    features = load_clip_features(str(tmp_path / "tiny-clip.pt"), architecture=architecture)
    x = _images()
    expected = model.visual(ImagePreprocess(size=32)(x))
    torch.testing.assert_close(features(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["missing-path", "incomplete-dir", "unknown-hub-id"])
def test_clip_missing_weights_name_the_flag(case, tmp_path):
    value = {"missing-path": str(tmp_path / "nope"), "incomplete-dir": str(tmp_path),
             "unknown-hub-id": "nobody-here/no-such-clip"}[case]
    with pytest.raises(FileNotFoundError, match="--clip") as info:
        load_clip_features(value)
    assert "config.json" in str(info.value)
    assert not str(info.value).startswith("reward")


# --- Inception ----------------------------------------------------------------------------------------------------


def _inception_a_reference(block, x):
    """Mixed_5b of the TF graph: the pool branch averages over valid pixels only."""
    return torch.cat([
        block.branch1x1(x),
        block.branch5x5_2(block.branch5x5_1(x)),
        block.branch3x3dbl_3(block.branch3x3dbl_2(block.branch3x3dbl_1(x))),
        block.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)),
    ], 1)


def _inception_e_max_reference(block, x):
    """Mixed_7c of the TF graph: the pool branch takes a 3x3 max."""
    y = block.branch3x3_1(x)
    z = block.branch3x3dbl_2(block.branch3x3dbl_1(x))
    return torch.cat([
        block.branch1x1(x),
        torch.cat([block.branch3x3_2a(y), block.branch3x3_2b(y)], 1),
        torch.cat([block.branch3x3dbl_3a(z), block.branch3x3dbl_3b(z)], 1),
        block.branch_pool(F.max_pool2d(x, 3, stride=1, padding=1)),
    ], 1)


@torch.no_grad()
@pytest.mark.parametrize(("block_name", "channels", "reference"),
                         [("Mixed_5b", 192, _inception_a_reference), ("Mixed_7c", 2048, _inception_e_max_reference)],
                         ids=["avg-valid-pixels", "max-pool"])
def test_fid_pooling_matches_the_block_computed_by_hand(block_name, channels, reference):
    model = build_inception().eval()
    _randomise_batch_norm(model)
    block = getattr(model, block_name)
    x = torch.randn(2, channels, 7, 9, generator=torch.Generator().manual_seed(1))
    plain, expected = block(x), reference(block, x)  # before the hooks: the reference calls branch_pool itself
    handles = apply_fid_pooling(model)
    hooked = block(x)
    torch.testing.assert_close(hooked, expected, rtol=1e-5, atol=1e-5)
    assert (plain - expected).abs().max() > 1e-3  # the pooling difference is visible: the check is not vacuous
    for h in handles:
        h.remove()


@torch.no_grad()
def test_torchvision_layout_gives_torchvision_pool_features(tmp_path):
    from torchvision.models.inception import Inception3

    reference = Inception3(num_classes=1000, aux_logits=True, init_weights=False).eval()
    _randomise_batch_norm(reference)
    torch.save(reference.state_dict(), tmp_path / "inception_v3_google-test.pth")  # with the AuxLogits head
    features = load_inception_features(tmp_path / "inception_v3_google-test.pth")
    assert features.kind == "inception-torchvision"
    pooled = {}
    reference.avgpool.register_forward_hook(lambda m, i, o: pooled.update(x=o.flatten(1)))
    x = _images(2, 48)
    reference(2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1)
    torch.testing.assert_close(features(x), pooled["x"], rtol=1e-5, atol=1e-6)
    assert MetricExtractors(fid=features).fid_kind == "inception-torchvision-fid"


@torch.no_grad()
@pytest.mark.skipif(importlib.util.find_spec("pytorch_fid") is None, reason="pytorch-fid not installed")
def test_fid_layout_matches_pytorch_fid(tmp_path, monkeypatch):
    """pytorch-fid's FID Inception loads its weights through torch.hub's cache: random weights put there first."""
    model = build_inception()
    _randomise_batch_norm(model)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    path = tmp_path / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(model.state_dict(), path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    from pytorch_fid.inception import InceptionV3

    reference = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True, normalize_input=True,
                            use_fid_inception=True).eval()
    features = load_inception_features(path)
    assert features.kind == "inception-fid"
    x = _images(2, 64)
    torch.testing.assert_close(features(x), reference(x)[0].flatten(1), rtol=1e-5, atol=1e-6)


def test_inception_small_input_size_and_errors(tmp_path):
    model = build_inception()
    features = InceptionPoolFeatures(model, fid_pooling=True, description="test", image_size=75)
    assert features(_images(1, 20)).shape == (1, 2048)
    with pytest.raises(FileNotFoundError, match="--inception=.*no such file.*pt_inception"):
        load_inception_features(tmp_path / "missing.pth")
    torch.save({"fc.weight": torch.zeros(10, 2048), "fc.bias": torch.zeros(10)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="--inception=.*fc.weight has 10 rows"):
        load_inception_features(tmp_path / "other.pth")
    state = build_inception().state_dict()
    del state["Mixed_6a.branch3x3.conv.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="missing keys: Mixed_6a.branch3x3.conv.weight"):
        load_inception_features(tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="at least 75"):
        InceptionPoolFeatures(build_inception(), True, "x", image_size=64)


# --- DreamSim (a stand-in for the package, which is not installed here) ----------------------------------------------


class _FakeDreamSimModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 224 * 224, 6)

    def embed(self, images):
        assert images.shape[-2:] == (224, 224) and float(images.min()) >= 0 and float(images.max()) <= 1
        return F.normalize(self.proj(images.flatten(1)), dim=-1).squeeze()  # the package squeezes batch 1


def _fake_package(calls: list, download: bool = False) -> types.ModuleType:
    module = types.ModuleType("dreamsim")

    def dreamsim(pretrained=True, device="cuda", cache_dir="./models", **kwargs):
        calls.append({"pretrained": pretrained, "device": device, "cache_dir": cache_dir, **kwargs})
        if download:
            torch.hub.download_url_to_file("https://example.invalid/pretrained.zip", f"{cache_dir}/pretrained.zip")
        return _FakeDreamSimModel(), None

    module.dreamsim = dreamsim
    return module


def test_dreamsim_features_from_a_local_directory(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "dreamsim", _fake_package(calls))
    features = load_dreamsim_features(tmp_path, "cpu", dreamsim_type="dino_vitb16")
    assert calls == [{"pretrained": True, "device": "cpu", "cache_dir": str(tmp_path), "dreamsim_type": "dino_vitb16"}]
    assert features.kind == "dreamsim" and MetricExtractors(diversity=features).diversity_kind == "dreamsim"
    for n in (1, 3):  # batch 1: the package's squeeze must not lose the batch dimension
        x = _images(n, 50)
        expected = features.model.embed(resize_bicubic(x, 224, 224).clamp(0, 1)).reshape(n, -1)
        torch.testing.assert_close(features(x), expected)
        assert features(x).shape == (n, 6)


def test_dreamsim_never_downloads(tmp_path, monkeypatch):
    original = torch.hub.download_url_to_file
    monkeypatch.setitem(sys.modules, "dreamsim", _fake_package([], download=True))
    with pytest.raises(FileNotFoundError, match=f"--dreamsim={tmp_path}.*incomplete.*example.invalid"):
        load_dreamsim_features(tmp_path)
    assert torch.hub.download_url_to_file is original
    assert not (tmp_path / "pretrained.zip").exists()


def test_dreamsim_missing_package_or_directory(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="--dreamsim=.*no such directory"):
        load_dreamsim_features(tmp_path / "absent")
    monkeypatch.setitem(sys.modules, "dreamsim", None)  # import dreamsim -> ImportError
    with pytest.raises(ImportError, match="pip install dreamsim"):
        load_dreamsim_features(tmp_path)


# --- labels -------------------------------------------------------------------------------------------------------


def test_every_extractor_labels_its_metric(tmp_path):
    clip_encoder = random_clip_image_encoder(**TINY_CLIP_VISION)
    from fastnabla.eval.clip_features import CLIPImageFeatures

    clip = CLIPImageFeatures(clip_encoder, "tiny")
    fid = InceptionPoolFeatures(build_inception(), fid_pooling=True, description="tiny")
    both = MetricExtractors(diversity=clip, fid=clip)
    assert (both.diversity_kind, both.fid_kind) == ("clip-features", "clip-frechet")
    described = both.describe()
    assert "not DreamSim" in described["diversity"]["label"] and "not FID" in described["prior"]["label"]
    real = MetricExtractors(diversity=None, fid=fid)
    assert real.fid_kind == "inception-fid" and real.describe()["diversity"] is None
    assert "not FID" not in real.describe()["prior"]["label"]
    with pytest.raises(ValueError, match="no diversity metric is defined on 'inception-fid' features"):
        MetricExtractors(diversity=fid)
