"""Per-pass FLOPs counted on the meta device equal FlopCounterMode counts of the same passes run for real on CPU
tensors (tiny configs of every network), and the shipped architecture configs are the real ones."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from flops_common import tiny_run_config
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastnabla.flops.archs import CONFIG_DIR, load_arch, load_config, strip_meta
from fastnabla.flops.counting import PASS_KINDS, CountSetup, count_flops, network_pass_flops, pass_flops
from fastnabla.flops.report import count_setup

B = 2  # rows of the real passes: the meta counts are per row, so this also checks linearity in the batch


@pytest.fixture(scope="module")
def tiny():
    """The tiny task of the tiny-sd preset and the counting setup of its architecture."""
    from fastnabla.tasks.sd.build import build_sd_task

    cfg = tiny_run_config()
    task = build_sd_task(cfg.sd, "cpu", seed=0)
    return cfg, task, count_setup(cfg, load_arch("tiny"), task.resolution)


def _real_unet(task, pretrained: bool) -> dict[str, int]:
    """The task's CFG-pair calls as the trainer runs them, on ``B`` latents (``2B`` network rows)."""
    eps_fn = task.pretrained_eps if pretrained else task.policy_eps
    cond = task.conditions_for(["a cat", "a dog"])
    step = torch.tensor([0, 2])
    x = torch.randn(B, *task.latent_shape, requires_grad=True)
    holder = {}
    out = {"forward": count_flops(lambda: holder.setdefault("eps", eps_fn(x, step, cond)))}
    eps = holder["eps"]
    cot = torch.randn_like(eps)
    out["input_vjp"] = count_flops(lambda: torch.autograd.grad(eps, x, cot, retain_graph=True))
    if not pretrained:
        out["param_input_backward"] = count_flops(lambda: eps.backward(cot))
        eps2 = eps_fn(x.detach(), step, cond)
        out["param_backward"] = count_flops(lambda: eps2.backward(cot))
    return out


def _real_decoder(task) -> dict[str, int]:
    z = torch.randn(B, *task.latent_shape, requires_grad=True)
    holder = {}
    out = {"forward": count_flops(lambda: holder.setdefault("img", task.decode(z)))}
    img = holder["img"]
    out["input_vjp"] = count_flops(lambda: torch.autograd.grad(img, z, torch.randn_like(img)))
    return out


def _real_flow(task) -> dict[str, int]:
    x = torch.randn(B, *task.latent_shape)
    cond = task.conditions_for(["a cat", "a dog"])
    holder = {}
    out = {"forward": count_flops(lambda: holder.setdefault("g", task.flow(x, torch.tensor([1, 3]), cond)))}
    out["param_backward"] = count_flops(lambda: holder["g"].square().sum().backward())
    return out


def _real_db_flow(task, cfg) -> dict[str, int]:
    from fastnabla.methods.log_flow import build_log_flow

    db = cfg.method.db
    net = build_log_flow(task, db.flow_hidden, db.flow_layers, db.flow_channels, 0)
    x = torch.randn(B, *task.latent_shape)
    cond = task.conditions_for(["a cat", "a dog"])
    holder = {}
    out = {"forward": count_flops(lambda: holder.setdefault("f", net(x, torch.tensor([1, 3]), cond)))}
    out["param_backward"] = count_flops(lambda: holder["f"].sum().backward())
    return out


# (network, rows of the network per latent row of the real pass)
NETWORK_CASES = [("unet_policy", 2), ("unet_pretrained", 2), ("vae_decoder", 1), ("flow", 1), ("db_flow", 1)]


@pytest.mark.parametrize(("network", "rows"), NETWORK_CASES, ids=[c[0] for c in NETWORK_CASES])
def test_meta_counts_equal_real_cpu_passes_of_the_tiny_task(tiny, network, rows):
    cfg, task, setup = tiny
    run = {
        "unet_policy": lambda: _real_unet(task, pretrained=False),
        "unet_pretrained": lambda: _real_unet(task, pretrained=True),
        "vae_decoder": lambda: _real_decoder(task),
        "flow": lambda: _real_flow(task),
        "db_flow": lambda: _real_db_flow(task, cfg),
    }[network]
    # forwards and backwards on the attention path FlopCounterMode counts on CPU (the meta device runs it too; the
    # CPU flash kernel is not in its registry)
    with sdpa_kernel(SDPBackend.MATH):
        real = run()
    meta = network_pass_flops(setup, network, set(real))
    assert all(v > 0 for v in real.values()), real
    assert {k: B * rows * v for k, v in meta.items()} == real


def test_pass_kinds_differ_where_autograd_does_different_work(tiny):
    _, _, setup = tiny
    policy = network_pass_flops(setup, "unet_policy", set(PASS_KINDS))
    reference = network_pass_flops(setup, "unet_pretrained", {"forward", "input_vjp"})
    assert policy["forward"] > reference["forward"]  # the LoRA branches
    assert policy["param_input_backward"] > policy["input_vjp"]  # + the LoRA weight gradients
    assert policy["param_input_backward"] > policy["param_backward"]  # + the input chain below the first LoRA layer


