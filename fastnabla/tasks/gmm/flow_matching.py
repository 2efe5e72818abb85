"""The analytic task under the rectified-flow SDE: the exact velocity of the mixture and the task around it.

With ``x_s = (1 - s) x_data + s n`` (``s = 1`` noise) and ``y = x_s / c_s`` the VP process of
:mod:`fastnabla.mdp.flow_matching` (``sqrt(abar) = (1 - s) / c_s``), the exact velocity of a mixture prior is
closed form from its posterior (:meth:`GaussianMixture.posterior` at the VP ``abar`` of ``y``)::

    x_hat*(x_s) = E[x_data | x_s] = sum_k P(k | y) mean_k(y)          (posterior mean, any s in (0, 1])
    v*(x_s, s)  = E[n - x_data | x_s] = (x_s - x_hat*) / s             (x_s = x_hat + s E[n | x_s])

which for ``s < 1`` equals ``(eps*(y, abar) - x_s) / (1 - s)`` with ``eps*`` the VP noise predictor of
:meth:`GaussianMixture.eps_star` (``E[n | y] = eps*``; tests/test_gmm_fm.py checks both, and ``v* = n - E[x_data]``
at ``s = 1``). The pretrained epsilon of the MDP is ``eps# = u_t y + w_t v*`` (the table's map), so for ``s < 1`` it
*is* ``eps*(y, abar_t)`` and at ``s = 1`` it is the nominal-pair epsilon of the table.

The fine-tuned model adds a zero-initialised residual MLP, either to the **velocity** (``residual: velocity``,
``eps_theta = u y + w (v* + r_theta)``: LoRA on a velocity network, as for SD3 / FLUX) or to the epsilon
(``residual: eps``, as the DDIM task). The oracle flow ``log E#[R^beta | x_s]`` uses the VP ``abar`` of every state
(``vp_alpha_bar``, 0 at pure noise, where it is constant) and the VP posterior, exact for ``y``.
"""

from __future__ import annotations

import torch

from fastnabla.mdp.flow_matching import FlowMatchMDP
from fastnabla.tasks.gmm.mixture import GaussianMixture
from fastnabla.tasks.gmm.model import GMMTask
from fastnabla.tasks.gmm.rewards import AnalyticReward

Tensor = torch.Tensor
RESIDUALS = ("eps", "velocity")


def posterior_mean(mixture: GaussianMixture, y: Tensor, alpha_bar: Tensor) -> Tensor:
    """``E[y_data | y]`` under the VP noising ``y = sqrt(abar) y_data + sqrt(1 - abar) n`` (``abar`` in ``[0, 1)``,
    a scalar or ``[B, 1]``), shape ``[B, d]``."""
    log_w, mean, _ = mixture.posterior(y, alpha_bar)
    return (torch.softmax(log_w, -1)[..., None] * mean).sum(1)


def mixture_velocity(mixture: GaussianMixture, x: Tensor, s: Tensor) -> Tensor:
    """The exact rectified-flow velocity ``v*(x_s, s) = E[n - x_data | x_s]`` of ``mixture``, ``s`` in ``(0, 1]``
    (a scalar or ``[B, 1]``): ``(x_s - E[x_data | x_s]) / s``."""
    s = torch.as_tensor(s, dtype=x.dtype, device=x.device)
    scale = ((1 - s) ** 2 + s**2).sqrt()
    alpha_bar = ((1 - s) / scale) ** 2
    return (x - posterior_mean(mixture, x / scale, alpha_bar)) / s


class GMMFlowTask(GMMTask):
    """The analytic task on the rectified-flow SDE (``sampler.sampler: flow-sde``); a ``DiffusionTask``.

    Args:
        residual: ``velocity`` (the residual network adds to the velocity) or ``eps`` (to the table's epsilon).
        Others as :class:`GMMTask`.
    """

    def __init__(self, prior: GaussianMixture, reward: AnalyticReward, beta: float, mdp: FlowMatchMDP,
                 hidden: int = 128, layers: int = 3, flow_output_scale: str = "none",
                 flow_output_cap: float = float("inf"), residual: str = "velocity"):
        if not isinstance(mdp, FlowMatchMDP):
            raise TypeError(f"GMMFlowTask needs a FlowMatchMDP, got {type(mdp).__name__}")
        if residual not in RESIDUALS:
            raise ValueError(f"residual must be one of {RESIDUALS}, got {residual!r}")
        super().__init__(prior, reward, beta, mdp, hidden, layers, flow_output_scale, flow_output_cap)
        self.residual_kind = residual
        # the oracle's abar per state: the VP value (0 at pure noise), not the table's nominal one
        self.register_buffer("state_alpha_bar", mdp.vp_alpha_bar.float())
        for name in ("eps_x", "eps_v"):
            self.register_buffer(name, getattr(mdp, name).float())
        self.register_buffer("step_s", mdp.flow_sigmas[:-1].float())
        self.register_buffer("step_scale", mdp.scale[:-1].float())

    def pretrained_velocity(self, y: Tensor, step: Tensor) -> Tensor:
        """``v*(c_t y, s_t)`` in float64 arithmetic, returned in ``y``'s dtype."""
        s = self.mdp.flow_sigmas[step.cpu()].to(device=y.device)[:, None]
        x = y.double() * self.mdp.scale[step.cpu()].to(device=y.device)[:, None]
        return mixture_velocity(self.data_prior, x, s).to(y.dtype)

    def _epsilon(self, y: Tensor, step: Tensor, velocity: Tensor) -> Tensor:
        return self.eps_x[step][:, None].to(y.dtype) * y + self.eps_v[step][:, None].to(y.dtype) * velocity

    def pretrained_eps(self, x: Tensor, step: Tensor, cond=None) -> Tensor:
        return self._epsilon(x, step, self.pretrained_velocity(x, step))

    def policy_eps(self, x: Tensor, step: Tensor, cond=None) -> Tensor:
        r = self.residual(x, step)
        if self.residual_kind == "eps":
            return self.pretrained_eps(x, step) + r
        return self._epsilon(x, step, self.pretrained_velocity(x, step) + r)
