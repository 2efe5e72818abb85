"""Hot-path ops, one module per op: pure-torch reference + ``torch.library`` custom op (fake +
autograd) + one dispatch rule (:mod:`fastnabla.ops.dispatch`). Triton kernels live in
:mod:`fastnabla.kernels` and are imported only when the Triton backend runs."""

from fastnabla.ops.denoise_step import denoise_step_fused, denoise_step_reference

__all__ = ["denoise_step_fused", "denoise_step_reference"]
