"""Stable Diffusion task: diffusers pipelines, LoRA policy, flow U-Net, sampling with CFG.

Modules: ``config`` (``SDConfig``), ``loading`` / ``tiny`` / ``tokenizer`` (pipeline parts),
``lora`` (adapters, pretrained = adapters off, export), ``flow_net`` (``g_phi``), ``task``
(``SDTask``, the trainer's interface), ``build`` (``build_sd_task``), ``sampling`` and
``image_grid`` (evaluation), ``switches`` (speed switches), ``counters`` (pass counters).
Submodules import diffusers/transformers/peft lazily, so importing this package is cheap.
"""

from fastnabla.tasks.sd.config import SDConfig

__all__ = ["SDConfig"]
