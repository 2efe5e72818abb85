"""Work-arounds for upstream packaging problems, in one place (each says what it works around).

Call :func:`prepare_third_party_imports` before importing ``torchvision``, ``open_clip``,
``transformers``, ``diffusers`` or ``peft``; every fastnabla module that imports them does so. It is
idempotent and does nothing on an environment without the problems below.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

_DONE = False
_TV_LIBRARY: torch.library.Library | None = None  # kept alive: dropping it would undefine the ops


def _torchvision_build_tag() -> str | None:
    """The version string of the installed torchvision (``"0.28.0+cu130"``), read without importing it."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    version_file = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    try:
        for line in version_file.read_text().splitlines():
            if line.startswith("__version__"):
                return line.split("=", 1)[1].strip().strip("'\"")
    except OSError:
        return None
    return None


def _cuda_torchvision_on_cpu_torch() -> bool:
    """Whether a CUDA build of torchvision sits next to a CPU build of torch.

    Upstream problem: PyPI has one torchvision wheel for torch 2.13.0 (``0.28.0``) and it is a
    CUDA build. Its compiled ops do not load into the CPU torch, and ``import torchvision`` then dies
    in its meta registrations with ``operator torchvision::nms does not exist``. That takes down
    ``import open_clip`` and, once torchvision is installed at all, the model imports of
    ``transformers`` / ``peft`` / ``diffusers`` too.
    """
    if torch.version.cuda is not None:
        return False
    tag = _torchvision_build_tag()
    return tag is not None and "+cu" in tag


def _define_torchvision_op_schemas() -> None:
    """Define the two op schemas torchvision's Python side registers fake kernels for.

    With the schemas present ``import torchvision`` succeeds and its transforms work (they are pure
    torch); the compiled ops themselves (``nms``, ``roi_align``, ...) still do not run, and nothing in
    fastnabla uses them.
    """
    global _TV_LIBRARY
    if hasattr(torch.ops.torchvision, "nms"):
        return
    _TV_LIBRARY = torch.library.Library("torchvision", "DEF")
    _TV_LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TV_LIBRARY.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def _quiet_bitsandbytes_hub_kernel_warning() -> None:
    """Silence bitsandbytes' warning about a CPU 4-bit GEMM kernel it fetches from the Hugging Face kernel hub.

    Upstream problem: bitsandbytes 0.50 on a CPU with AVX512-BF16 calls ``kernels.get_kernel(
    "kernels-community/quantization-bitsandbytes")`` when it is imported (peft and diffusers import it), and
    without a hub, or without trusting that repository, logs "Failed to load CPU gemm_4bit_forward ..." on every
    run (and the kernel hub itself "Skipping publisher trust check ..." when offline). fastnabla never uses 4-bit
    layers (only 8-bit Adam), so the fallback is irrelevant here.
    """
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    logging.getLogger("kernels._internals.hf_hub").setLevel(logging.ERROR)


def prepare_third_party_imports() -> None:
    """Apply every work-around that the current environment needs (idempotent)."""
    global _DONE
    if _DONE:
        return
    if _cuda_torchvision_on_cpu_torch():
        _define_torchvision_op_schemas()
    _quiet_bitsandbytes_hub_kernel_warning()
    _DONE = True


def _find_pruneable_heads_and_indices(heads, n_heads: int, head_size: int, already_pruned_heads: set):
    """The heads of ``heads`` not pruned yet (re-indexed past the pruned ones) and the flat indices of the kept
    rows; the helper transformers 5 removed (BLIP's ``med.py`` imports it for ``prune_heads``, unused in scoring)."""
    mask = torch.ones(n_heads, head_size)
    heads = set(heads) - set(already_pruned_heads)
    for head in heads:
        mask[head - sum(1 for pruned in already_pruned_heads if pruned < head)] = 0
    keep = mask.view(-1).eq(1)
    return heads, torch.arange(keep.numel())[keep].long()


def _invert_attention_mask(self, mask: torch.Tensor) -> torch.Tensor:
    """Additive attention bias from a 0/1 mask ``[B, K]`` or ``[B, Q, K]``: 0 where attended, dtype-min elsewhere."""
    extended = (mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]).to(self.dtype)
    return (1.0 - extended) * torch.finfo(self.dtype).min


def _get_head_mask(self, head_mask: torch.Tensor | None, num_hidden_layers: int):
    """Per-layer head masks: ``[None] * layers`` when none is given, else broadcastable 5-D masks."""
    if head_mask is None:
        return [None] * num_hidden_layers
    if head_mask.dim() == 1:
        head_mask = head_mask[None, None, :, None, None].expand(num_hidden_layers, -1, -1, -1, -1)
    elif head_mask.dim() == 2:
        head_mask = head_mask[:, None, :, None, None]
    return head_mask.to(self.dtype)


def enable_image_reward_package() -> None:
    """Make the ``image-reward`` package (1.5, installed with ``--no-deps``) importable and buildable under
    transformers 5. fastnabla's own ImageReward port does not need it; it exists to run the original package
    side by side (tests/test_rewards_reference.py).

    Upstream problems worked around:
    * ``ImageReward/models/BLIP/med.py`` imports ``apply_chunking_to_forward``, ``prune_linear_layer`` and
      ``find_pruneable_heads_and_indices`` from ``transformers.modeling_utils``; transformers 5 moved the first
      two to ``transformers.pytorch_utils`` and removed the third. They are put back where ``med.py`` looks.
    * ``med.py``'s ``BertModel`` calls ``self.init_weights()`` instead of ``post_init()``, so under transformers
      5.23 ``all_tied_weights_keys`` (set by ``post_init``) is missing and ``init_weights`` fails; the patched
      ``init_weights`` sets it first.
    * ``med.py``'s forward calls ``self.invert_attention_mask`` and ``self.get_head_mask``, which transformers 5
      removed from ``PreTrainedModel``; equivalents are added to its ``BertPreTrainedModel``.

    The package itself also needs ``clip-anytorch``, ``fairscale``, ``accelerate``, ``diffusers`` and ``setuptools<81``
    (``pkg_resources``) installed; see docs/rewards.md.
    """
    prepare_third_party_imports()
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    for name in ("apply_chunking_to_forward", "prune_linear_layer"):
        if not hasattr(modeling_utils, name):
            setattr(modeling_utils, name, getattr(pytorch_utils, name))
    if not hasattr(modeling_utils, "find_pruneable_heads_and_indices"):
        modeling_utils.find_pruneable_heads_and_indices = _find_pruneable_heads_and_indices

    from ImageReward.models.BLIP import med

    if not hasattr(med.BertPreTrainedModel, "invert_attention_mask"):
        med.BertPreTrainedModel.invert_attention_mask = _invert_attention_mask
    if not hasattr(med.BertPreTrainedModel, "get_head_mask"):
        med.BertPreTrainedModel.get_head_mask = _get_head_mask
    needs_tied_keys = hasattr(modeling_utils.PreTrainedModel, "get_expanded_tied_weights_keys")  # transformers >= 5
    if not needs_tied_keys or getattr(med.BertPreTrainedModel.init_weights, "_fastnabla_patched", False):
        return

    def init_weights(self) -> None:
        if not hasattr(self, "all_tied_weights_keys"):
            self.all_tied_weights_keys = self.get_expanded_tied_weights_keys(all_submodels=False)
        modeling_utils.PreTrainedModel.init_weights(self)

    init_weights._fastnabla_patched = True
    med.BertPreTrainedModel.init_weights = init_weights
