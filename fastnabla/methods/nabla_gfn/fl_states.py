"""Forward-looking (FL) gradients at stored states: per-state tables, keyed smoothing noise.

The FL term ``beta gamma_s grad log R(decode(x_hat(x_s)))`` (eq. 15) is a constant of the loss. When it
does not depend on the parameters being trained (``fl_model='pretrained'``) it is computed once per
*state* (not twice per transition) and only at the states the training plan touches
(:class:`~fastnabla.training.plan.StateTable`). Its smoothing noise is keyed by (iteration, trajectory,
state) so that resumed and multi-process runs draw the same noise.
"""

from __future__ import annotations

import torch

from fastnabla.methods.nabla_gfn.options import NablaGFNOptions, forward_looking_kwargs
from fastnabla.ops.forward_looking import forward_looking_gradient_fused
from fastnabla.training.interface import DiffusionTask, select_cond
from fastnabla.training.plan import StateTable
from fastnabla.training.rng import keyed_normal
from fastnabla.training.trajectories import Trajectories

Tensor = torch.Tensor


def decoder_of(task: DiffusionTask, surrogate: bool = False) -> dict:
    """Keyword arguments of the fused FL op for ``task``'s decoder: the raw decoder with the image
    post-processing fused in the op when the task exposes ``decode_raw`` (Stable Diffusion), else
    ``decode``.

    ``surrogate=True`` (``method.fl_decoder='surrogate'``, for non-terminal states only): the task's cheap surrogate
    ``fl_surrogate_decode_raw`` instead (Stable Diffusion with ``sd.fl_surrogate_decoder``). The FL term at a
    non-terminal state is a baseline of the flow, ``log F(x_s) = beta gamma_s log R(decode(x_hat(x_s))) + g(x_s)``
    (eq. 15): any decoder gives a valid parametrisation, the flow network ``g`` absorbs the difference. At ``x_T``
    ``log F(x_T) = beta log R(x_T)`` must hold exactly, so terminal rows never take this path.

    Raises:
        ValueError: ``surrogate`` for a task without a surrogate decoder (names ``sd.fl_surrogate_decoder``).
    """
    if surrogate:
        raw = getattr(task, "fl_surrogate_decode_raw", None)
        if raw is None or not getattr(task, "has_fl_surrogate", False):
            raise ValueError("method.fl_decoder='surrogate' needs a task with a surrogate decoder: set "
                             "sd.fl_surrogate_decoder (a diffusers AutoencoderTiny directory or hub id, e.g. "
                             "madebyollin/taesd for SD 1.5, or 'digits' on a digits pipeline)")
        return {"decode": raw, "postprocess": True, "decoder_dtype": getattr(task, "fl_surrogate_dtype", None)}
    raw = getattr(task, "decode_raw", None)
    if raw is None:
        return {"decode": task.decode}
    return {"decode": raw, "postprocess": True, "decoder_dtype": getattr(task, "decoder_dtype", None)}


def reward_of_rows(task: DiffusionTask, cond):
    """``log R`` of decoded rows given the sample index of each row (rows of one sample share its conditioning)."""
    return lambda images, sample_index: task.log_reward(images, select_cond(cond, sample_index.cpu()))


