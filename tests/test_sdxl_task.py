"""The SDXL task against diffusers' StableDiffusionXLPipeline on the same tiny weights: prompt and pooled embeddings,
size / crop time ids, the UNet inputs of every denoising step, CFG pairs, the pretrained (adapters-off) UNet,
decoding with SDXL's VAE scaling, and the flow network's conditioning."""

from __future__ import annotations

import pytest
import torch
from test_sd_common import perturb_lora
from test_sdxl_common import (
    UNetRecorder,
    build_tiny_sdxl_task,
    pipeline_images,
    sdxl_pipeline,
    tiny_sdxl_config,
)

from fastnabla.ops import image_postprocess
from fastnabla.tasks.sd.sampling import sample_latents
from fastnabla.tasks.sd.tiny import SDXL_VAE_SCALING_FACTOR, build_tiny_sdxl_components, tiny_pipeline_dir
from fastnabla.training.interface import DiffusionTask, select_cond

PROMPTS = ["cat", "a red fox on the grass", "hedgehog"]
STEPS = torch.tensor([0, 2, 3])  # mixed transitions in one batch (4-step sampler)


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory):
    return tiny_pipeline_dir(tmp_path_factory.mktemp("tiny-sdxl") / "pipeline", seed=0, family="sdxl")


@pytest.fixture(scope="module")
def pipe(xl_dir):
    return sdxl_pipeline(xl_dir)


@pytest.fixture(scope="module")
def task(xl_dir):
    return build_tiny_sdxl_task(tiny_sdxl_config(tiny_cache_dir=str(xl_dir)))


@pytest.fixture(scope="module")
def perturbed(xl_dir):
    t = build_tiny_sdxl_task(tiny_sdxl_config(tiny_cache_dir=str(xl_dir)))
    perturb_lora(t)
    return t


def latents(n: int = 3, seed: int = 0, shape=(4, 8, 8)) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def test_implements_the_trainer_interface(task):
    assert isinstance(task, DiffusionTask) and task.family == "sdxl"
    assert task.latent_shape == (4, 8, 8) and task.image_size == (32, 32) and task.mdp.num_steps == 4
    assert torch.equal(task.time_ids, torch.tensor([32.0, 32.0, 0.0, 0.0, 32.0, 32.0]))


NEGATIVE_CASES = [
    # (sd.negative_prompt, sd.xl.empty_negative, the pipeline's negative_prompt argument)
    pytest.param("", "auto", None, id="empty-auto-is-zeros"),
    pytest.param("", "zeros", None, id="empty-zeros"),
    pytest.param("", "encode", "", id="empty-encoded"),
    pytest.param("blurry, low quality", "auto", "blurry, low quality", id="negative-prompt"),
]


@pytest.mark.parametrize(("negative", "mode", "pipe_negative"), NEGATIVE_CASES)
def test_embeddings_are_the_pipelines(xl_dir, pipe, negative, mode, pipe_negative):
    """Prompt embeddings (both encoders' penultimate states), pooled embeddings and the negative pair equal
    StableDiffusionXLPipeline.encode_prompt's (force_zeros_for_empty_prompt decides the empty negative)."""
    cfg = tiny_sdxl_config(tiny_cache_dir=str(xl_dir), negative_prompt=negative)
    cfg.xl.empty_negative = mode
    t = build_tiny_sdxl_task(cfg)
    cond = t.conditions_for(PROMPTS)
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True,
                                                         negative_prompt=pipe_negative and [pipe_negative] * 3)
    assert cond["prompt_embeds"].shape == (3, 77, 80) and cond["pooled_embeds"].shape == (3, 24)
    torch.testing.assert_close(cond["prompt_embeds"], embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond["pooled_embeds"], pooled, rtol=0, atol=1e-6)
    torch.testing.assert_close(t.negative_embeds.expand(3, -1, -1), neg, rtol=0, atol=1e-6)
    torch.testing.assert_close(t.negative_pooled.expand(3, -1), neg_pooled, rtol=0, atol=1e-6)
    assert (t.negative_embeds.abs().max() == 0) == (pipe_negative is None)


def test_second_tokenizer_pads_with_exclamation_marks(task):
    ids_1 = task.tokenizer("cat", padding="max_length", max_length=77).input_ids
    ids_2 = task.tokenizer_2("cat", padding="max_length", max_length=77).input_ids
    assert ids_1[:3] == ids_2[:3] and ids_1[-1] == task.tokenizer.eos_token_id and ids_2[-1] == 0


TIME_ID_CASES = [
    # (height, width, sd.xl overrides, expected time ids)
    pytest.param(0, 0, {}, (32, 32, 0, 0, 32, 32), id="square-default"),
    pytest.param(32, 48, {}, (32, 48, 0, 0, 32, 48), id="non-square"),
    pytest.param(48, 32, {"original_size": [96, 64], "crop_top_left": [4, 8], "target_size": [40, 24]},
                 (96, 64, 4, 8, 40, 24), id="explicit"),
]


@pytest.mark.parametrize(("height", "width", "xl", "expected"), TIME_ID_CASES)
def test_time_ids_are_the_pipelines(xl_dir, pipe, height, width, xl, expected):
    cfg = tiny_sdxl_config(tiny_cache_dir=str(xl_dir), height=height, width=width)
    for key, value in xl.items():
        setattr(cfg.xl, key, value)
    t = build_tiny_sdxl_task(cfg)
    h, w = height or 32, width or 32
    theirs = pipe._get_add_time_ids(tuple(xl.get("original_size", (h, w))), tuple(xl.get("crop_top_left", (0, 0))),
                                    tuple(xl.get("target_size", (h, w))), torch.float32,
                                    text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    assert t.time_ids.tolist() == list(expected) == theirs[0].tolist()
    assert t.latent_shape == (4, h // 4, w // 4) and t.decode(t.initial_noise(1)).shape == (1, 3, h, w)


UNET_INPUT_CASES = [
    pytest.param({}, {}, id="square"),
    pytest.param({"height": 32, "width": 48}, {"height": 32, "width": 48}, id="non-square"),
    pytest.param({"negative_prompt": "blurry"}, {"negative_prompt": ["blurry", "blurry"]}, id="negative-prompt"),
    pytest.param({"guidance_scale": 1.0}, {"guidance_scale": 1.0}, id="no-cfg"),
]


@pytest.mark.parametrize(("ours", "theirs"), UNET_INPUT_CASES)
def test_every_unet_call_receives_the_pipelines_inputs(xl_dir, ours, theirs):
    """Both samplers run 4 DDIM steps from the same seeds (policy with a random LoRA, exported to the pipeline) with
    a recorder on their UNet. Every call gets the same prompt embeddings, text_embeds (pooled, negative half first)
    and time_ids; our CFG-pair eps at the pipeline's own latents and timestep equals the pipeline's noise prediction
    of that step; the final latents (output_type='latent') agree."""
    prompts, seeds = PROMPTS[:2], [5, 6]
    t = build_tiny_sdxl_task(tiny_sdxl_config(tiny_cache_dir=str(xl_dir), **ours))
    perturb_lora(t, std=0.05)
    lora = t.export_lora(xl_dir.parent / f"lora-{'-'.join(sorted(ours)) or 'square'}")
    p = sdxl_pipeline(xl_dir, lora_dir=lora)
    mine, other = UNetRecorder(t.unet), UNetRecorder(p.unet)
    try:
        x_ours = sample_latents(t, prompts, seeds)
        x_theirs = pipeline_images(p, prompts, seeds, 4, output_type="latent", **theirs)
    finally:
        mine.close()
        other.close()
    assert len(mine.calls) == len(other.calls) == 4
    guided = ours.get("guidance_scale", 5.0) != 1.0
    rows = 4 if guided else 2
    cond = t.conditions_for(prompts)
    for i, (a, b) in enumerate(zip(mine.calls, other.calls, strict=True)):
        assert a["sample"].shape[0] == rows and set(a["added_cond_kwargs"]) == {"text_embeds", "time_ids"}
        assert torch.equal(a["timestep"].expand(rows), b["timestep"].expand(rows))
        torch.testing.assert_close(a["encoder_hidden_states"], b["encoder_hidden_states"], rtol=0, atol=1e-6)
        torch.testing.assert_close(a["added_cond_kwargs"]["text_embeds"], b["added_cond_kwargs"]["text_embeds"],
                                   rtol=0, atol=1e-6)
        assert torch.equal(a["added_cond_kwargs"]["time_ids"], b["added_cond_kwargs"]["time_ids"])
        x_i = b["sample"][rows // 2:] if guided else b["sample"]  # the pipeline's latents of this step
        with torch.no_grad():
            eps_u, eps_c = t.eps_pair(x_i, torch.full((2,), i), cond)
        pair = torch.cat([eps_u, eps_c]) if guided else eps_c
        torch.testing.assert_close(pair, b["output"], rtol=0, atol=1e-5)
    torch.testing.assert_close(mine.calls[0]["sample"], other.calls[0]["sample"], rtol=0, atol=0)
    torch.testing.assert_close(x_ours, x_theirs, rtol=1e-4, atol=1e-4)


def test_policy_equals_pretrained_at_init_and_differs_after_perturbing(task, perturbed):
    cond = task.conditions_for(PROMPTS)
    x = latents()
    with torch.no_grad():
        assert torch.equal(task.policy_eps(x, STEPS, cond), task.pretrained_eps(x, STEPS, cond))
        diff = (perturbed.policy_eps(x, STEPS, cond) - perturbed.pretrained_eps(x, STEPS, cond)).abs().max()
        assert torch.equal(perturbed.pretrained_eps(x, STEPS, cond), task.pretrained_eps(x, STEPS, cond))
    assert diff > 1e-2


def _direct_cfg(unet, t, x, step, cond, w):
    """CFG from two separate calls of ``unet``: (negative embeddings, negative pooled) and (prompt, pooled), the same
    time ids on both."""
    ts = t.mdp.timesteps[step]
    b = x.shape[0]
    ids = t.time_ids.to(x.dtype).expand(b, -1)
    neg = {"text_embeds": t.negative_pooled.to(x.dtype).expand(b, -1), "time_ids": ids}
    pos = {"text_embeds": cond["pooled_embeds"].to(x.dtype), "time_ids": ids}
    eps_u = unet(x, ts, encoder_hidden_states=t.negative_embeds.to(x.dtype).expand(b, -1, -1),
                 added_cond_kwargs=neg).sample
    eps_c = unet(x, ts, encoder_hidden_states=cond["prompt_embeds"].to(x.dtype), added_cond_kwargs=pos).sample
    return eps_u + w * (eps_c - eps_u)


@pytest.fixture(scope="module")
def perturbed_fp64(xl_dir):
    """A perturbed task with a non-empty negative prompt and the adapter-free UNet, both in float64."""
    t = build_tiny_sdxl_task(tiny_sdxl_config(tiny_cache_dir=str(xl_dir), negative_prompt="blurry"))
    perturb_lora(t)
    t.unet.double()
    return t, build_tiny_sdxl_components(seed=0).unet.double()


@pytest.mark.parametrize("w", [pytest.param(5.0, id="w5"), pytest.param(1.0, id="w1"), pytest.param(0.0, id="w0")])
def test_cfg_pair_matches_two_separate_unet_calls(perturbed_fp64, w):
    """The policy's one batched call equals two separate calls of the LoRA UNet; the pretrained pass equals the
    independently built UNet without adapters."""
    t, base = perturbed_fp64
    cond = t.conditions_for(PROMPTS)
    x = latents(seed=1).double()
    old = t.guidance_scale
    t.guidance_scale = w
    try:
        with torch.no_grad():
            policy = t.policy_eps(x, STEPS, cond)
            pretrained = t.pretrained_eps(x, STEPS, cond)
            direct_policy = _direct_cfg(t.unet, t, x, STEPS, cond, w)
            direct_base = _direct_cfg(base, t, x, STEPS, cond, w)
    finally:
        t.guidance_scale = old
    torch.testing.assert_close(policy, direct_policy.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(pretrained, direct_base.float(), rtol=0, atol=1e-6)
    assert (policy - pretrained).abs().max() > 1e-2


def test_pooled_embedding_and_time_ids_change_eps(task):
    """The added conditioning reaches the UNet: other pooled embeddings or other time ids change eps."""
    cond = task.conditions_for(PROMPTS)
    x = latents(seed=2)
    with torch.no_grad():
        eps = task.policy_eps(x, STEPS, cond)
        swapped = dict(cond, pooled_embeds=cond["pooled_embeds"].flip(0))
        assert (task.policy_eps(x, STEPS, swapped) - eps).abs().max() > 1e-4
        ids = task.time_ids.clone()
        task.time_ids.copy_(torch.tensor([64.0, 64.0, 0.0, 0.0, 64.0, 64.0]))
        try:
            assert (task.policy_eps(x, STEPS, cond) - eps).abs().max() > 1e-4
        finally:
            task.time_ids.copy_(ids)


def test_sample_conditions_carry_the_pooled_embedding(task):
    cond = task.sample_conditions(5, torch.Generator().manual_seed(2))
    assert cond["prompt_embeds"].shape == (5, 77, 80) and cond["pooled_embeds"].shape == (5, 24)
    picked = select_cond(cond, torch.tensor([4, 0]))
    assert torch.equal(picked["pooled_embeds"], cond["pooled_embeds"][[4, 0]])


def test_gradients_reach_lora_and_x_through_the_added_conditioning(perturbed):
    cond = perturbed.conditions_for(PROMPTS)
    x = latents(seed=3).requires_grad_(True)
    eps = perturbed.policy_eps(x, STEPS, cond)
    grads = torch.autograd.grad(eps.square().sum(), [x, *perturbed.policy_parameters()])
    assert grads[0].abs().max() > 0 and all(g is not None for g in grads[1:])
    x2 = latents(seed=3).requires_grad_(True)
    (g_ref,) = torch.autograd.grad(perturbed.pretrained_eps(x2, STEPS, cond).square().sum(), x2)
    assert (g_ref - grads[0]).abs().max() > 0


def test_decode_uses_the_sdxl_vae_scaling(task):
    z = latents(2, seed=4)
    with torch.no_grad():
        expected = image_postprocess(task.vae.decode(z / SDXL_VAE_SCALING_FACTOR).sample)
        assert task.vae.config.scaling_factor == SDXL_VAE_SCALING_FACTOR
        torch.testing.assert_close(task.decode(z), expected, rtol=0, atol=0)


def test_flow_is_conditioned_on_both_encoders_embeddings(task):
    """g_phi cross-attends to the 80-wide concatenated embeddings; it depends on the prompt and the state."""
    assert task.flow_net.config.cross_attention_dim == 80
    x = latents(2, seed=5)
    with torch.no_grad():
        by_prompt = task.flow(x, torch.tensor([2, 2]), task.conditions_for(["cat", "a blue whale"]))
        same = task.flow(x, torch.tensor([2, 2]), task.conditions_for(["cat", "cat"]))
        by_state = task.flow(x, torch.tensor([0, 4]), task.conditions_for(["cat", "cat"]))
    assert by_prompt.shape == x.shape
    assert (by_prompt[1] - same[1]).abs().max() > 0 and (by_state[1] - same[1]).abs().max() > 0


def test_fp16_frozen_weights_decode_in_fp32_with_gradients(task, xl_dir):
    """SDXL's VAE sets force_upcast: under sd.frozen_dtype=fp16 it stays fp32, so the decode (and its VJP) equals the
    fp32 task's exactly while the UNet is fp16."""
    half = build_tiny_sdxl_task(tiny_sdxl_config(tiny_cache_dir=str(xl_dir), frozen_dtype="fp16"))
    assert half.unet.dtype == torch.float16 and half.vae.dtype == torch.float32 == half.decoder_dtype
    z = latents(2, seed=6).requires_grad_(True)
    img = half.decode(z)
    (grad,) = torch.autograd.grad(img.square().sum(), z)
    z32 = z.detach().requires_grad_(True)
    img32 = task.decode(z32)
    (grad32,) = torch.autograd.grad(img32.square().sum(), z32)
    assert img.dtype == torch.float32
    torch.testing.assert_close(img, img32, rtol=0, atol=0)
    torch.testing.assert_close(grad, grad32, rtol=0, atol=0)
