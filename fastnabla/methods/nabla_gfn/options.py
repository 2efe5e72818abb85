"""Options of nabla-GFlowNet, the residual nabla-DB objective (paper eqs. 15-19): ``method.*`` of the run config.

Torch-free (the run config is built without importing torch). The choice names are the config's vocabulary; the
maths that implements each (``gamma_schedule``, ``loss_weight``, the FL Jacobians) accepts exactly these names
(tests/test_config.py checks that the two agree).
"""

from __future__ import annotations

from dataclasses import dataclass

from fastnabla.config.fields import Section, option

GAMMA_SCHEDULES = ("alpha_bar", "sqrt_alpha_bar", "one")
FL_JACOBIANS = ("full", "tweedie", "identity")
WEIGHT_SCHEDULES = ("one", "eps", "sigma2")
FL_MODELS = ("policy", "pretrained")
FL_DECODERS = ("exact", "surrogate")
FL_MODELS_RENAMED = {"reference": "pretrained"}  # the frozen model's name before 2026-12


@dataclass
class NablaGFNOptions(Section):
    """Options of the residual nabla-DB objective (paper eqs. 15-19)."""

    path = "method"

    beta: float = option(1.0, gt=0, help="reward temperature beta: target p#(x) R(x)^beta")
    prior_strength: float = option(1.0, ge=0, help="eta_p, strength of the pretrained prior")
    gamma: str = option("alpha_bar", choices=GAMMA_SCHEDULES, help="FL strength gamma_t")
    fl_jacobian: str = option("full", choices=FL_JACOBIANS, help="how the FL gradient treats d x_hat / d x")
    fl_model: str = option("policy", choices=FL_MODELS, renamed=FL_MODELS_RENAMED,
                           help="network that predicts x_hat for the FL term")
    fl_noise_var: float = option(0.0, ge=0, help="variance c of the FL reward smoothing noise")
    fl_num_noise: int = option(1, ge=1, help="number K of FL smoothing noise samples")
    fl_chunk_size: int = option(
        0, ge=0, help="rows of the K*B decoder batch per FL decode-VJP, bounding memory (0: all at once)")
    weight_forward: str = option("one", choices=WEIGHT_SCHEDULES, help="w_F(t) schedule")
    weight_reverse: str = option("one", choices=WEIGHT_SCHEDULES, help="w_B(t) schedule")
    forward_scale: float = option(1.0, ge=0, help="constant multiplier of w_F")
    reverse_scale: float = option(1.0, ge=0, help="constant multiplier of w_B (0 drops the reverse loss)")
    output_reg: float = option(0.0, ge=0, help="lambda of the output regulariser ||eps - eps_old||^2")
    second_order: bool = option(False, help="keep the policy graph in the reverse score (second-order terms)")
    forward_trains_flow: bool = option(True, help="let the forward loss train the flow through g(x_{t+1})")
    flow: str = option("learned", choices=("learned", "oracle"),
                       help="the learned flow network, or the task's exact flow (the floor diagnostic)")
    reverse_target: str = option(
        "score", choices=("score", "pathwise"),
        help="flow target of the reverse loss: -s~<- (eq. 17) or its TD(lambda) pathwise form")
    td_lambda: float = option(0.0, ge=0, le=1, help="lambda of the pathwise flow target")
    forward_looking: str = option(
        "all", choices=("all", "terminal"),
        help="where the forward-looking term beta gamma_s grad log R(x_hat(x_s)) is computed: at every state (the "
             "paper's) or only at the terminal state, where x_hat(x_T) = x_T and it is the exact reward gradient "
             "(ours: elsewhere it is a baseline the flow network absorbs, and skipping it saves the next-state "
             "network pass, the decodes and the reward passes of non-terminal states; docs/cost.md)")
    fl_decoder: str = option(
        "exact", choices=FL_DECODERS,
        help="decoder of the forward-looking term: 'exact' (the task's decoder at every state) or 'surrogate' (ours: "
             "the task's cheap surrogate decoder, sd.fl_surrogate_decoder, at non-terminal states and the exact "
             "decoder at x_T, where log F(x_T) = beta log R(x_T) must hold; elsewhere the term is a baseline the flow "
             "network absorbs; docs/cost.md)")
    terminal: str = option(
        "paper", choices=("paper", "release"),
        help="terminal transitions: 'paper' (eqs. 16-18: the reverse loss there too, ||g(x_T)||^2 averaged like every "
             "term, forward-looking strength 1 at x_T) or 'release' (the authors' code: no reverse loss on terminal "
             "transitions, ||g(x_T)||^2 averaged over a micro-batch's terminal rows, strength abar_0; "
             "docs/fidelity.md)")
    fold_fl_vjp: bool = option(
        True,
        help="fold the FL gradient's network VJP at x_t into the reverse score's VJP (same loss, one network "
             "backward fewer per transition; applies with the eq. 17 reverse loss and the full FL Jacobian)")
    flow_ema_decay: float = option(
        0.0, ge=0, lt=1,
        help="decay d of a Polyak-averaged copy of the flow network (phi_bar <- d phi_bar + (1 - d) phi after each "
             "optimizer step) that the policy's forward target and the pathwise bootstrap read, while the reverse "
             "loss trains the live flow (ours: steadies the analytic runs; docs/analytic-benchmark.md). 0: the live "
             "flow (the paper's). Ignored with the oracle flow")

    def check(self, prefix: str) -> None:
        if self.flow_ema_decay > 0 and self.forward_trains_flow and self.flow == "learned":
            raise ValueError(f"{prefix}.flow_ema_decay={self.flow_ema_decay}: the forward loss reads the averaged "
                             f"flow, so it cannot train the flow; set {prefix}.forward_trains_flow=false, or "
                             f"{prefix}.flow_ema_decay=0 for the live flow")


def forward_looking_kwargs(opts: NablaGFNOptions) -> dict:
    """The FL options of ``opts`` as keyword arguments of the forward-looking gradient."""
    return {
        "beta": opts.beta,
        "gamma": opts.gamma,
        "jacobian": opts.fl_jacobian,
        "noise_var": opts.fl_noise_var,
        "num_noise": opts.fl_num_noise,
    }