def forward_looking_fn(task: DiffusionTask, opts: NablaGFNOptions, fl_model: str | None = None):
    """``fl(x, step, alpha_bar, terminal, cond, noise=None, network_cotangent=None) -> FL gradient`` for ``task``
    with ``opts``.

    ``step`` is the (clamped) step index whose network predicts ``x_hat``; ``noise`` (``[K, B, ...]``)
    the smoothing draws when ``opts.fl_noise_var > 0``. Computed by the fused, chunked FL op
    (:func:`fastnabla.ops.forward_looking.forward_looking_gradient_fused`); each decoded copy is scored
    with its own sample's conditioning. With ``network_cotangent`` ``w`` (non-terminal rows only) ``fl`` returns
    ``(FL gradient, J_eps(x)^T w)``, the second from the same network forward (the pathwise sweep's VJP).
    """
    fl_eps = task.policy_eps if (fl_model or opts.fl_model) == "policy" else task.pretrained_eps

    terminal_strength = task.mdp.alpha_bar_terminal if opts.terminal == "release" else 1.0
    surrogate = opts.fl_decoder == "surrogate"
    if surrogate:
        decoder_of(task, surrogate=True)  # fail early, naming the missing setting

    def fl_call(x: Tensor, step: Tensor, alpha_bar: Tensor, terminal: Tensor, cond, noise: Tensor | None,
                network_cotangent: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        # with the surrogate, a call holds only terminal or only non-terminal rows (fl splits mixed batches)
        decoder = decoder_of(task, surrogate=surrogate and not bool(terminal.all()))
        res = forward_looking_gradient_fused(
            x, alpha_bar, terminal, lambda y: fl_eps(y, step, cond), reward_of_rows(task, cond), noise=noise,
            chunk_size=opts.fl_chunk_size or None, reward_sample_index=True, network_cotangent=network_cotangent,
            **decoder, **forward_looking_kwargs(opts),
        )
        out = (res[0] if network_cotangent is not None else res).to(x.dtype)
        if terminal_strength != 1.0:  # D3: the release's strength at x_T is abar after the last step, not 1
            scale = torch.where(terminal, terminal_strength, 1.0).to(out.dtype)
            out = out * scale.reshape((-1,) + (1,) * (out.ndim - 1))
        return out if network_cotangent is None else (out, res[1])

    def fl(x: Tensor, step: Tensor, alpha_bar: Tensor, terminal: Tensor, cond, noise: Tensor | None = None,
           network_cotangent: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        # A batch mixing terminal and other states is split so that the network runs on the non-terminal rows only
        # (x_hat(x_T) = x_T). Draws from the global generator (noise=None with smoothing) keep the unsplit order,
        # except with the surrogate decoder, whose terminal rows must be decoded exactly (split in any case).
        mixed = bool(terminal.any()) and not bool(terminal.all())
        if not mixed or network_cotangent is not None or (noise is None and opts.fl_noise_var > 0 and not surrogate):
            return fl_call(x, step, alpha_bar, terminal, cond, noise, network_cotangent)
        out = torch.empty_like(x)
        for rows in (terminal.nonzero(as_tuple=True)[0], (~terminal).nonzero(as_tuple=True)[0]):
            sub_noise = None if noise is None else noise[:, rows.to(noise.device)]
            out[rows] = fl_call(x[rows], step[rows], alpha_bar[rows], terminal[rows], select_cond(cond, rows.cpu()),
                                sub_noise)
        return out

    return fl


def forward_looking_at_terminal_rows(fl, x: Tensor, step: Tensor, alpha_bar: Tensor, terminal: Tensor, cond,
                                     noise: Tensor | None = None) -> Tensor:
    """``fl`` (:func:`forward_looking_fn`) on the terminal rows only, zeros elsewhere (``method.forward_looking=
    'terminal'``): at ``x_T`` no network runs (``x_hat(x_T) = x_T``), and no other row is decoded or scored."""
    out = torch.zeros_like(x)
    rows = terminal.nonzero(as_tuple=True)[0]
    if rows.numel():
        sub_noise = None if noise is None else noise[:, rows.to(noise.device)]
        out[rows] = fl(x[rows], step[rows], alpha_bar[rows], terminal[rows], select_cond(cond, rows.cpu()), sub_noise)
    return out


def fl_noise(seed: int, iteration: int, traj_index: Tensor, state: Tensor, num_noise: int, shape) -> Tensor:
    """Smoothing draws ``[K, B, *shape]`` of the FL gradient, keyed by ``(iteration, trajectory, state)``."""
    keys = [("fl", iteration, int(i), int(s)) for i, s in zip(traj_index.tolist(), state.tolist(), strict=True)]
    return keyed_normal(seed, keys, (num_noise, *shape)).transpose(0, 1)


def forward_looking_table(
    task: DiffusionTask,
    traj: Trajectories,
    opts: NablaGFNOptions,
    mask: Tensor | None = None,
    chunk: int = 8192,
    noise_key: tuple[int, int] | None = None,
) -> StateTable:
    """FL gradients (constants) at the states of ``traj`` selected by ``mask`` (``[N, T+1]`` bool; all by default).

    ``noise_key = (seed, iteration)`` keys the smoothing noise per (trajectory, state) when
    ``opts.fl_noise_var > 0`` (otherwise the global generator draws it).
    """
    mdp = task.mdp
    n, T = traj.num, traj.num_steps
    mask = torch.ones(n, T + 1, dtype=torch.bool) if mask is None else mask.cpu()
    rows, states = mask.nonzero(as_tuple=True)
    fl = forward_looking_fn(task, opts)
    shape = tuple(traj.states.shape[2:])
    out = torch.zeros((rows.numel(), *shape), dtype=traj.states.dtype, device=traj.states.device)
    computed = torch.arange(rows.numel())
    if opts.forward_looking == "terminal":  # zero at every other state (the flow absorbs it)
        computed = computed[states == T]
    for i in range(0, computed.numel(), chunk):
        at = computed[i : i + chunk]
        r, s = rows[at], states[at]
        x = traj.states[r.to(traj.states.device), s.to(traj.states.device)]
        terminal = (s == T).to(x.device)
        step = s.clamp(max=T - 1).to(x.device)
        ab = mdp.gather(step, x.ndim, x.dtype)["alpha_bar"]
        noise = None
        if opts.fl_noise_var > 0 and noise_key is not None:
            noise = fl_noise(*noise_key, traj.index[r], s, opts.fl_num_noise, shape)
        out[at.to(out.device)] = fl(x, step, ab, terminal, select_cond(traj.cond, r), noise)
    return StateTable.build(mask, out)


def state_forward_looking(
    task: DiffusionTask, traj: Trajectories, opts: NablaGFNOptions, chunk: int = 8192
) -> Tensor:
    """FL gradient at every state of every trajectory, ``[N, T+1, ...]`` (constant)."""
    return forward_looking_table(task, traj, opts, chunk=chunk).dense()
