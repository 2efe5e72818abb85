"""Differentiable reward preprocessing (``fastnabla.rewards.preprocess``) against the reference packages' own
preprocessing: transformers' ``CLIPImageProcessor`` (aesthetic), torchvision's ``Resize``/``CenterCrop`` (ImageReward)
and open_clip's ``image_transform`` (HPS, ViT-H-14).

Tensor paths must agree to float rounding; PIL paths (uint8 in, PIL's own bicubic with uint8 rounding) to about one
grey level, i.e. ``<= 2/255 / min(std)`` after normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastnabla.rewards.aesthetic import CLIP_PREPROCESS
from fastnabla.rewards.imagereward import IR_PREPROCESS
from fastnabla.rewards.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    ImagePreprocess,
    center_crop,
    longest_side_size,
    pad_to_square,
    shortest_side_size,
)

SIZES = [
    pytest.param((512, 512), id="512sq"),
    pytest.param((97, 131), id="odd97x131"),
    pytest.param((300, 257), id="tall300x257"),
    pytest.param((64, 64), id="upsample64"),
    pytest.param((225, 480), id="wide225x480"),
]
PIL_TOL = 2 / 255 / min(CLIP_STD)
HPS_PREPROCESS = ImagePreprocess(size=224, geometry="longest-pad", fill=0.0)


def images(shape, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, *shape, generator=gen)


def uint8_image(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 9, 9, generator=gen), size=shape, mode="bilinear")
    return (smooth[0] * 255).round().to(torch.uint8)  # [3, H, W], smooth so that PIL/torch rounding stays small


def to_pil(image_u8):
    from PIL import Image

    return Image.fromarray(image_u8.permute(1, 2, 0).numpy())


@pytest.mark.parametrize("shape", SIZES)
def test_aesthetic_matches_clip_image_processor_tensor_path(shape):
    from transformers import CLIPImageProcessor

    x = images(shape)
    ref = CLIPImageProcessor(do_rescale=False)(images=list(x), return_tensors="pt")["pixel_values"]
    out = CLIP_PREPROCESS(x)
    assert out.shape == (2, 3, 224, 224)
    assert torch.allclose(out, ref, atol=2e-5, rtol=0), float((out - ref).abs().max())


@pytest.mark.parametrize("shape", SIZES)
def test_aesthetic_matches_clip_image_processor_pil_path(shape):
    from transformers import CLIPImageProcessorPil

    img = uint8_image(shape)
    ref = CLIPImageProcessorPil()(images=[to_pil(img)], return_tensors="pt")["pixel_values"]
    out = CLIP_PREPROCESS(img[None].float() / 255)
    assert (out - ref).abs().max() <= PIL_TOL


@pytest.mark.parametrize("shape", SIZES)
def test_imagereward_matches_torchvision_transform(shape):
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize

    x = images(shape)
    bicubic = InterpolationMode.BICUBIC
    ref = Compose([Resize(224, interpolation=bicubic), CenterCrop(224), Normalize(CLIP_MEAN, CLIP_STD)])
    assert torch.allclose(IR_PREPROCESS(x), ref(x), atol=2e-5, rtol=0)


@pytest.mark.parametrize("shape", SIZES)
def test_imagereward_matches_package_pil_transform(shape):
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    img = uint8_image(shape)
    pil_pipeline = Compose([Resize(224, interpolation=InterpolationMode.BICUBIC), CenterCrop(224), ToTensor(),
                            Normalize(CLIP_MEAN, CLIP_STD)])  # ImageReward's _transform(224) on a PIL image
    assert (IR_PREPROCESS(img[None].float() / 255)[0] - pil_pipeline(to_pil(img))).abs().max() <= PIL_TOL


@pytest.mark.parametrize("shape", [pytest.param((512, 512), id="512sq"), pytest.param((96, 96), id="96sq")])
def test_hps_matches_open_clip_vit_h14_transform_on_square_images(shape):
    import open_clip

    cfg = open_clip.get_pretrained_cfg("ViT-H-14", "laion2b_s32b_b79k")  # the weights HPSv2 was fine-tuned from
    size = open_clip.get_model_config("ViT-H-14")["vision_cfg"]["image_size"]
    transform = open_clip.image_transform(size, is_train=False, mean=cfg["mean"], std=cfg["std"],
                                          interpolation=cfg["interpolation"], resize_mode=cfg["resize_mode"])
    img = uint8_image(shape)
    assert (HPS_PREPROCESS(img[None].float() / 255)[0] - transform(to_pil(img))).abs().max() <= PIL_TOL


@pytest.mark.parametrize("shape", [pytest.param((100, 70), id="tall100x70"), pytest.param((61, 200), id="wide61x200")])
def test_hps_longest_side_resize_and_zero_pad(shape):
    """HPSv2's ResizeMaxSize: longer side to 224, the other round(side * 224 / long), zero pad centred (floor left)."""
    x = images(shape, batch=1)
    h, w = longest_side_size(*shape, 224)
    assert max(h, w) == 224 and (h, w) == (round(shape[0] * 224 / max(shape)), round(shape[1] * 224 / max(shape)))
    out = HPS_PREPROCESS.geometry_only(x)
    resized = torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    top, left = (224 - h) // 2, (224 - w) // 2
    assert torch.equal(out[..., top : top + h, left : left + w], resized)
    assert out.sum() == pytest.approx(resized.sum().item(), rel=1e-6)  # everything else is zero padding


