"""Reference DAG-DB loss: log-space detailed balance with a forward-looking scalar flow (DAG paper).

The GFlowNet DB condition (paper eq. 5) with the fixed noising process as backward policy,

    L = ( log F(x_t) + log P_F(x_{t+1}|x_t) - log P_B(x_t|x_{t+1}) - log F(x_{t+1}) )^2     (eq. 4)

with ``log F(x_s) = beta gamma_s log R(x_hat(x_s)) + g_phi(x_s)`` and ``log F(x_T) = beta log R(x_T)``
(forward-looking, as in Zhang et al., "Improving GFlowNets for text-to-image diffusion alignment").
Its target is ``R^beta`` alone, without the pretrained prior: the baseline that residual DB fixes.

The backward policy is the variance-preserving noising step from ``x_{t+1}`` (less noisy) to ``x_t``:
``P_B(x_t | x_{t+1}) = N(sqrt(abar_t / abar_{t+1}) x_{t+1}, (1 - abar_t / abar_{t+1}) I)``.
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


def noising_log_prob(x_t: Tensor, x_next: Tensor, alpha_bar_t: Tensor, alpha_bar_next: Tensor) -> Tensor:
    """``log P_B(x_t | x_{t+1})`` of the VP noising step, summed over non-batch dims (``[B]``).

    ``alpha_bar_t`` / ``alpha_bar_next`` broadcast to ``x_t`` (``[B, 1, ...]``); needs ``abar_t < abar_{t+1}``."""
    ratio = alpha_bar_t / alpha_bar_next
    if bool((ratio >= 1).any()):
        raise ValueError("noising_log_prob needs abar_t < abar_{t+1} (x_t noisier than x_{t+1})")
    var = (1 - ratio).expand_as(x_t)
    quad = (x_t - ratio.sqrt() * x_next) ** 2 / var
    per = -0.5 * (quad + var.log() + math.log(2 * math.pi))
    return per.reshape(per.shape[0], -1).sum(1)


def dag_db_loss(*, log_pf: Tensor, log_pb: Tensor, log_flow_t: Tensor, log_flow_next: Tensor) -> Tensor:
    """Per-sample DB loss ``[B]``; all inputs ``[B]`` (``log_flow_next`` is ``beta log R(x_T)`` at the end)."""
    shapes = {t.shape for t in (log_pf, log_pb, log_flow_t, log_flow_next)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"dag_db_loss expects four [B] tensors, got shapes {sorted(shapes)}")
    return (log_flow_t + log_pf - log_pb - log_flow_next) ** 2
