"""Reference residual DB loss with forward-looking log-flow (paper eq. 20; the DB form of eq. 50).

The residual DB condition ``F~(x_t) P_F(x_{t+1}|x_t) = P_F#(x_{t+1}|x_t)^eta_p F~(x_{t+1})`` in log
space, with the forward-looking parametrisation of the scalar residual log-flow

    log F~(x_s) = beta gamma_s log R(x_hat(x_s)) + g_phi(x_s),     log F~(x_T) = beta log R(x_T),

gives per transition

    L = ( log F~(x_t) + log P_F(x_{t+1}|x_t) - eta_p log P_F#(x_{t+1}|x_t) - log F~(x_{t+1}) )^2.

Eq. 20 in the paper prints only the ``x_{t+1}`` side of the flow; the condition it derives from
(eq. 50, a telescoping form of Remark 5) has both, which is what is implemented here.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def forward_looking_log_flow(
    log_reward_xhat: Tensor, gamma: Tensor, beta: float, flow: Tensor, terminal: Tensor
) -> Tensor:
    """``beta gamma_s log R(x_hat(x_s)) + g(x_s)``, and ``beta log R(x_T)`` where ``terminal`` (all ``[B]``).

    At terminal states ``log_reward_xhat`` must be ``log R(x_T)`` (``x_hat(x_T) = x_T``)."""
    return torch.where(terminal, beta * log_reward_xhat, beta * gamma * log_reward_xhat + flow)


def residual_db_loss(
    *,
    log_pf: Tensor,
    log_pf_pretrained: Tensor,
    log_flow_t: Tensor,
    log_flow_next: Tensor,
    prior_strength: float = 1.0,
) -> Tensor:
    """Per-sample residual DB loss ``[B]`` (see module docstring).

    Args:
        log_pf: ``log P_F(x_{t+1}|x_t)`` of the fine-tuned policy (graph to its parameters).
        log_pf_pretrained: ``log P_F#(x_{t+1}|x_t)`` of the pretrained policy (constant).
        log_flow_t, log_flow_next: residual log-flows ``log F~`` at ``x_t`` and ``x_{t+1}``
            (:func:`forward_looking_log_flow`; the terminal one is ``beta log R(x_T)``).
    """
    shapes = {t.shape for t in (log_pf, log_pf_pretrained, log_flow_t, log_flow_next)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"residual_db_loss expects four [B] tensors, got shapes {sorted(shapes)}")
    delta = log_flow_t + log_pf - prior_strength * log_pf_pretrained - log_flow_next
    return delta**2