def test_hps_matches_open_clip_longest_mode_inside_the_image():
    """open_clip's 'longest' resize mode is the same geometry up to PIL rounding and a 1-pixel pad offset."""
    import open_clip

    img = uint8_image((150, 100))
    transform = open_clip.image_transform(224, is_train=False, resize_mode="longest", fill_color=0)
    ref = transform(to_pil(img))
    out = HPS_PREPROCESS(img[None].float() / 255)[0]
    inner = (slice(None), slice(4, 220), slice(44, 180))  # away from the padding seams
    assert (out[inner] - ref[inner]).abs().max() <= 4 * PIL_TOL


def test_output_size_rules():
    assert shortest_side_size(300, 257, 224) == (int(224 * 300 / 257), 224)
    assert shortest_side_size(97, 131, 224) == (224, int(224 * 131 / 97))
    assert longest_side_size(512, 512, 224) == (224, 224)
    x = torch.arange(2 * 3 * 7 * 6, dtype=torch.float32).view(2, 3, 7, 6)
    assert torch.equal(center_crop(x, 4, "floor"), x[..., 1:5, 1:5])
    assert torch.equal(center_crop(x, 4, "round"), x[..., 2:6, 1:5])  # round(1.5) = 2 (torchvision)
    padded = pad_to_square(x, 7)  # width 6 -> 7: pad 1 // 2 = 0 columns left, 1 right (HPSv2's split)
    assert torch.equal(padded[..., :, :6], x) and torch.equal(padded[..., :, 6], torch.zeros(2, 3, 7))


def test_preprocess_is_differentiable_and_keeps_dtype():
    x = images((40, 30)).double().requires_grad_(True)
    out = CLIP_PREPROCESS(x)
    assert out.dtype == torch.float64
    (g,) = torch.autograd.grad(out.square().sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_bad_preprocess_arguments_are_named():
    with pytest.raises(ValueError, match="geometry"):
        ImagePreprocess(geometry="squash")
    with pytest.raises(ValueError, match="rounding"):
        center_crop(torch.zeros(1, 3, 8, 8), 4, "ceil")
    with pytest.raises(ValueError, match="smaller than the crop"):
        center_crop(torch.zeros(1, 3, 8, 8), 9)


def test_identity_resize_keeps_pixels():
    x = images((224, 224))
    assert torch.equal(CLIP_PREPROCESS.geometry_only(x), x)
    assert np.isclose(float(CLIP_PREPROCESS(x).mean()), float(((x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1))
                                                               / torch.tensor(CLIP_STD).view(1, 3, 1, 1)).mean()))
