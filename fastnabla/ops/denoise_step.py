"""Fused denoising step + Tweedie prediction, optionally with classifier-free guidance first.

Per element, with per-*sample* coefficients (a batch may mix timesteps)::

    eps    = eps_u + w (eps_c - eps_u)                    (only when ``eps_cond`` is given)
    x_next = a x + b eps + sigma z                        (one sampler step, DESIGN.md §1)
    x_hat  = (x - sqrt(1 - abar) eps) / sqrt(abar)        (Tweedie / one-step prediction)

Both outputs come from one pass over ``x``, ``eps`` (or ``eps_u``, ``eps_c``) and ``z``: the
fused kernel reads 3 (CFG: 4) tensors and writes 2, where the eager composition reads and writes
every intermediate. Arithmetic is fp32; outputs are in the input dtype.

Gradients flow to ``x``, ``eps`` (or ``eps_u``, ``eps_c``) and ``noise``. The coefficients and
``w`` are schedule constants: the fused op computes no gradient for them, and
:func:`denoise_step_fused` raises if one requires grad (use :func:`denoise_step_reference`, plain
autograd, for a learned schedule). No double backward. The backward saves no activations, only
the four ``[B]`` coefficient vectors.

Layers (the pattern of every op in :mod:`fastnabla.ops`):

* :func:`denoise_step_reference` -- pure torch, the oracle for tests and benchmarks and the CPU path;
* ``torch.ops.fastnabla.denoise_step`` (+ ``denoise_step_backward``) -- ``torch.library`` custom
  ops with fake and autograd registrations, so ``torch.compile(fullgraph=True)`` traces through
  the Triton launch; on a device without the Triton backend they run the reference maths;
* :func:`denoise_step_fused` -- the public entry: input checks, then the rule of
  :mod:`fastnabla.ops.dispatch` (Triton -> custom op; reference -> inline pure torch, which
  autograd and inductor see through).
"""

from __future__ import annotations

import numbers

import torch

from fastnabla.mdp.gaussian_policy import cfg_combine, denoise_step, tweedie_x0
from fastnabla.ops.dispatch import kernel_memory_format, select_backend

Tensor = torch.Tensor
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

__all__ = ["FLOAT_DTYPES", "denoise_step_backward_reference", "denoise_step_fused", "denoise_step_reference"]


def _per_sample(c: Tensor, ndim: int, dtype: torch.dtype) -> Tensor:
    return c.to(dtype).reshape((-1,) + (1,) * (ndim - 1))


