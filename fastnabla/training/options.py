"""Options of the residual nabla-DB objective (paper eqs. 15-19), shared by the objective and the trainer."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastnabla.losses.forward_looking import FL_JACOBIANS, GAMMA_SCHEDULES
from fastnabla.losses.weights import WEIGHT_SCHEDULES


def _help(text: str, **kw) -> dict:
    return {"metadata": {"help": text}, **kw}


@dataclass
class NablaGFNOptions:
    """Options of the residual nabla-DB objective (paper eqs. 15-19)."""

    beta: float = field(default=1.0, **_help("reward temperature beta: target p#(x) R(x)^beta"))
    prior_strength: float = field(default=1.0, **_help("eta_p, strength of the pretrained prior"))
    gamma: str = field(default="alpha_bar", **_help(f"FL strength gamma_t, one of {GAMMA_SCHEDULES}"))
    fl_jacobian: str = field(
        default="full", **_help(f"how the FL gradient treats d x_hat / d x, one of {FL_JACOBIANS}")
    )
    fl_model: str = field(
        default="policy", **_help("network that predicts x_hat for the FL term: 'policy' or 'reference'")
    )
    fl_noise_var: float = field(default=0.0, **_help("variance c of the FL reward smoothing noise"))
    fl_num_noise: int = field(default=1, **_help("number K of FL smoothing noise samples"))
    fl_chunk_size: int = field(
        default=0, **_help("rows of the K*B decoder batch per FL decode-VJP, bounding memory (0: all at once)")
    )
    weight_forward: str = field(default="one", **_help(f"w_F(t) schedule, one of {WEIGHT_SCHEDULES}"))
    weight_reverse: str = field(default="one", **_help(f"w_B(t) schedule, one of {WEIGHT_SCHEDULES}"))
    forward_scale: float = field(default=1.0, **_help("constant multiplier of w_F"))
    reverse_scale: float = field(default=1.0, **_help("constant multiplier of w_B (0 drops the reverse loss)"))
    output_reg: float = field(default=0.0, **_help("lambda of the output regulariser ||eps - eps_old||^2"))
    second_order: bool = field(
        default=False, **_help("keep the policy graph in the reverse score (second-order terms)")
    )
    forward_trains_flow: bool = field(
        default=True, **_help("let the forward loss train the flow through g(x_{t+1})")
    )
    flow: str = field(default="learned", **_help("'learned' flow network or the task's 'oracle' flow"))
    reverse_target: str = field(
        default="score",
        **_help("flow target of the reverse loss: 'score' (-s~<-, eq. 17) or 'pathwise' (TD(lambda))"),
    )
    td_lambda: float = field(default=0.0, **_help("lambda of the pathwise flow target, in [0, 1]"))
    fold_fl_vjp: bool = field(
        default=True,
        **_help("fold the FL gradient's network VJP at x_t into the reverse score's VJP (same loss, one network "
                "backward fewer per transition; applies with the eq. 17 reverse loss and the full FL Jacobian)"),
    )

    def validate(self) -> None:
        checks = [
            ("gamma", self.gamma, GAMMA_SCHEDULES),
            ("fl_jacobian", self.fl_jacobian, FL_JACOBIANS),
            ("fl_model", self.fl_model, ("policy", "reference")),
            ("weight_forward", self.weight_forward, WEIGHT_SCHEDULES),
            ("weight_reverse", self.weight_reverse, WEIGHT_SCHEDULES),
            ("flow", self.flow, ("learned", "oracle")),
            ("reverse_target", self.reverse_target, ("score", "pathwise")),
        ]
        for name, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"method.{name}={value!r} is not one of {allowed}")
        for name in ("beta", "prior_strength", "fl_noise_var", "forward_scale", "reverse_scale", "output_reg"):
            if getattr(self, name) < 0:
                raise ValueError(f"method.{name} must be >= 0, got {getattr(self, name)}")
        if self.beta == 0:
            raise ValueError("method.beta must be > 0")
        if not 0.0 <= self.td_lambda <= 1.0:
            raise ValueError(f"method.td_lambda must be in [0, 1], got {self.td_lambda}")
        if self.fl_chunk_size < 0:
            raise ValueError(f"method.fl_chunk_size must be >= 0, got {self.fl_chunk_size}")
        if self.fl_num_noise < 1:
            raise ValueError(f"method.fl_num_noise must be >= 1, got {self.fl_num_noise}")


def forward_looking_kwargs(opts: NablaGFNOptions) -> dict:
    """The FL options of ``opts`` as keyword arguments of :func:`forward_looking_gradient`."""
    return {
        "beta": opts.beta,
        "gamma": opts.gamma,
        "jacobian": opts.fl_jacobian,
        "noise_var": opts.fl_noise_var,
        "num_noise": opts.fl_num_noise,
    }
