"""SDTask against independent references: direct UNet calls, finite differences, closed forms."""

from __future__ import annotations

import pytest
import torch
from test_sd_common import PromptLengthReward, build_tiny_task, perturb_lora, tiny_config

from fastnabla.mdp.schedule import build_mdp
from fastnabla.rewards.base import Reward
from fastnabla.tasks.sd.flow_net import flow_timesteps
from fastnabla.tasks.sd.lora import lora_parameters
from fastnabla.tasks.sd.tiny import build_tiny_components
from fastnabla.training.interface import DiffusionTask, select_cond

PROMPTS = ["cat", "a red fox", "hedgehog"]
STEPS = torch.tensor([0, 3, 5])  # mixed transitions in one batch (6-step sampler)


@pytest.fixture(scope="module")
def task():
    return build_tiny_task()


@pytest.fixture(scope="module")
def perturbed():
    t = build_tiny_task()
    perturb_lora(t)
    return t


@pytest.fixture(scope="module")
def base_unet():
    """The tiny UNet as built, without adapters: the independent pretrained model."""
    return build_tiny_components(seed=0).unet


def latents(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def direct_cfg(unet, task, x, step, cond, w):
    """CFG from two separate UNet calls (unconditional, conditional)."""
    ts = task.mdp.timesteps[step]
    neg = task.negative_embeds.to(x.dtype).expand(x.shape[0], -1, -1)
    eps_u = unet(x, ts, encoder_hidden_states=neg).sample
    eps_c = unet(x, ts, encoder_hidden_states=cond["prompt_embeds"]).sample
    return eps_u + w * (eps_c - eps_u)


def test_implements_the_trainer_interface(task):
    assert isinstance(task, DiffusionTask)
    assert task.latent_shape == (4, 8, 8) and task.resolution == 32 and task.mdp.num_steps == 6


def test_initial_noise_is_drawn_on_cpu_from_the_generator(task):
    x = task.initial_noise(5, torch.Generator().manual_seed(11))
    expected = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    assert x.dtype == torch.float32 and torch.equal(x, expected)


def test_sample_conditions(task):
    cond = task.sample_conditions(7, torch.Generator().manual_seed(2))
    again = task.sample_conditions(7, torch.Generator().manual_seed(2))
    assert cond["prompts"] == again["prompts"] and set(cond["prompts"]) <= set(task.prompts)
    assert cond["prompt_embeds"].shape == (7, 77, 32)
    tok = task.tokenizer(cond["prompts"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(cond["prompt_embeds"], task.text_encoder(tok)[0])
    picked = select_cond(cond, torch.tensor([4, 0]))
    assert picked["prompts"] == [cond["prompts"][4], cond["prompts"][0]]
    assert torch.equal(picked["prompt_embeds"], cond["prompt_embeds"][[4, 0]])


def test_negative_embedding_is_the_empty_prompt(task):
    assert task.negative_embeds.shape == (1, 77, 32)
    assert torch.equal(task.negative_embeds, task.encode_prompts([""]))


def test_policy_equals_reference_at_init_and_differs_after_perturbing(task, perturbed):
    cond = task.conditions_for(PROMPTS)
    x = latents()
    with torch.no_grad():
        assert torch.equal(task.policy_eps(x, STEPS, cond), task.pretrained_eps(x, STEPS, cond))
        diff = (perturbed.policy_eps(x, STEPS, cond) - perturbed.pretrained_eps(x, STEPS, cond)).abs().max()
        assert torch.equal(perturbed.pretrained_eps(x, STEPS, cond), task.pretrained_eps(x, STEPS, cond))
    assert diff > 1e-2


@pytest.fixture(scope="module")
def perturbed_fp64(base_unet):
    """A perturbed task and the adapter-free UNet in float64: batching and CFG arithmetic then agree
    to fp32 output rounding (the task returns fp32)."""
    t = build_tiny_task()
    perturb_lora(t)
    t.unet.double()
    return t, build_tiny_components(seed=0).unet.double()


@pytest.mark.parametrize("w", [pytest.param(5.0, id="w5"), pytest.param(1.0, id="w1"), pytest.param(0.0, id="w0")])
def test_cfg_matches_two_separate_unet_calls(perturbed_fp64, w):
    t, base = perturbed_fp64
    cond = t.conditions_for(PROMPTS)
    x = latents(seed=1).double()
    old = t.guidance_scale
    t.guidance_scale = w
    try:
        with torch.no_grad():
            policy = t.policy_eps(x, STEPS, cond)
            reference = t.pretrained_eps(x, STEPS, cond)
            cond64 = {"prompt_embeds": cond["prompt_embeds"].double()}
            expected_policy = direct_cfg(t.unet, t, x, STEPS, cond64, w)
            expected_reference = direct_cfg(base, t, x, STEPS, cond64, w)
    finally:
        t.guidance_scale = old
    assert policy.dtype == torch.float32
    for got, expected in ((policy, expected_policy), (reference, expected_reference)):
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-6 * float(expected.abs().max()))
    assert (policy - reference).abs().max() > 1e-2


def test_mixed_steps_use_each_samples_timestep(perturbed_fp64):
    t, _ = perturbed_fp64
    cond = t.conditions_for(PROMPTS)
    x = latents(seed=2).double()
    with torch.no_grad():
        batched = t.policy_eps(x, STEPS, cond)
        single = torch.cat([t.policy_eps(x[i : i + 1], STEPS[i : i + 1], select_cond(cond, torch.tensor([i])))
                            for i in range(3)])
        shifted = t.policy_eps(x, (STEPS + 1) % 6, cond)
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-6 * float(single.abs().max()))
    assert (batched - shifted).abs().amax(dim=(1, 2, 3)).min() > 1e-3


def test_v_prediction_is_converted_to_eps(perturbed_fp64):
    t, _ = perturbed_fp64
    cond = t.conditions_for(PROMPTS)
    x = latents(seed=3).double()
    mdp = t.mdp
    v_config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False,
                "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "v_prediction"}
    try:
        t.mdp = build_mdp(v_config, 6)
        with torch.no_grad():
            eps = t.policy_eps(x, STEPS, cond)
            v = direct_cfg(t.unet, t, x, STEPS, {"prompt_embeds": cond["prompt_embeds"].double()}, t.guidance_scale)
    finally:
        t.mdp = mdp
    abar = mdp.alpha_bar[STEPS].reshape(-1, 1, 1, 1)
    expected = abar.sqrt() * v + (1 - abar).sqrt() * x
    torch.testing.assert_close(eps.double(), expected, rtol=0, atol=1e-6 * float(expected.abs().max()))


def _fd_check(fn, x, seed: int):
    """<v, J u> by autograd vs extrapolated central differences (float64 network, fp32 outputs)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    v = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    xi = x.clone().requires_grad_(True)
    (vjp,) = torch.autograd.grad(fn(xi), xi, grad_outputs=v.float())

    def central(h: float) -> float:
        with torch.no_grad():
            return float((v * (fn(x + h * u).double() - fn(x - h * u).double())).sum()) / (2 * h)

    h = 2e-3  # Richardson extrapolation of two central differences: truncation error O(h^4)
    analytic, numeric = float((vjp.double() * u).sum()), (4 * central(h / 2) - central(h)) / 3
    assert abs(analytic - numeric) <= 1e-4 * max(abs(numeric), 1.0), (analytic, numeric)


def test_eps_vjp_wrt_x_matches_finite_differences():
    t = build_tiny_task()
    perturb_lora(t)
    t.unet.double()  # the task feeds x in the UNet's dtype: float64 makes the differences exact enough
    cond = t.conditions_for(PROMPTS)
    x = latents(seed=4).double()
    _fd_check(lambda y: t.policy_eps(y, STEPS, cond), x, seed=5)
    _fd_check(lambda y: t.pretrained_eps(y, STEPS, cond), x, seed=6)


def test_gradients_reach_lora_only_through_the_policy(perturbed):
    cond = perturbed.conditions_for(PROMPTS)
    x = latents(seed=5)
    params = perturbed.policy_parameters()
    upstream = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    grads = torch.autograd.grad(perturbed.policy_eps(x, STEPS, cond), params, upstream)
    assert all(g is not None and float(g.abs().sum()) > 0 for g in grads)
    ref = perturbed.pretrained_eps(x.clone().requires_grad_(True), STEPS, cond)
    assert not any(p.requires_grad for p in perturbed.unet.parameters() if all(p is not q for q in params))
    with pytest.raises(RuntimeError):  # nothing of the reference output depends on the LoRA weights
        torch.autograd.grad(ref, params, upstream)


def test_reference_call_inside_a_training_step_keeps_policy_gradients(perturbed):
    cond = perturbed.conditions_for(PROMPTS)
    x = latents(seed=6)
    params = perturbed.policy_parameters()
    upstream = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = torch.autograd.grad(perturbed.policy_eps(x, STEPS, cond), params, upstream)
    eps = perturbed.policy_eps(x, STEPS, cond)
    perturbed.pretrained_eps(x, STEPS, cond)  # switches adapters off and on while eps's graph is alive
    got = torch.autograd.grad(eps, params, upstream)
    assert all(p.requires_grad for p in params)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lora_weights_are_fp32_and_b_starts_at_zero(task):
    params = {n: p.detach() for n, p in task.unet.named_parameters() if "lora_" in n}
    assert params and all(p.dtype == torch.float32 for p in params.values())
    assert all(p.requires_grad for p in task.policy_parameters())
    assert all(float(p.abs().max()) == 0 for n, p in params.items() if ".lora_B." in n)
    assert all(float(p.abs().max()) > 0 for n, p in params.items() if ".lora_A." in n)
    attentions = sum(1 for n, _ in task.unet.named_modules() if n.endswith((".attn1", ".attn2")))
    assert attentions > 0 and len(params) == attentions * 4 * 2  # 4 targets per attention, (A, B) each
    assert [p for p in lora_parameters(task.unet)] == task.policy_parameters()


def test_flow_is_near_zero_at_init_and_linear_in_the_output_scale():
    cond_prompts = ["cat", "dog"]
    x, state = latents(2, seed=7), torch.tensor([0, 6])
    outs = {}
    for scale in (0.0, 1e-3, 1.0):
        cfg = tiny_config()
        cfg.flow.output_init_scale = scale
        t = build_tiny_task(cfg, seed=3)
        with torch.no_grad():
            outs[scale] = t.flow(x, state, t.conditions_for(cond_prompts))
    assert outs[0.0].abs().max() == 0
    torch.testing.assert_close(outs[1e-3], 1e-3 * outs[1.0], rtol=1e-4, atol=1e-9)
    assert outs[1.0].abs().mean() > 1e-2 and outs[1e-3].abs().max() < 1e-2
    assert outs[1.0].shape == x.shape and outs[1.0].dtype == torch.float32


def test_flow_depends_on_prompt_and_state(task):
    x = latents(1, seed=8).expand(2, -1, -1, -1)
    with torch.no_grad():
        by_prompt = task.flow(x, torch.tensor([2, 2]), task.conditions_for(["cat", "a blue whale"]))
        by_state = task.flow(x, torch.tensor([0, 6]), task.conditions_for(["cat", "cat"]))
    assert (by_prompt[0] - by_prompt[1]).abs().max() > 1e-3 * by_prompt.abs().max() > 0
    assert (by_state[0] - by_state[1]).abs().max() > 1e-3 * by_state.abs().max() > 0


def test_flow_timesteps():
    taus = flow_timesteps(50, 1000)
    assert taus.shape == (51,) and float(taus[0]) == 1000 and float(taus[-1]) == 0
    torch.testing.assert_close(taus[1:] - taus[:-1], torch.full((50,), -20.0))


def test_flow_parameters_train(task):
    cond = task.conditions_for(["cat"])
    out = task.flow(latents(1, seed=9), torch.tensor([1]), cond)
    grads = torch.autograd.grad(out.square().sum() + out.sum(), task.flow_parameters(), allow_unused=True)
    assert grads[-1] is not None and float(grads[-1].abs().sum()) > 0  # conv_out bias


def test_decode_range_dtype_and_formula(task):
    x = latents(2, seed=10).requires_grad_(True)
    images = task.decode(x)
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    assert float(images.detach().min()) >= 0 and float(images.detach().max()) <= 1
    with torch.no_grad():
        raw = task.vae.decode(x / task.vae.config.scaling_factor).sample
    torch.testing.assert_close(images, (raw / 2 + 0.5).clamp(0, 1))
    (grad,) = torch.autograd.grad(images.mean(), x)
    assert float(grad.abs().sum()) > 0


def test_rewards_use_each_samples_own_prompt():
    t = build_tiny_task(reward=Reward(PromptLengthReward()))
    prompts = ["ox", "a very long prompt about a cat", "bee"]
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    got = t.log_reward(images, t.conditions_for(prompts))
    expected = torch.log(images.mean(dim=(1, 2, 3)) * torch.tensor([1.0 + len(p) for p in prompts]))
    torch.testing.assert_close(got, expected)
    swapped = t.log_reward(images, t.conditions_for(prompts[::-1]))
    assert not torch.allclose(got, swapped)
    stacked = t.log_reward(torch.cat([images, images.flip(0)]), t.conditions_for(prompts))  # k = 2 per prompt
    expected_2 = torch.log(torch.cat([images, images.flip(0)]).mean(dim=(1, 2, 3)) *
                           torch.tensor([1.0 + len(p) for p in prompts * 2]))
    torch.testing.assert_close(stacked, expected_2)
    with pytest.raises(ValueError, match="4 images for 3 prompts"):
        t.log_reward(images[:1].repeat(4, 1, 1, 1), t.conditions_for(prompts))


def test_trainable_state_dict_round_trip(perturbed):
    state = {k: v.clone() for k, v in perturbed.trainable_state_dict().items()}
    assert any(k.startswith("lora.") for k in state) and any(k.startswith("flow.") for k in state)
    fresh = build_tiny_task(seed=5)
    cond = fresh.conditions_for(PROMPTS)
    x, state_idx = latents(seed=11), torch.tensor([0, 2, 6])
    fresh.load_trainable_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh.policy_eps(x, STEPS, cond), perturbed.policy_eps(x, STEPS, cond))
        assert torch.equal(fresh.flow(x, state_idx, cond), perturbed.flow(x, state_idx, cond))
    with pytest.raises(KeyError, match="missing"):
        fresh.load_trainable_state_dict({k: v for k, v in state.items() if not k.startswith("flow.")})
    bad = dict(state)
    key = next(k for k in bad if k.startswith("lora."))
    bad[key] = torch.zeros(1)
    with pytest.raises(ValueError, match="has shape"):
        fresh.load_trainable_state_dict(bad)


def test_resolution():
    t = build_tiny_task(tiny_config(resolution=48))
    assert t.latent_shape == (4, 12, 12) and t.initial_noise(1).shape == (1, 4, 12, 12)
    assert t.decode(t.initial_noise(1)).shape == (1, 3, 48, 48)
    with pytest.raises(ValueError, match="sd.resolution=30 must be a multiple of the VAE factor 4"):
        build_tiny_task(tiny_config(resolution=30))


def test_unknown_reward_names_the_field():
    cfg = tiny_config()
    cfg.reward.name = "no-such-reward"
    with pytest.raises(ValueError, match="sd.reward.name='no-such-reward' is not registered"):
        build_tiny_task(cfg)


def test_initial_weights_follow_the_seed_not_the_global_rng():
    torch.manual_seed(123)
    a = build_tiny_task(seed=1).trainable_state_dict()
    state = torch.random.get_rng_state()
    torch.manual_seed(456)
    b = build_tiny_task(seed=1).trainable_state_dict()
    c = build_tiny_task(seed=2).trainable_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a if ".lora_A." in k)
    torch.manual_seed(123)
    build_tiny_task(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # building draws nothing from the global RNG
