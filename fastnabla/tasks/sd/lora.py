"""LoRA adapters on the UNet (peft), the pretrained model as "adapters off", and export for diffusers.

With ``W`` a frozen weight of a targeted layer (``to_q``, ``to_k``, ``to_v``, ``to_out.0`` by
default), the fine-tuned layer computes ``W x + (alpha / r) B A x`` with ``A`` ``[r, in]`` and ``B``
``[out, r]``; peft initialises ``B = 0``, so the policy starts *exactly* at the pretrained model.
The pretrained model ``eps#`` is the same UNet with the adapters switched off: no second copy of the
weights.

Adapters are added through diffusers' ``unet.add_adapter`` (the UNet stays a plain
``UNet2DConditionModel``, so attention processors, ``channels_last`` and ``torch.compile`` apply as
usual); the LoRA weights are fp32 whatever the frozen dtype (peft casts the layer input to the
adapter dtype and the sum back to the base dtype).

Export writes ``pytorch_lora_weights.safetensors`` (diffusers key format, with the adapter config as
metadata, so ``alpha != r`` loads correctly) that ``StableDiffusionPipeline.load_lora_weights``
reads. The whole directory is written atomically (temporary sibling + rename).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from fastnabla.compat import prepare_third_party_imports
from fastnabla.tasks.sd.config import LoRAConfig
from fastnabla.utils.io import apply_umask, make_temp_dir

ADAPTER_NAME = "default"
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"


def add_lora(unet: nn.Module, cfg: LoRAConfig) -> list[nn.Parameter]:
    """Freeze ``unet``, add LoRA adapters per ``cfg`` (fp32, ``B = 0``) and return their parameters.

    Raises:
        ValueError: naming ``sd.lora.target_modules`` when no module of the UNet matches.
    """
    prepare_third_party_imports()
    from peft import LoraConfig

    unet.requires_grad_(False)
    config = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        init_lora_weights=True,
    )
    try:
        unet.add_adapter(config, adapter_name=ADAPTER_NAME)
    except ValueError as err:
        raise ValueError(f"sd.lora.target_modules={list(cfg.target_modules)}: {err}") from err
    params = lora_parameters(unet)
    if not params:
        raise ValueError(f"sd.lora.target_modules={list(cfg.target_modules)} matched no module of the UNet")
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def lora_parameters(unet: nn.Module) -> list[nn.Parameter]:
    """The LoRA parameters of ``unet`` in module order."""
    return [p for _, p in named_lora_parameters(unet)]


def named_lora_parameters(unet: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every LoRA weight (names like ``...to_q.lora_A.default.weight``)."""
    return [(n, p) for n, p in unet.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def lora_layers(unet: nn.Module) -> list[nn.Module]:
    """The peft tuner layers (modules that hold adapters) of ``unet``."""
    prepare_third_party_imports()
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_disabled(layers: list[nn.Module]) -> Iterator[None]:
    """Run the base model: every adapter of ``layers`` off inside the block, restored after.

    peft's switch also changes ``requires_grad`` of the adapter weights; their flags are restored
    exactly, so the block is safe in the middle of a training step (a graph built before it still
    backpropagates into the adapters).
    """
    flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, flag in flags:
            p.requires_grad_(flag)


def lora_state_dict_for_diffusers(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights in diffusers' key format (``...to_q.lora.down.weight``), fp32 copies on CPU."""
    prepare_third_party_imports()
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
    return {k: v.detach().float().cpu().contiguous() for k, v in convert_state_dict_to_diffusers(state).items()}


def export_lora(unet: nn.Module, directory: str | Path) -> Path:
    """Write the LoRA of ``unet`` as a diffusers LoRA directory (``load_lora_weights`` reads it), atomically.

    An existing ``directory`` is replaced only once the new one is complete.
    """
    prepare_third_party_imports()
    from diffusers import StableDiffusionPipeline

    directory = Path(directory).expanduser()
    directory.parent.mkdir(parents=True, exist_ok=True)
    config = unet.peft_config[ADAPTER_NAME]
    tmp = make_temp_dir(directory)
    try:
        StableDiffusionPipeline.save_lora_weights(
            tmp,
            unet_lora_layers=lora_state_dict_for_diffusers(unet),
            unet_lora_adapter_metadata=config.to_dict(),
            safe_serialization=True,
        )
        if not (tmp / LORA_WEIGHTS_FILE).is_file():
            raise OSError(f"diffusers did not write {LORA_WEIGHTS_FILE} into {tmp}")
        for file in tmp.iterdir():
            apply_umask(file)  # safetensors writes 0600
        if directory.exists():
            stale = directory.with_name(f".{directory.name}.stale-{os.getpid()}")
            os.rename(directory, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.rename(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory
