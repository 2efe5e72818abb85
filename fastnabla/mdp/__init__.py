"""The denoising MDP: sampler coefficients and the Gaussian policy's densities and scores."""

from fastnabla.mdp.flow_matching import (
    FLOW_SAMPLER,
    FlowMatchMDP,
    build_flow_mdp,
)
from fastnabla.mdp.gaussian_policy import (
    cfg_combine,
    denoise_step,
    forward_score,
    residual_forward_score,
    residual_reverse_score,
    reverse_score,
    step_mean,
    transition_log_prob,
    tweedie_x0,
)
from fastnabla.mdp.schedule import SD15_SCHEDULER_CONFIG, DenoisingMDP, build_mdp

__all__ = [
    "FLOW_SAMPLER",
    "FlowMatchMDP",
    "build_flow_mdp",
    "SD15_SCHEDULER_CONFIG",
    "DenoisingMDP",
    "build_mdp",
    "cfg_combine",
    "denoise_step",
    "forward_score",
    "residual_forward_score",
    "residual_reverse_score",
    "reverse_score",
    "step_mean",
    "transition_log_prob",
    "tweedie_x0",
]
