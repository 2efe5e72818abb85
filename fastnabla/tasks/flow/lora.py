"""Export of the transformer's LoRA in the format ``StableDiffusion3Pipeline`` / ``FluxPipeline``
``load_lora_weights`` read.

Adapters are added and switched off with the Stable Diffusion task's helpers (:mod:`fastnabla.tasks.sd.lora`:
diffusers' ``add_adapter``, fp32 weights, ``B = 0`` at the start). The export follows diffusers' own SD3 / FLUX LoRA
trainers (``train_dreambooth_lora_sd3.py`` / ``_flux.py``): peft's state dict of the transformer, saved with the
pipeline class's ``save_lora_weights`` (keys prefixed ``transformer.``) together with the adapter config as metadata,
so ``alpha != rank`` loads with the right scaling. The directory is written atomically (temporary sibling + rename).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch import nn

from fastnabla.compat import prepare_third_party_imports
from fastnabla.tasks.sd.lora import ADAPTER_NAME, LORA_WEIGHTS_FILE
from fastnabla.utils.io import apply_umask, make_temp_dir


def transformer_lora_state_dict(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """peft's LoRA state dict of ``transformer`` (``...attn.to_q.lora_A.weight``), fp32 copies on the CPU."""
    prepare_third_party_imports()
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME)
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def export_transformer_lora(transformer: nn.Module, family: str, directory: str | Path) -> Path:
    """Write the LoRA of ``transformer`` (family ``sd3`` or ``flux``) as a diffusers LoRA directory."""
    prepare_third_party_imports()
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    pipeline_cls = StableDiffusion3Pipeline if family == "sd3" else FluxPipeline
    directory = Path(directory).expanduser()
    directory.parent.mkdir(parents=True, exist_ok=True)
    config = transformer.peft_config[ADAPTER_NAME]
    tmp = make_temp_dir(directory)
    try:
        pipeline_cls.save_lora_weights(
            tmp, transformer_lora_layers=transformer_lora_state_dict(transformer),
            transformer_lora_adapter_metadata=config.to_dict(), safe_serialization=True)
        if not (tmp / LORA_WEIGHTS_FILE).is_file():
            raise OSError(f"diffusers did not write {LORA_WEIGHTS_FILE} into {tmp}")
        for file in tmp.iterdir():
            apply_umask(file)
        if directory.exists():
            stale = directory.with_name(f".{directory.name}.stale-{os.getpid()}")
            os.rename(directory, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.rename(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory
