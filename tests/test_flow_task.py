"""The SD3 / FLUX task against diffusers' own pipelines over the same tiny weights: prompt embeddings against
``encode_prompt``; every step of our SDE at noise level 0 against the pipeline's Euler ODE step from the pipeline's
own state (the transformer wrapper eps = eps_x y + eps_v v(c y, 1000 s), CFG / the guidance embedding, FLUX's
packing, the schedule); whole samples and decoded images with an exported LoRA against the pipeline with that LoRA
loaded; the SDE step's mean and spread against Flow-GRPO's formula; the task's errors."""

from __future__ import annotations

import pytest
import torch
from test_flow_task_common import (
    GUIDANCE,
    TOKENS,
    build_tiny_flow_task,
    flow_pipeline,
    perturb_lora,
    pipeline_run,
    tiny_flow_config,
)

from fastnabla.tasks.flow.tiny import tiny_pipeline_dir
from fastnabla.tasks.sd.sampling import sample_images

PROMPTS, SEEDS = ["cat", "a red fox on the grass"], [3, 4]
FAMILIES = [pytest.param("sd3", id="sd3"), pytest.param("flux", id="flux")]
pytestmark = pytest.mark.filterwarnings("ignore:No LoRA keys associated to CLIPTextModel")


@pytest.fixture(scope="module")
def pipeline_dirs(tmp_path_factory):
    """The tiny SD3 and FLUX pipelines of seed 0, saved for diffusers."""
    root = tmp_path_factory.mktemp("tiny-flow")
    return {f: tiny_pipeline_dir(root / f, f, 0) for f in ("sd3", "flux")}


EMBED_CASES = [
    pytest.param("sd3", True, id="sd3"),
    pytest.param("sd3", False, id="sd3-without-t5"),
    pytest.param("flux", True, id="flux"),
]


@pytest.mark.parametrize(("family", "use_t5"), EMBED_CASES)
def test_prompt_embeddings_equal_the_pipelines_encode_prompt(pipeline_dirs, family, use_t5):
    task = build_tiny_flow_task(tiny_flow_config(family, use_t5=use_t5, tiny_cache_dir=str(pipeline_dirs[family])))
    pipe = flow_pipeline(pipeline_dirs[family], family)
    prompts = [*PROMPTS, "a very long prompt " * 20]  # truncated by CLIP (77) and T5 (32 tokens here)
    embeds, pooled = task.encode_prompts(prompts)
    if family == "sd3":
        if not use_t5:
            pipe.text_encoder_3 = pipe.tokenizer_3 = None
        theirs, _, theirs_pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, device="cpu",
                                                         do_classifier_free_guidance=False,
                                                         max_sequence_length=TOKENS)
        assert embeds.shape == (3, 77 + TOKENS, 64) and pooled.shape == (3, 64)
    else:
        theirs, theirs_pooled, _ = pipe.encode_prompt(prompts, prompts, device="cpu", max_sequence_length=TOKENS)
        assert embeds.shape == (3, TOKENS, 32) and pooled.shape == (3, 32)
    torch.testing.assert_close(embeds, theirs, rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled, theirs_pooled, rtol=0, atol=1e-5)
    assert (embeds[0] - embeds[1]).abs().max() > 1e-2  # the prompts matter
    if family == "sd3" and not use_t5:
        assert embeds[:, 77:].abs().max() == 0


@pytest.mark.parametrize("lora", [pytest.param(False, id="pretrained"), pytest.param(True, id="lora")])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_ode_step_and_the_images_equal_the_pipelines(tmp_path, pipeline_dirs, family, lora):
    """Noise level 0: from the pipeline's own state x_t, our step (y = x / c_t, eps from the wrapper, y' = a y +
    b eps, x' = c_{t+1} y') is the pipeline's Euler step; sampled from the same seeds, our latents and decoded images
    are the pipeline's. With a LoRA (alpha != rank) exported by the task and loaded by the pipeline."""
    cfg = tiny_flow_config(family, noise_level=0.0, num_steps=4, tiny_cache_dir=str(pipeline_dirs[family]))
    cfg.lora.rank, cfg.lora.alpha = 4, 8.0
    task = build_tiny_flow_task(cfg)
    lora_dir = None
    if lora:
        perturb_lora(task)
        lora_dir = task.export_lora(tmp_path / "lora")
    images, states = pipeline_run(flow_pipeline(pipeline_dirs[family], family, lora_dir), family, PROMPTS, SEEDS, 4)
    mdp, cond = task.mdp, task.conditions_for(PROMPTS)
    assert len(states) == mdp.num_steps + 1 and bool((mdp.sigma == 0).all())
    worst = 0.0
    with torch.no_grad():
        for t in range(mdp.num_steps):
            step = torch.full((len(PROMPTS),), t)
            c = mdp.gather(step, 4)
            y = states[t] / c["scale"]
            y_next = c["a"] * y + c["b"] * task.policy_eps(y, step, cond)
            ours, theirs = c["scale_next"] * y_next, states[t + 1]
            worst = max(worst, float((ours - theirs).abs().max()))
            torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5)
    assert (states[-1] - states[0]).abs().max() > 0.1  # the steps moved the state (worst step error: `worst`)
    ours_images = sample_images(task, PROMPTS, SEEDS)
    torch.testing.assert_close(ours_images, images, rtol=0, atol=2e-5)
    pretrained = sample_images(task, PROMPTS, SEEDS, use_pretrained=True)
    if lora:
        assert (ours_images - pretrained).abs().max() > 1e-2  # the LoRA moved the samples far beyond the tolerance
    else:
        torch.testing.assert_close(ours_images, pretrained, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_sde_step_is_flow_grpos_around_the_pipelines_velocity(family):
    """At noise level 0.7 one step of the task from x_s has mean x (1 + sig^2 dt / 2s) + v (1 + sig^2 (1 - s) / 2s) dt
    and std sig sqrt(-dt), sig = 0.7 sqrt(s / (1 - s)) (s_1 in the denominator at s = 1), with v the velocity the
    same task's ODE step implies: Flow-GRPO's step (sd3_sde_with_logprob.py) around the pipeline's velocity."""
    sde = build_tiny_flow_task(tiny_flow_config(family, num_steps=5))
    ode = build_tiny_flow_task(tiny_flow_config(family, num_steps=5, noise_level=0.0))
    ode_table = sde.with_noise_level(0.0)  # the same task's table at another level: the ODE task's
    assert all(torch.equal(getattr(ode_table, k), getattr(ode.mdp, k)) for k in ("a", "b", "sigma", "scale", "eps_x"))
    cond = sde.conditions_for(PROMPTS)
    s_all = sde.mdp.flow_sigmas.double()
    x = torch.randn((2, *sde.latent_shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in (0, 2, 4):
            step = torch.full((2,), t)
            s, s_next = float(s_all[t]), float(s_all[t + 1])
            dt = s_next - s
            c = ode.mdp.gather(step, 4)
            v = (c["scale_next"] * (c["a"] * x / c["scale"] + c["b"] * ode.policy_eps(x / c["scale"], step, cond))
                 - x) / dt
            q = sde.mdp.gather(step, 4)
            y = x / q["scale"]
            mean = q["scale_next"] * (q["a"] * y + q["b"] * sde.policy_eps(y, step, cond))
            sig = 0.7 * (s / (1 - (s if s < 1 else float(s_all[1])))) ** 0.5
            expected = x * (1 + sig**2 * dt / (2 * s)) + v * (1 + sig**2 * (1 - s) / (2 * s)) * dt
            torch.testing.assert_close(mean.double(), expected.double(), rtol=0, atol=5e-5)
            assert abs(float(q["scale_next"].flatten()[0] * q["sigma"].flatten()[0]) - sig * (-dt) ** 0.5) < 1e-6


ERROR_CASES = [
    pytest.param({"family": "flux", "model": "tiny-sd3"}, "flow.family", id="family-mismatch"),
    pytest.param({"family": "flux", "model": "tiny-flux", "use_t5": False}, "flow.use_t5", id="flux-without-t5"),
    pytest.param({"resolution": 36}, "flow.resolution=36", id="resolution"),
]


@pytest.mark.parametrize(("changes", "message"), ERROR_CASES)
def test_bad_settings_name_the_field(changes, message):
    from fastnabla.config.fields import ConfigError

    family = changes.pop("family", "sd3")
    cfg = tiny_flow_config("sd3")
    cfg.family = family
    for k, v in changes.items():
        setattr(cfg, k, v)
    with pytest.raises((ValueError, ConfigError), match=message.replace(".", r"\.")):
        build_tiny_flow_task(cfg)


def test_lora_init_is_refused_naming_the_field():
    cfg = tiny_flow_config("sd3")
    cfg.lora.init = "some/lora"
    with pytest.raises(ValueError, match=r"flow\.lora\.init"):
        cfg.validate()


def test_guidance_reaches_the_networks():
    """SD3: CFG on the [2B] pair (w = 1 is the conditional half alone); FLUX: the guidance embedding's value changes
    the velocity (no pair)."""
    sd3 = build_tiny_flow_task(tiny_flow_config("sd3"))
    flux = build_tiny_flow_task(tiny_flow_config("flux"))
    assert sd3.guided and sd3.guidance_scale == GUIDANCE["sd3"] and not flux.guided
    assert flux.guidance_embed == GUIDANCE["flux"]
    cond = flux.conditions_for(PROMPTS)
    x, step = torch.randn((2, *flux.latent_shape)), torch.tensor([1, 1])
    with torch.no_grad():
        a = flux.policy_eps(x, step, cond)
        flux.guidance_embed = 1.0
        b = flux.policy_eps(x, step, cond)
    assert (a - b).abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_keeps_every_gradient(family):
    """flow.speed.gradient_checkpointing: the pretrained model's input VJP (taken after its adapters-off block has
    exited, as the trainer does) and the policy's input and LoRA gradients equal those without checkpointing."""
    grads = []
    for checkpointing in (False, True):
        cfg = tiny_flow_config(family)
        cfg.speed.gradient_checkpointing = checkpointing
        task = build_tiny_flow_task(cfg)
        perturb_lora(task)
        cond = task.conditions_for(PROMPTS)
        x = torch.randn((2, *task.latent_shape), generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        step = torch.tensor([1, 2])
        pre = task.pretrained_eps(x, step, cond)
        (g_pre,) = torch.autograd.grad(pre.square().sum(), x)
        pol = task.policy_eps(x, step, cond)
        params = task.policy_parameters()
        g_pol = torch.autograd.grad(pol.square().sum(), [x, *params])
        grads.append([g_pre, *g_pol])
        assert task.transformer.gradient_checkpointing == checkpointing
    assert (grads[0][0] - grads[0][1]).abs().max() > 1e-3  # pretrained and policy VJPs differ: the test can tell
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
