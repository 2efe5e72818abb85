"""The residual nabla-DB objective over the model interface: networks in, per-transition losses out.

Evaluates, for a batch of transitions, everything the residual nabla-DB loss
(:func:`fastnabla.ops.nabla_db_loss.residual_nabla_db_loss_fused`, the fused form of
:func:`fastnabla.ops.nabla_db_loss.residual_nabla_db_loss`) needs: ``eps_theta`` (with graph) and the two
reverse-score VJPs, the forward-looking gradients at ``x_t`` and ``x_{t+1}``, and the flow outputs.
``flow="oracle"`` replaces the learned flow by the task's exact ``grad log E#[R^beta | x_{t+1}]``
and trains the policy with the forward loss only: the best a fixed-variance Gaussian policy reaches
on the chosen sampler (the floor diagnostic).

Losses are returned *per transition*; the trainer sums them and divides by the global size of the
optimizer update (:mod:`fastnabla.training.plan`), which is the mean for one process.

**Network passes.** With the reverse loss of eq. 17 and the FL gradient at ``x_t`` computed inline
(``fl_model='policy'``, the release's setting, or ``'pretrained'`` without precomputation) through the
full Jacobian, the FL term's network VJP is folded into the reverse score's VJP of the same network
(:func:`fastnabla.ops.transition_scores_fused`: ``J^T u + J^T v = J^T (u + v)``) and ``x_hat(x_t)``
reuses that network's forward. Per trained transition that is 3 network forwards (policy and
pretrained at ``x_t``, FL network at ``x_{t+1}``) and 4 backward-type passes (two reverse-score VJPs,
the FL VJP at ``x_{t+1}``, the parameter backward) against the release's 3 + 5; the loss values are
unchanged (tested against the unfolded computation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fastnabla.mdp.gaussian_policy import step_mean, tweedie_x0
from fastnabla.methods.nabla_gfn.fl_states import (
    decoder_of,
    forward_looking_at_terminal_rows,
    forward_looking_fn,
    reward_of_rows,
)
from fastnabla.methods.nabla_gfn.options import NablaGFNOptions, forward_looking_kwargs
from fastnabla.methods.nabla_gfn.weights import loss_weight
from fastnabla.ops.forward_looking import forward_looking_pixel_gradient, gamma_schedule
from fastnabla.ops.nabla_db_loss import residual_nabla_db_loss_fused
from fastnabla.ops.transition_scores import transition_scores_fused
from fastnabla.training.interface import Diagnostic, DiffusionTask
from fastnabla.training.trajectories import TransitionBatch
from fastnabla.utils.profiling import nvtx_range

Tensor = torch.Tensor

__all__ = ["NablaGFNOptions", "forward_looking_kwargs", "nabla_gfn_loss"]



def eps_and_vjp(eps_fn, x: Tensor, x_next: Tensor, a: Tensor, b: Tensor, keep_graph: bool, second_order: bool):
    """``eps(x)`` and ``J_eps(x)^T r`` with ``r = x_next - (a x + b eps)`` in one forward + one VJP."""
    x_in = x.detach().requires_grad_(True)
    eps = eps_fn(x_in)
    r = x_next - step_mean(x_in, eps, a, b)
    cot = r if second_order else r.detach()
    (vjp,) = torch.autograd.grad(eps, x_in, grad_outputs=cot, retain_graph=keep_graph, create_graph=second_order)
    return eps, vjp


def _folded_reverse_terms(task, batch: TransitionBatch, opts: NablaGFNOptions, c: dict, policy, pretrained):
    """``eps_theta`` (with graph), ``eps_pretrained``, and the reverse-loss pieces with the FL VJP folded in.

    Returns ``(eps_theta, eps_pretrained, reverse_target, fl_local)`` such that the reverse residual
    ``s~<- + FL_t = -reverse_target + fl_local`` (paper eqs. 13, 15, 17), with
    ``FL_t = fl_local + J_net^T fl_cot``, ``fl_local = v / sqrt(abar)``,
    ``fl_cot = -sqrt(1 - abar) / sqrt(abar) v`` and ``v = beta gamma_t E grad_{x_hat} log R``.
    """
    x_t, x_next, cond = batch.x_t, batch.x_next, batch.cond  # fp32 or fp64 (nabla_gfn_loss upcasts)
    x_theta = x_t.detach().requires_grad_(True)
    x_pretrained = x_t.detach().requires_grad_(True)
    with torch.enable_grad():
        eps_theta = policy(x_theta)
        eps_pretrained = pretrained(x_pretrained)
    ab = c["alpha_bar"]
    net_eps = (eps_theta if opts.fl_model == "policy" else eps_pretrained).detach()
    x_hat = tweedie_x0(x_t.detach(), net_eps.to(x_t.dtype), ab)
    scale = opts.beta * gamma_schedule(ab, opts.gamma)
    decoder = decoder_of(task, surrogate=opts.fl_decoder == "surrogate")  # x_t is never terminal
    v, _ = forward_looking_pixel_gradient(
        x_hat, scale.reshape(-1), decoder.pop("decode"), reward_of_rows(task, cond), opts.fl_noise_var,
        opts.fl_num_noise, noise=batch.extras.get("fl_noise_t"), chunk_size=opts.fl_chunk_size or None,
        reward_sample_index=True, **decoder,
    )
    v = v.to(x_t.dtype)
    fl_local = v / ab.sqrt()
    fl_cot = -((1 - ab).sqrt() / ab.sqrt()) * v
    scores = transition_scores_fused(
        x_t.detach(), x_next.detach(), eps_theta.detach().to(x_t.dtype), eps_pretrained.detach().to(x_t.dtype),
        c["a"], c["b"], c["sigma"], ab, opts.prior_strength, fl_cot,
        "theta" if opts.fl_model == "policy" else "pretrained", outputs=("rev_local", "cot_theta", "cot_pretrained"),
    )
    (vjp_theta,) = torch.autograd.grad(eps_theta, x_theta, scores.cot_theta.to(eps_theta.dtype), retain_graph=True)
    (vjp_pretrained,) = torch.autograd.grad(eps_pretrained, x_pretrained,
                                            scores.cot_pretrained.to(eps_pretrained.dtype))
    reverse_target = -(scores.rev_local + vjp_theta.to(x_t.dtype) - vjp_pretrained.to(x_t.dtype))
    return eps_theta, eps_pretrained.detach(), reverse_target, fl_local


def nabla_gfn_loss(
    task: DiffusionTask, batch: TransitionBatch, opts: NablaGFNOptions,
    target_flow: Callable[[Tensor, Tensor, Any], Tensor] | None = None,
) -> tuple[Tensor, dict[str, Diagnostic]]:
    """Per-transition residual nabla-DB loss ``[B]`` (with graph) and per-term diagnostics.

    ``batch.extras`` may hold precomputed FL gradients (``fl_t``, ``fl_next``), pathwise targets
    (``flow_target``), FL smoothing draws (``fl_noise_t``, ``fl_noise_next``, ``[K, B, ...]``) and the pretrained
    network's kept terms (``eps_pretrained`` and ``vjp_pretrained``: :mod:`~fastnabla.methods.nabla_gfn.constants`).
    ``target_flow`` gives ``g(x_{t+1})`` of the forward loss (default ``task.flow``; the Polyak-averaged flow of
    :mod:`~fastnabla.methods.nabla_gfn.flow_average` when ``opts.flow_ema_decay > 0``).
    """
    mdp = task.mdp
    T = mdp.num_steps
    if batch.x_t.dtype in (torch.bfloat16, torch.float16):  # trajectories stored in low precision
        batch.x_t, batch.x_next, batch.eps_old = batch.x_t.float(), batch.x_next.float(), batch.eps_old.float()
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
    terminal_only = opts.forward_looking == "terminal"
    # fold the FL VJP at x_t into the reverse score's VJP when both are computed here (module docstring)
    fold = (
        opts.fold_fl_vjp and need_vjp and not opts.second_order and opts.fl_jacobian == "full"
        and "fl_t" not in batch.extras and not terminal_only
    )

    def policy(x: Tensor, s: Tensor = step) -> Tensor:
        return task.policy_eps(x, s, cond)

    def pretrained(x: Tensor, s: Tensor = step) -> Tensor:
        return task.pretrained_eps(x, s, cond)

    folded_target = None
    with torch.enable_grad():
        if fold:
            eps_theta, eps_pretrained, folded_target, fl_t = _folded_reverse_terms(task, batch, opts, c, policy,
                                                                                   pretrained)
            vjp_theta = vjp_pretrained = torch.zeros_like(x_t)
        elif need_vjp:
            eps_theta, vjp_theta = eps_and_vjp(policy, x_t, x_next, c["a"], c["b"], True, opts.second_order)
            if "vjp_pretrained" in batch.extras:  # kept per batch (constants.py)
                eps_pretrained, vjp_pretrained = batch.extras["eps_pretrained"], batch.extras["vjp_pretrained"]
            else:
                eps_pretrained, vjp_pretrained = eps_and_vjp(pretrained, x_t, x_next, c["a"], c["b"], False, False)
                eps_pretrained, vjp_pretrained = eps_pretrained.detach(), vjp_pretrained.detach()
        else:
            eps_theta = policy(x_t)
            if "eps_pretrained" in batch.extras:
                eps_pretrained = batch.extras["eps_pretrained"]
            else:
                with torch.no_grad():
                    eps_pretrained = pretrained(x_t)
            vjp_theta = vjp_pretrained = torch.zeros_like(x_t)

    zeros = torch.zeros_like(x_t)
    if oracle:
        if not hasattr(task, "oracle_log_flow_grad"):
            raise ValueError("method.flow='oracle' needs a task with a closed-form flow (the gmm task)")
        fl_next = task.oracle_log_flow_grad(x_next, step + 1).detach()
        fl_t = flow_t = flow_next = zeros
    else:
        if "fl_next" in batch.extras:
            fl_next, fl_t = batch.extras["fl_next"], batch.extras["fl_t"]
        elif terminal_only:  # the exact reward gradient at x_T, no forward-looking term elsewhere
            fl = forward_looking_fn(task, opts)
            with nvtx_range("next_state"):
                fl_next = forward_looking_at_terminal_rows(fl, x_next, step_next, ab_next, terminal, cond,
                                                           batch.extras.get("fl_noise_next"))
            fl_t = zeros
        else:
            fl = forward_looking_fn(task, opts)
            with nvtx_range("next_state"):
                fl_next = fl(x_next, step_next, ab_next, terminal, cond, batch.extras.get("fl_noise_next"))
            if not fold:
                fl_t = (
                    fl(x_t, step, c["alpha_bar"], torch.zeros_like(terminal), cond, batch.extras.get("fl_noise_t"))
                    if use_reverse
                    else zeros
                )
        flow_next = task.flow(x_next, step + 1, cond)
        if target_flow is not None:  # the forward target reads the averaged flow; ||g(x_T)||^2 trains the live one
            t_mask = terminal.reshape((-1,) + (1,) * (x_next.ndim - 1))
            flow_next = torch.where(t_mask, flow_next, target_flow(x_next, step + 1, cond).to(flow_next.dtype))
        flow_t = task.flow(x_t, step, cond) if use_reverse else zeros

    w_f = opts.forward_scale * loss_weight(opts.weight_forward, c["b"], c["sigma"])
    w_b = (opts.reverse_scale if use_reverse else 0.0) * loss_weight(opts.weight_reverse, c["b"], c["sigma"])
    release = opts.terminal == "release"
    if release:  # D1: no reverse loss on terminal transitions (the release zeroes its target there)
        w_b = w_b * (~terminal).to(w_b.dtype)
    terms = residual_nabla_db_loss_fused(
        x_t=x_t, x_next=x_next, eps_theta=eps_theta, eps_pretrained=eps_pretrained,
        vjp_theta=vjp_theta, vjp_pretrained=vjp_pretrained,
        fl_t=fl_t, fl_next=fl_next, flow_t=flow_t, flow_next=flow_next,
        a=c["a"], b=c["b"], sigma=c["sigma"], terminal=terminal, w_forward=w_f, w_reverse=w_b,
        eps_old=batch.eps_old, output_reg=opts.output_reg, prior_strength=opts.prior_strength,
        detach_reverse=not opts.second_order, forward_trains_flow=opts.forward_trains_flow,
        reverse_target=folded_target if fold else (batch.extras.get("flow_target") if pathwise else None),
    )
    info: dict[str, Diagnostic] = {
        "loss": (terms.total.detach(), None),
        "loss_forward": (terms.forward.detach(), None),
        "loss_reverse": (terms.reverse.detach(), None if use_reverse else torch.zeros_like(terminal)),
        "loss_terminal": (terms.terminal.detach(), terminal),
        "loss_output_reg": (terms.output_reg.detach(), None),
    }
    total = terms.total
    if release:  # D2: the terminal loss averaged over this micro-batch's terminal rows (no host sync)
        total = total + terms.terminal * (terminal.numel() / terminal.sum().clamp(min=1) - 1.0)
    return total, info
