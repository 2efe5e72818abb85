"""FLOP accounting: FLOPs per trained transition and per sampled trajectory of a run config, by phase.

``python -m fastnabla.flops --preset NAME [--json]`` (:mod:`fastnabla.flops.cli`). Three parts:

* :mod:`.archs`: the real architectures (SD 1.5, SDXL, the reward models, the release's flow network) shipped as
  JSON configs and built on the meta device;
* :mod:`.counting`: FLOPs of one pass of each network on one row, counted by ``FlopCounterMode`` (forward, input
  VJP, parameter backward) with ``requires_grad`` set as the trainer sets it;
* :mod:`.structure`: how many passes of each kind a trained transition and a sampled trajectory cost, derived from
  the config and the training plan (tested against the pass counters of real runs);

and :mod:`.report`, which multiplies them into TFLOPs per phase, for the config and for the authors' release's layout
(docs/flops.md). :mod:`.memory_estimate` (``python -m fastnabla.flops.memory_estimate --preset NAME``) estimates the
memory of a trained micro-batch from the same meta-device networks (docs/stable-diffusion.md, "SDXL").
"""

from fastnabla.flops.report import flop_report, format_table
from fastnabla.flops.structure import PassStructure, derive_structure, release_structure

__all__ = ["PassStructure", "derive_structure", "flop_report", "format_table", "release_structure"]
