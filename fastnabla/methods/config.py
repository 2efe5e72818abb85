"""``method.*`` of the run config: the method's name, nabla-GFlowNet's options and each baseline's section.

:data:`METHODS` is the one list of method names; :mod:`fastnabla.methods.registry` maps each to its objective.
Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastnabla.config.fields import option
from fastnabla.methods.nabla_gfn.options import NablaGFNOptions
from fastnabla.methods.options import DBOptions, DDPOOptions, DRaFTOptions, ReFLOptions

METHODS = ("nabla-gfn", "residual-db", "dag-db", "ddpo", "refl", "draft-k", "draft-lv")
# methods whose losses divide by sigma_t^2 (transition scores, Gaussian log-densities): every sampler step must be
# stochastic; the reward maximisers (refl, draft-*) only backpropagate through the sampler
NEEDS_STOCHASTIC_STEPS = ("nabla-gfn", "residual-db", "dag-db", "ddpo")
# methods that train on the batch just sampled (their objectives' ``on_policy``): no replay of older batches
ON_POLICY_METHODS = ("ddpo", "refl", "draft-k", "draft-lv")


@dataclass
class MethodConfig(NablaGFNOptions):
    """The training method: its name, the options of residual nabla-DB (eqs. 15-19) and of each baseline.

    ``beta`` is shared (the target temperature of the GFlowNet methods); each baseline reads its own section."""

    name: str = option("nabla-gfn", choices=METHODS, help="training method (--method NAME)")
    db: DBOptions = option(default_factory=DBOptions, help="")
    ddpo: DDPOOptions = option(default_factory=DDPOOptions, help="")
    refl: ReFLOptions = option(default_factory=ReFLOptions, help="")
    draft: DRaFTOptions = option(default_factory=DRaFTOptions, help="")

    def check(self, prefix: str) -> None:
        """eta_p != 1 only where every term uses it: the pathwise targets and the oracle flow assume eta_p = 1."""
        if self.name == "nabla-gfn":
            super().check(prefix)
        if self.name == "nabla-gfn" and self.prior_strength != 1.0:
            for field, value, needs in (("reverse_target", self.reverse_target, "score"), ("flow", self.flow,
                                                                                             "learned")):
                if value != needs:
                    raise ValueError(
                        f"{prefix}.prior_strength={self.prior_strength}: eta_p != 1 needs {prefix}.{field}={needs!r} "
                        f"(got {value!r}, which assumes eta_p = 1); docs/fidelity.md says what eta_p != 1 targets")