# small configs of the real reward architectures (the shipped ones take seconds on the CPU)
SMALL_REWARDS = [
    ("aesthetic", {"kind": "aesthetic", "head_input_size": 16, "clip_vision": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
        projection_dim=16, hidden_act="quick_gelu", layer_norm_eps=1e-5)}),
    ("hpsv2.1", {"kind": "hps", "open_clip_architecture": "ViT-H-14", "open_clip": {
        "embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}}),
    ("imagereward", {"kind": "imagereward", "max_length": 35, "vision": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
        hidden_act="gelu", layer_norm_eps=1e-6),
        "med_config": dict(vocab_size=30524, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, hidden_act="gelu", max_position_embeddings=64, layer_norm_eps=1e-12,
                           pad_token_id=0, add_cross_attention=True)}),
]


@pytest.mark.parametrize(("name", "config"), SMALL_REWARDS, ids=[c[0] for c in SMALL_REWARDS])
def test_reward_meta_counts_equal_the_real_model_on_cpu(tiny, name, config):
    """For ImageReward this also checks that scoring without the prompt mask (which the meta device needs) runs the
    same matmuls as the real, masked model."""
    from fastnabla.flops.archs import build_reward_model

    _, _, setup = tiny
    small = dataclasses.replace(setup, reward=name, reward_config=config, resolution=64)
    meta = network_pass_flops(small, "reward", {"forward", "input_vjp", "prompt_forward"})
    model = build_reward_model(name, "cpu", config)
    prompts = ["a photo of a cat", "a dog"]
    if hasattr(model, "text_features"):
        model.text_features(prompts)  # cached per prompt: not part of a scoring pass, on either side
    with sdpa_kernel(SDPBackend.MATH):
        real = pass_flops(lambda img: model.score(img, prompts), lambda: torch.rand(B, 3, 64, 64), {"forward",
                                                                                                    "input_vjp"})
    assert real["forward"] > 0 and real["input_vjp"] > 0
    assert {k: B * meta[k] for k in real} == real
    assert (meta["prompt_forward"] > 0) == (name == "hpsv2.1")


def test_shipped_reward_configs_are_the_architectures_the_reward_code_builds():
    import open_clip

    from fastnabla.rewards.aesthetic import CLIP_VIT_L14
    from fastnabla.rewards.imagereward import BLIP_MED_CONFIG, BLIP_VIT_L16, PROMPT_TOKENS

    assert load_config("rewards/aesthetic.json")["clip_vision"] == CLIP_VIT_L14
    ir = load_config("rewards/imagereward.json")
    assert ir["vision"] == BLIP_VIT_L16 and ir["med_config"] == BLIP_MED_CONFIG and ir["max_length"] == PROMPT_TOKENS
    hps = load_config("rewards/hpsv2.json")
    shipped = os.path.join(os.path.dirname(open_clip.__file__), "model_configs", "ViT-H-14.json")
    with open(shipped) as f:
        assert hps["open_clip"] == json.load(f)


# the fields that decide the FLOPs, as published in the model repositories' config.json files
SD_CONFIG_FACTS = [
    ("sd15/unet.json", {"block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768,
                        "attention_head_dim": 8, "layers_per_block": 2, "sample_size": 64, "in_channels": 4}),
    ("sd15/vae.json", {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4}),
    ("sd15/text_encoder.json", {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                                "intermediate_size": 3072, "max_position_embeddings": 77}),
    ("sdxl/unet.json", {"block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
                        "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
                        "sample_size": 128, "projection_class_embeddings_input_dim": 2816}),
    ("sdxl/vae.json", {"block_out_channels": [128, 256, 512, 512], "sample_size": 1024}),
    ("sdxl/text_encoder_2.json", {"hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 20,
                                  "intermediate_size": 5120, "projection_dim": 1280}),
    ("flow/release.json", {"block_out_channels": [64, 128, 256, 256], "layers_per_block": 1,
                           "cross_attention_dim": 768}),
]


@pytest.mark.parametrize(("path", "facts"), SD_CONFIG_FACTS, ids=[c[0] for c in SD_CONFIG_FACTS])
def test_shipped_configs_hold_the_published_values_and_name_their_source(path, facts):
    config = load_config(path)
    assert {k: config[k] for k in facts} == facts
    assert config["_source"].startswith(("https://", "the authors' release"))


def test_every_shipped_config_loads_and_names_its_source():
    paths = sorted(p.relative_to(CONFIG_DIR).as_posix() for p in CONFIG_DIR.glob("*/*.json"))
    # + sd35-medium/ (3), flux-dev/ (1): tests/test_flow_task_params.py; + sd15/, sdxl/taesd.json (FL surrogate)
    assert len(paths) == 17, paths
    for path in paths:
        assert load_config(path)["_source"], path
    sdxl = load_arch("sdxl")
    assert len(sdxl.text_encoders) == 2 and sdxl.default_resolution == 1024 and sdxl.vae_factor == 8
    assert strip_meta(load_config("sd15/unet.json")) == {k: v for k, v in load_arch("sd15").unet.items()
                                                         if not k.startswith("_")}


def test_release_flow_network_is_the_default_flow_network(tiny):
    """Our default flow network is the release's: the same FLOPs on SD 1.5 at 512 px."""
    from fastnabla.tasks.sd.config import FlowNetConfig

    setup = CountSetup(load_arch("sd15"), 512, "brightness", {}, ("ours", dataclasses.asdict(FlowNetConfig())))
    release = dataclasses.replace(setup, flow=("release", load_config("flow/release.json")))
    ours = network_pass_flops(setup, "flow", {"forward", "param_backward"})
    assert ours == network_pass_flops(release, "flow", {"forward", "param_backward"})
    assert ours["forward"] > 1e10
