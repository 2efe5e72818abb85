"""Flow-matching models (SD3 / SD3.5 MMDiT and FLUX.1) on the rectified-flow SDE: pipelines, LoRA policy, flow
network, sampling with CFG (SD3) or the guidance embedding (FLUX).

Modules: ``config`` (``FlowConfig``), ``loading`` / ``tiny`` (pipeline parts), ``text`` (prompt embeddings as the
pipelines compute them), ``task`` (``FlowTask``, the trainer's interface), ``lora`` (export for diffusers),
``build`` (``build_flow_task``), ``run`` (``FlowRun``). Prompts, rewards, LoRA helpers, the flow network and the
evaluation sampler come from :mod:`fastnabla.tasks.sd`. Submodules import diffusers/transformers/peft lazily.
"""

from fastnabla.tasks.flow.config import FlowConfig

__all__ = ["FlowConfig"]