def denoise_step_reference(
    x: Tensor,
    eps: Tensor,
    noise: Tensor,
    a: Tensor,
    b: Tensor,
    sigma: Tensor,
    alpha_bar: Tensor,
    eps_cond: Tensor | None = None,
    guidance_scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Pure-torch ``(x_next, x_hat)`` (maths in the module docstring); no input checks.

    Computes in ``promote(x.dtype, float32)`` (fp32 for fp32/bf16/fp16, fp64 for fp64 inputs, so
    it is also the float64 oracle) and returns outputs in ``x.dtype``. Coefficients may be ``[B]``
    or ``[B, 1, ..., 1]``; gradients flow to every input, coefficients included.
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    a_, b_, sigma_, abar_ = (_per_sample(c, x.dim(), compute) for c in (a, b, sigma, alpha_bar))
    x_c, e = x.to(compute), eps.to(compute)
    if eps_cond is not None:
        e = cfg_combine(e, eps_cond.to(compute), 1.0 if guidance_scale is None else guidance_scale)
    x_next = denoise_step(x_c, e, a_, b_, sigma_, noise.to(compute))
    x_hat = tweedie_x0(x_c, e, abar_)
    return x_next.to(x.dtype), x_hat.to(x.dtype)


def denoise_step_backward_reference(
    grad_next: Tensor,
    grad_hat: Tensor,
    a: Tensor,
    b: Tensor,
    sigma: Tensor,
    alpha_bar: Tensor,
    guidance_scale: float = 1.0,
    cfg: bool = False,
    needs: tuple[bool, bool, bool, bool] = (True, True, False, True),
) -> list[Tensor]:
    """Closed-form VJP of the step (pure torch, fp32 maths): the grads of ``(x, eps or eps_u,
    eps_c, noise)`` selected by ``needs``, in that order, in ``grad_next.dtype``::

        dx = a g_n + g_h / sqrt(abar);  deps = b g_n - sqrt(1-abar)/sqrt(abar) g_h;  dz = sigma g_n
        (CFG: d eps_u = (1 - w) deps, d eps_c = w deps)
    """
    compute = torch.promote_types(grad_next.dtype, torch.float32)
    nd = grad_next.dim()
    a_, b_, sigma_, abar_ = (_per_sample(c, nd, compute) for c in (a, b, sigma, alpha_bar))
    g_n, g_h = grad_next.to(compute), grad_hat.to(compute)
    need_x, need_eps, need_eps_c, need_z = needs
    out: list[Tensor] = []
    if need_x:
        out.append(a_ * g_n + g_h / abar_.sqrt())
    if need_eps or need_eps_c:
        deps = b_ * g_n - ((1 - abar_).sqrt() / abar_.sqrt()) * g_h
        if not cfg:
            out.append(deps)
        else:
            if need_eps:
                out.append((1 - guidance_scale) * deps)
            if need_eps_c:
                out.append(guidance_scale * deps)
    if need_z:
        out.append(sigma_ * g_n)
    return [t.to(grad_next.dtype) for t in out]


# ---------------------------------------------------------------- torch.library registration


@torch.library.custom_op("fastnabla::denoise_step", mutates_args=())
def _denoise_step_op(
    x: Tensor,
    eps: Tensor,
    noise: Tensor,
    a: Tensor,
    b: Tensor,
    sigma: Tensor,
    alpha_bar: Tensor,
    eps_cond: Tensor | None,
    guidance_scale: float,
) -> tuple[Tensor, Tensor]:
    if select_backend(x.device) == "triton":
        from fastnabla.kernels.denoise_step import denoise_step_forward

        return denoise_step_forward(x, eps, noise, a, b, sigma, alpha_bar, eps_cond, guidance_scale)
    fmt = kernel_memory_format(x)
    with torch.no_grad():
        outs = denoise_step_reference(x, eps, noise, a, b, sigma, alpha_bar, eps_cond, guidance_scale)
    x_next, x_hat = (t.contiguous(memory_format=fmt) for t in outs)
    return x_next, x_hat


@_denoise_step_op.register_fake
def _(x, eps, noise, a, b, sigma, alpha_bar, eps_cond, guidance_scale):
    fmt = kernel_memory_format(x)
    return torch.empty_like(x, memory_format=fmt), torch.empty_like(x, memory_format=fmt)


@torch.library.custom_op("fastnabla::denoise_step_backward", mutates_args=())
def _denoise_step_backward_op(
    grad_next: Tensor,
    grad_hat: Tensor,
    a: Tensor,
    b: Tensor,
    sigma: Tensor,
    alpha_bar: Tensor,
    guidance_scale: float,
    cfg: bool,
    need_x: bool,
    need_eps: bool,
    need_eps_cond: bool,
    need_noise: bool,
) -> list[Tensor]:
    needs = (need_x, need_eps, need_eps_cond, need_noise)
    if select_backend(grad_next.device) == "triton":
        from fastnabla.kernels.denoise_step import denoise_step_backward

        return denoise_step_backward(grad_next, grad_hat, a, b, sigma, alpha_bar, guidance_scale, cfg, needs)
    fmt = kernel_memory_format(grad_next)
    grads = denoise_step_backward_reference(grad_next, grad_hat, a, b, sigma, alpha_bar, guidance_scale, cfg, needs)
    return [g.contiguous(memory_format=fmt) for g in grads]


@_denoise_step_backward_op.register_fake
def _(grad_next, grad_hat, a, b, sigma, alpha_bar, guidance_scale, cfg, need_x, need_eps, need_eps_cond, need_noise):
    fmt = kernel_memory_format(grad_next)
    count = sum(map(bool, (need_x, need_eps, need_eps_cond, need_noise)))
    return [torch.empty_like(grad_next, memory_format=fmt) for _ in range(count)]


def _setup_context(ctx, inputs, output) -> None:
    _, _, _, a, b, sigma, alpha_bar, eps_cond, guidance_scale = inputs
    ctx.save_for_backward(a, b, sigma, alpha_bar)  # four [B] vectors: no activations are saved
    ctx.cfg = eps_cond is not None
    ctx.guidance_scale = guidance_scale


def _backward(ctx, grad_next: Tensor, grad_hat: Tensor):
    req = ctx.needs_input_grad  # (x, eps, noise, a, b, sigma, alpha_bar, eps_cond, guidance_scale)
    needs = (req[0], req[1], ctx.cfg and req[7], req[2])
    grads = iter(
        torch.ops.fastnabla.denoise_step_backward(
            grad_next, grad_hat, *ctx.saved_tensors, ctx.guidance_scale, ctx.cfg, *needs
        )
    )
    g_x, g_eps, g_eps_c, g_z = (next(grads) if need else None for need in needs)
    return g_x, g_eps, g_z, None, None, None, None, g_eps_c, None


_denoise_step_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- public entry point


def _check_inputs(x: Tensor, named: dict[str, Tensor | None], coeffs: dict[str, Tensor]) -> list[Tensor]:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; supported: {FLOAT_DTYPES}")
    if x.dim() < 1:
        raise ValueError("x must have a leading batch dimension, got a 0-d tensor")
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; all state tensors share one dtype")
        if t.shape != x.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but x has {tuple(x.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    batch = x.shape[0]
    out = []
    for name, c in coeffs.items():
        if not isinstance(c, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape [{batch}], got {type(c).__name__}")
        if not c.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {c.dtype}")
        if c.device != x.device:
            raise ValueError(f"{name} is on {c.device} but x is on {x.device}")
        if c.numel() != batch or (c.dim() > 1 and any(s != 1 for s in c.shape[1:])) or c.dim() == 0:
            raise ValueError(f"{name} must have shape [{batch}] (or [{batch}, 1, ..., 1]), got {tuple(c.shape)}")
        if c.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                f"{name} requires grad, but the fused op treats the coefficients as constants; "
                "use fastnabla.ops.denoise_step_reference to differentiate through the schedule"
            )
        out.append(c.reshape(batch).to(torch.float32).contiguous())
    return out


def denoise_step_fused(
    x: Tensor,
    eps: Tensor,
    noise: Tensor,
    a: Tensor,
    b: Tensor,
    sigma: Tensor,
    alpha_bar: Tensor,
    eps_cond: Tensor | None = None,
    guidance_scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """One denoising step and the Tweedie prediction of the *current* state, fused::

        eps    = eps + w (eps_cond - eps)          if eps_cond is given (CFG, w = guidance_scale)
        x_next = a x + b eps + sigma noise
        x_hat  = (x - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)

    Args:
        x, eps, noise: ``[B, ...]`` state, predicted noise (unconditional when ``eps_cond`` is
            given) and step noise ``z``; one dtype among fp32/bf16/fp16, one device.
        a, b, sigma, alpha_bar: per-sample coefficients, ``[B]`` or ``[B, 1, ..., 1]``, any float
            dtype (used in fp32), on ``x``'s device; constants (no gradient).
            ``alpha_bar`` must lie in ``(0, 1]`` (not checked: that would sync the device).
        eps_cond: conditional prediction for classifier-free guidance (needs ``guidance_scale``).
        guidance_scale: the CFG scale ``w`` (a Python number).

    Returns:
        ``(x_next, x_hat)`` in ``x.dtype``; differentiable w.r.t. ``x``, ``eps``, ``eps_cond``, ``noise``.

    Raises:
        TypeError: a non-tensor input or an unsupported / mismatched dtype.
        ValueError: mismatched shapes or devices, wrong coefficient shape, a coefficient that
            requires grad, or ``eps_cond`` / ``guidance_scale`` given without the other.
    """
    coeffs = _check_inputs(
        x, {"eps": eps, "noise": noise, "eps_cond": eps_cond},
        {"a": a, "b": b, "sigma": sigma, "alpha_bar": alpha_bar},
    )
    if (eps_cond is None) != (guidance_scale is None):
        raise ValueError("classifier-free guidance needs both eps_cond and guidance_scale (or neither)")
    if guidance_scale is not None and (
        isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real)
    ):
        raise TypeError(f"guidance_scale must be a Python number, got {type(guidance_scale).__name__}")
    w = 1.0 if guidance_scale is None else float(guidance_scale)
    if select_backend(x.device) == "reference":
        return denoise_step_reference(x, eps, noise, *coeffs, eps_cond=eps_cond, guidance_scale=w)
    return torch.ops.fastnabla.denoise_step(x, eps, noise, *coeffs, eps_cond, w)
