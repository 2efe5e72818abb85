"""The residual nabla-DB objective over the model interface: networks in, scalar loss out.

Evaluates, for a batch of transitions, everything :func:`fastnabla.losses.residual_nabla_db_loss`
needs: ``eps_theta`` (with graph) and the two reverse-score VJPs, the forward-looking gradients at
``x_t`` and ``x_{t+1}``, and the flow outputs. ``flow="oracle"`` replaces the learned flow by the
task's exact ``grad log E#[R^beta | x_{t+1}]`` and trains the policy with the forward loss only:
the best a fixed-variance Gaussian policy reaches on the chosen sampler (the floor diagnostic).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastnabla.losses.forward_looking import FL_JACOBIANS, GAMMA_SCHEDULES, forward_looking_gradient
from fastnabla.losses.nabla_db import residual_nabla_db_loss
from fastnabla.losses.weights import WEIGHT_SCHEDULES, loss_weight
from fastnabla.mdp.gaussian_policy import step_mean
from fastnabla.training.interface import DiffusionTask
from fastnabla.training.trajectories import TransitionBatch

Tensor = torch.Tensor


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


def _eps_and_vjp(eps_fn, x: Tensor, x_next: Tensor, a: Tensor, b: Tensor, keep_graph: bool, second_order: bool):
    """``eps(x)`` and ``J_eps(x)^T r`` with ``r = x_next - (a x + b eps)`` in one forward + one VJP."""
    x_in = x.detach().requires_grad_(True)
    eps = eps_fn(x_in)
    r = x_next - step_mean(x_in, eps, a, b)
    cot = r if second_order else r.detach()
    (vjp,) = torch.autograd.grad(eps, x_in, grad_outputs=cot, retain_graph=keep_graph, create_graph=second_order)
    return eps, vjp


def nabla_gfn_loss(task: DiffusionTask, batch: TransitionBatch, opts: NablaGFNOptions) -> tuple[Tensor, dict]:
    """Mean residual nabla-DB loss over ``batch`` and per-term diagnostics."""
    mdp = task.mdp
    T = mdp.num_steps
    x_t, x_next, step, cond = batch.x_t, batch.x_next, batch.step, batch.cond
    c = mdp.gather(step, x_t.ndim, x_t.dtype)
    terminal = step == T - 1
    step_next = (step + 1).clamp(max=T - 1)
    ab_next = mdp.gather(step_next, x_t.ndim, x_t.dtype)["alpha_bar"]
    oracle = opts.flow == "oracle"
    use_reverse = opts.reverse_scale > 0 and not oracle
    pathwise = use_reverse and opts.reverse_target == "pathwise"
    if pathwise and "flow_target" not in batch.extras:
        raise ValueError("reverse_target='pathwise' needs batch.extras['flow_target'] (see training.pathwise)")
    need_vjp = use_reverse and not pathwise

    def policy(x: Tensor, s: Tensor = step) -> Tensor:
        return task.policy_eps(x, s, cond)

    def reference(x: Tensor, s: Tensor = step) -> Tensor:
        return task.reference_eps(x, s, cond)

    with torch.enable_grad():
        if need_vjp:
            eps_theta, vjp_theta = _eps_and_vjp(policy, x_t, x_next, c["a"], c["b"], True, opts.second_order)
            eps_ref, vjp_ref = _eps_and_vjp(reference, x_t, x_next, c["a"], c["b"], False, False)
            eps_ref, vjp_ref = eps_ref.detach(), vjp_ref.detach()
        else:
            eps_theta = policy(x_t)
            with torch.no_grad():
                eps_ref = reference(x_t)
            vjp_theta = vjp_ref = torch.zeros_like(x_t)

    zeros = torch.zeros_like(x_t)
    if oracle:
        if not hasattr(task, "oracle_log_flow_grad"):
            raise ValueError("method.flow='oracle' needs a task with a closed-form flow (the gmm task)")
        fl_next = task.oracle_log_flow_grad(x_next, step + 1).detach()
        fl_t = flow_t = flow_next = zeros
    else:
        fl_eps = task.policy_eps if opts.fl_model == "policy" else task.reference_eps

        def fl(x: Tensor, s: Tensor, ab: Tensor, term: Tensor) -> Tensor:
            return forward_looking_gradient(
                x, ab, term, lambda y: fl_eps(y, s, cond), lambda img: task.log_reward(img, cond),
                decode=task.decode, **forward_looking_kwargs(opts),
            )

        if "fl_next" in batch.extras:
            fl_next, fl_t = batch.extras["fl_next"], batch.extras["fl_t"]
        else:
            fl_next = fl(x_next, step_next, ab_next, terminal)
            fl_t = fl(x_t, step, c["alpha_bar"], torch.zeros_like(terminal)) if use_reverse else zeros
        flow_next = task.flow(x_next, step + 1, cond)
        flow_t = task.flow(x_t, step, cond) if use_reverse else zeros

    w_f = opts.forward_scale * loss_weight(opts.weight_forward, c["b"], c["sigma"])
    w_b = (opts.reverse_scale if use_reverse else 0.0) * loss_weight(opts.weight_reverse, c["b"], c["sigma"])
    terms = residual_nabla_db_loss(
        x_t=x_t, x_next=x_next, eps_theta=eps_theta, eps_ref=eps_ref, vjp_theta=vjp_theta, vjp_ref=vjp_ref,
        fl_t=fl_t, fl_next=fl_next, flow_t=flow_t, flow_next=flow_next,
        a=c["a"], b=c["b"], sigma=c["sigma"], terminal=terminal, w_forward=w_f, w_reverse=w_b,
        eps_old=batch.eps_old, output_reg=opts.output_reg, prior_strength=opts.prior_strength,
        detach_reverse=not opts.second_order, forward_trains_flow=opts.forward_trains_flow,
        reverse_target=batch.extras.get("flow_target") if pathwise else None,
    )
    info = {
        "loss": terms.total.mean().detach(),
        "loss_forward": terms.forward.mean().detach(),
        "loss_reverse": terms.reverse.mean().detach() if use_reverse else torch.zeros(()),
        "loss_terminal": terms.terminal.sum().detach() / terminal.sum().clamp(min=1),
        "loss_output_reg": terms.output_reg.mean().detach(),
    }
    return terms.total.mean(), info
