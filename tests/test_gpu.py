"""What only a CUDA machine can check: the compiled Triton kernels of every op against their references (values and
every gradient, fp32 and bf16), ``torch.compile(fullgraph=True)`` through the custom ops, CUDA-graph capture of the
sampling UNet, and a tiny Stable Diffusion training step on the GPU against the same step on the CPU.

Skipped without CUDA (CI has none); ``python profiles/gpu_check.py`` runs it on a GPU machine and writes a report.
``FASTNABLA_GPU_TESTS_ON=cpu`` runs the kernel comparisons on CPU tensors through Triton's interpreter instead (a dry
run of this file where there is no GPU).
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

DEVICE = os.environ.get("FASTNABLA_GPU_TESTS_ON", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPES = [pytest.param(torch.float32, 1e-5, id="fp32"), pytest.param(torch.bfloat16, 2e-2, id="bf16")]


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("FASTNABLA_BACKEND", "triton")
    if DEVICE == "cuda":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30))


def _coefficients(batch: int):
    from fastnabla.mdp.schedule import SD15_SCHEDULER_CONFIG, build_mdp

    mdp = build_mdp(SD15_SCHEDULER_CONFIG, 50, "ddim", 1.0)
    step = torch.arange(batch) * 7 % 50
    return {k: v[step].float().to(DEVICE) for k, v in (("a", mdp.a), ("b", mdp.b), ("sigma", mdp.sigma),
                                                  ("alpha_bar", mdp.alpha_bar))}


@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_denoise_step_kernel_matches_reference(dtype, tol):
    from fastnabla.ops import denoise_step_fused, denoise_step_reference

    g = torch.Generator(device=DEVICE).manual_seed(0)
    shape = (5, 4, 64, 64)
    x, eps, eps_c, z = (torch.randn(shape, generator=g, device=DEVICE).to(dtype).requires_grad_() for _ in range(4))
    c = _coefficients(5)
    fused = denoise_step_fused(x, eps, z, c["a"], c["b"], c["sigma"], c["alpha_bar"], eps_cond=eps_c,
                               guidance_scale=5.0)
    ref = denoise_step_reference(x, eps, z, c["a"], c["b"], c["sigma"], c["alpha_bar"], eps_cond=eps_c,
                                 guidance_scale=5.0)
    up = [torch.randn(shape, generator=g, device=DEVICE).to(dtype) for _ in range(2)]
    grads_f = torch.autograd.grad(fused, (x, eps, eps_c, z), up)
    grads_r = torch.autograd.grad(ref, (x, eps, eps_c, z), up)
    for a, b in zip((*fused, *grads_f), (*ref, *grads_r), strict=True):
        assert _rel(a, b) <= tol


@pytest.mark.skipif(DEVICE != "cuda", reason="compiles for the GPU")
def test_every_op_compiles_fullgraph_on_cuda():
    from fastnabla.ops import denoise_step_fused

    c = _coefficients(3)

    @torch.compile(fullgraph=True)
    def step(x, eps, z):
        return denoise_step_fused(x, eps, z, c["a"], c["b"], c["sigma"], c["alpha_bar"])

    x = torch.randn(3, 4, 32, 32, device=DEVICE, requires_grad=True)
    out, _ = step(x, torch.randn_like(x), torch.randn_like(x))
    out.sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())


def _compare(fused_fn, reference_fn, inputs: list[torch.Tensor], tol: float) -> None:
    """Every output and every input gradient (random upstream gradients) of the Triton path against the reference
    evaluated in fp32 on the same values (the kernels compute in fp32 and round once)."""
    g = torch.Generator(device=DEVICE).manual_seed(1)
    wide = [t.detach().float().requires_grad_() for t in inputs]
    outs_f = [o for o in fused_fn(*inputs) if isinstance(o, torch.Tensor)]
    outs_r = [o for o in reference_fn(*wide) if isinstance(o, torch.Tensor)]
    assert len(outs_f) == len(outs_r)
    ups = [torch.randn(o.shape, generator=g, device=DEVICE) for o in outs_r]
    grads_f = torch.autograd.grad(outs_f, inputs, [u.to(o.dtype) for u, o in zip(ups, outs_f, strict=True)],
                                  allow_unused=True)
    grads_r = torch.autograd.grad(outs_r, wide, ups, allow_unused=True)
    for a, b in zip(outs_f, outs_r, strict=True):
        assert _rel(a, b) <= tol
    for a, b in zip(grads_f, grads_r, strict=True):
        assert (a is None) == (b is None) and (a is None or _rel(a, b) <= tol)


def _states(batch: int, dtype: torch.dtype, n: int, shape=(4, 32, 32)) -> list[torch.Tensor]:
    g = torch.Generator(device=DEVICE).manual_seed(0)
    return [torch.randn((batch, *shape), generator=g, device=DEVICE).to(dtype).requires_grad_() for _ in range(n)]


@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_transition_scores_kernel_matches_reference(dtype, tol):
    from fastnabla.ops import transition_scores_fused, transition_scores_reference

    c = _coefficients(6)
    x, xn, eps, eps_pretrained, cot = _states(6, dtype, 5)
    coeffs = (c["a"], c["b"], c["sigma"], c["alpha_bar"])
    _compare(lambda *t: transition_scores_fused(*t[:4], *coeffs, 0.8, t[4]),
             lambda *t: transition_scores_reference(*t[:4], *coeffs, 0.8, t[4]), [x, xn, eps, eps_pretrained, cot], tol)


@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_nabla_db_loss_kernel_matches_reference(dtype, tol):
    from fastnabla.ops import residual_nabla_db_loss, residual_nabla_db_loss_fused

    c = _coefficients(6)
    names = ["x_t", "x_next", "eps_theta", "eps_pretrained", "vjp_theta", "vjp_pretrained", "fl_t", "fl_next", "flow_t",
             "flow_next", "eps_old"]
    tensors = _states(6, dtype, len(names))
    coeffs = {k: c[k].reshape(-1, 1, 1, 1) for k in ("a", "b", "sigma")}
    terminal = torch.tensor([False, True, False, False, True, False], device=DEVICE)

    def call(fn):
        def run(*t):
            terms = fn(**dict(zip(names, t, strict=True)), **coeffs, terminal=terminal, output_reg=0.3,
                       prior_strength=0.9)
            return tuple(getattr(terms, f.name) for f in dataclasses.fields(terms))

        return run

    _compare(call(residual_nabla_db_loss_fused), call(residual_nabla_db_loss), tensors, max(tol, 1e-4))


@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_image_postprocess_kernel_matches_reference(dtype, tol):
    from fastnabla.ops import image_postprocess, image_postprocess_reference

    (raw,) = _states(3, dtype, 1, (3, 64, 64))
    _compare(lambda t: (image_postprocess(t),), lambda t: (image_postprocess_reference(t),), [raw], tol)


def test_forward_looking_kernels_match_reference():
    from fastnabla.ops import forward_looking_pixel_gradient, forward_looking_pixel_gradient_reference

    g = torch.Generator(device=DEVICE).manual_seed(2)
    x_hat = torch.randn(4, 3, 16, 16, generator=g, device=DEVICE)
    scale = torch.rand(4, generator=g, device=DEVICE) + 0.5
    noise = torch.randn(3, 4, 3, 16, 16, generator=g, device=DEVICE)
    target = torch.rand(3, generator=g, device=DEVICE)

    def log_r(images):
        return -((images.mean(dim=(2, 3)) - target) ** 2).sum(1)

    v, lr = forward_looking_pixel_gradient(x_hat, scale, None, log_r, 2e-3, 3, noise=noise, postprocess=True)
    v_ref, lr_ref = forward_looking_pixel_gradient_reference(x_hat, scale, None, log_r, noise, 2e-3, postprocess=True)
    assert _rel(v, v_ref) <= 1e-4 and _rel(lr, lr_ref) <= 1e-5


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs")
def test_cuda_graph_sampling_and_a_training_step_match_the_cpu():
    from fastnabla.config.loader import build_config
    from fastnabla.run.config import RunConfig
    from fastnabla.run.driver import build_trainer
    from fastnabla.run.presets import get_preset
    from fastnabla.tasks.sd.build import build_sd_task

    overrides = ["sd.num_steps=4", "train.batch_size=4", "train.iterations=2", "name=gpu"]
    states = {}
    for device, extra in (("cpu", []), ("cuda", ["sd.speed.cuda_graphs=true", "sd.frozen_dtype=fp32",
                                                  "sd.speed.tf32=false"])):
        cfg = build_config(RunConfig, get_preset("tiny-sd"), None, [*overrides, *extra])
        torch.manual_seed(cfg.seed)
        task = build_sd_task(cfg.sd, device, seed=cfg.seed)
        trainer = build_trainer(task, cfg)
        trainer.step()
        trainer.step()
        states[device] = {k: v.detach().float().cpu() for k, v in task.trainable_state_dict().items()}
    worst = max(_rel(states["cuda"][k], states["cpu"][k]) for k in states["cpu"] if states["cpu"][k].abs().max() > 0)
    assert worst <= 1e-3, worst
