"""Inception-v3 pool features (2048-d) for FID, from local weights (nothing is downloaded).

    f(x) = avgpool(Inception-v3(2 resize_299(x) - 1))        # [B, 2048], before dropout and the classifier

Preprocessing is pytorch-fid's: bilinear resize to 299 x 299 (``align_corners=False``, no antialiasing), then the
``[-1, 1]`` scaling the Google weights expect. The network is torchvision's ``Inception3``; two weight layouts load:

* ``pt_inception-2015-12-05-*.pth`` (pytorch-fid; github.com/mseitzer/pytorch-fid releases): the TensorFlow
  Inception graph of the original FID (Heusel et al., 2017), 1008 classes, no auxiliary head. That graph pools
  differently from torchvision's: the pool branches of Mixed_5b-5d, Mixed_6b-6e and Mixed_7b average over the valid
  pixels of each 3x3 window only (``count_include_pad=False``) and Mixed_7c's pool branch takes a 3x3 max. Here the
  first is a rescaling of the branch's input by ``9 / (valid pixels)``, the second a replacement of that input by
  the max pool of the block's input, both as forward pre-hooks. Features: kind ``inception-fid`` (the FID network).
* ``inception_v3_google-*.pth`` (torchvision's ``Inception_V3_Weights.IMAGENET1K_V1``): 1000 classes (the
  auxiliary head's weights are ignored), torchvision's pooling. Kind ``inception-torchvision``: a Frechet Inception
  distance with a different network, whose values are not comparable with published FIDs.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastnabla.compat import prepare_third_party_imports
from fastnabla.eval.extractor import ImageFeatureExtractor, Tensor
from fastnabla.rewards.loading import load_exact, load_state_dict_file

INCEPTION_SIZE = 299
FID_CLASSES, TORCHVISION_CLASSES = 1008, 1000
AVERAGE_POOL_BLOCKS = ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7b")
MAX_POOL_BLOCK = "Mixed_7c"
WEIGHT_SOURCES = (
    "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (https://github.com/mseitzer/pytorch-fid/releases, "
    "FID weights) or torchvision's inception_v3_google-0cc3c7bd.pth (https://download.pytorch.org/models/)"
)


def build_inception(num_classes: int = FID_CLASSES) -> nn.Module:
    """torchvision's ``Inception3`` with ``num_classes`` outputs, no auxiliary head, random (default) init."""
    prepare_third_party_imports()
    from torchvision.models.inception import Inception3

    return Inception3(num_classes=num_classes, aux_logits=False, transform_input=False, init_weights=False)


def _valid_pixel_rescale(module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """avg_pool2d(x, 3, 1, 1) counts the zero padding; divide by the fraction of valid pixels per window instead."""
    pooled = args[0]
    valid_fraction = F.avg_pool2d(torch.ones_like(pooled[:1, :1]), kernel_size=3, stride=1, padding=1)  # [1, 1, H, W]
    return (pooled / valid_fraction, *args[1:])


def apply_fid_pooling(model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """Give torchvision's ``Inception3`` the pooling of the TF FID graph (module docstring) with forward hooks."""
    handles = [getattr(model, name).branch_pool.register_forward_pre_hook(_valid_pixel_rescale)
               for name in AVERAGE_POOL_BLOCKS]
    block = getattr(model, MAX_POOL_BLOCK)
    block_input: dict[str, Tensor] = {}

    def remember_input(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        block_input["x"] = args[0]

    def max_pool_instead(module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return (F.max_pool2d(block_input.pop("x"), kernel_size=3, stride=1, padding=1), *args[1:])

    handles.append(block.register_forward_pre_hook(remember_input))
    handles.append(block.branch_pool.register_forward_pre_hook(max_pool_instead))
    return handles


class InceptionPoolFeatures(ImageFeatureExtractor):
    """2048-d pool features of ``model`` (an ``Inception3``); ``fid_pooling`` applies the TF graph's pooling.

    ``image_size``: the resize target (299 for FID; smaller only in tests, Inception-v3 needs >= 75).
    """

    def __init__(self, model: nn.Module, fid_pooling: bool, description: str, image_size: int = INCEPTION_SIZE):
        super().__init__(description)
        if image_size < 75:
            raise ValueError(f"Inception-v3 needs images of at least 75 x 75 pixels, got image_size={image_size}")
        model.fc = nn.Identity()
        self.model = model.eval().requires_grad_(False)
        self.kind = "inception-fid" if fid_pooling else "inception-torchvision"
        self.image_size = int(image_size)
        self._hooks = apply_fid_pooling(self.model) if fid_pooling else []

    def features(self, images: Tensor) -> Tensor:
        size = (self.image_size, self.image_size)
        x = images if tuple(images.shape[-2:]) == size else F.interpolate(images, size=size, mode="bilinear",
                                                                            align_corners=False)
        weight_dtype = next(self.model.parameters()).dtype
        return self.model((2 * x - 1).to(weight_dtype))


def load_inception_features(path: str | Path, device: torch.device | str = "cpu") -> InceptionPoolFeatures:
    """Inception pool features from a local weights file in either layout (module docstring), on ``device``.

    Raises:
        FileNotFoundError: ``path`` does not exist (the error names the flag and where to get the weights).
        ValueError: the file is not an Inception-v3 state dict of either layout.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--inception={path}: no such file. Expected Inception-v3 weights: {WEIGHT_SOURCES}")
    state = load_state_dict_file(path, f"--inception={path}")
    classes = state.get("fc.weight", torch.empty(0, 0)).shape[0]
    if classes not in (FID_CLASSES, TORCHVISION_CLASSES):
        raise ValueError(f"--inception={path}: not Inception-v3 weights of a known layout (fc.weight has {classes} "
                         f"rows; pytorch-fid's FID weights have {FID_CLASSES}, torchvision's {TORCHVISION_CLASSES})")
    model = build_inception(classes)
    load_exact(model, state, f"--inception={path} (Inception-v3)", ignore=("AuxLogits.",))
    fid_pooling = classes == FID_CLASSES
    layout = "pytorch-fid FID weights" if fid_pooling else "torchvision ImageNet weights"
    return InceptionPoolFeatures(model, fid_pooling, f"Inception-v3 pool features, {layout} from {path}").to(device)
