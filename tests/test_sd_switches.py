"""Speed switches: each leaves the maths unchanged (within its precision) or fails clearly where it cannot run."""

from __future__ import annotations

import copy

import pytest
import torch
from test_sd_common import build_tiny_task, perturb_lora, tiny_config

from fastnabla.tasks.sd.switches import attention_backend_of, set_tf32

PROMPTS = ["cat", "a red fox"]
STEPS = torch.tensor([0, 4])


def eps_and_images(task):
    cond = task.conditions_for(PROMPTS)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    state = torch.tensor([1, 6])
    with torch.no_grad():
        return (task.policy_eps(x, STEPS, cond), task.pretrained_eps(x, STEPS, cond), task.flow(x, state, cond),
                task.decode(x))


@pytest.fixture(scope="module")
def baseline():
    task = build_tiny_task()
    perturb_lora(task)
    return eps_and_images(task)


def build_with(**speed):
    cfg = tiny_config()
    cfg.flow.output_init_scale = 1.0  # a visibly non-zero flow, so its switch effects are compared too
    for k, v in speed.items():
        setattr(cfg.speed, k, v)
    task = build_tiny_task(cfg)
    perturb_lora(task)
    return task


@pytest.fixture(scope="module")
def baseline_flow():
    return eps_and_images(build_with())[2]


def assert_all_close(got, expected, rel: float):
    for name, a, b in zip(("policy", "reference", "flow", "decode"), got, expected, strict=True):
        assert a.dtype == torch.float32, name
        err, scale = float((a - b).abs().max()), float(b.abs().max())
        assert err <= rel * max(scale, 1e-6), f"{name}: max err {err:.3e} > {rel} x {scale:.3e}"


def test_default_attention_is_sdpa():
    task = build_tiny_task()
    assert attention_backend_of(task.unet) == {"AttnProcessor2_0"}
    assert attention_backend_of(task.flow_net) == {"AttnProcessor2_0"}


@pytest.mark.parametrize(
    "speed",
    [
        pytest.param({"attention": "classic"}, id="classic-attention"),
        pytest.param({"channels_last": True}, id="channels_last"),
        pytest.param({"vae_slicing": True}, id="vae_slicing"),
    ],
)
def test_exact_switches_keep_the_outputs(baseline, baseline_flow, speed):
    task = build_with(**speed)
    got = eps_and_images(task)
    # other fp32 kernels (NHWC convolutions, unfused attention): re-association, amplified by CFG's 1 + 2w
    assert_all_close(got, (*baseline[:2], baseline_flow, baseline[3]), rel=5e-5)
    if speed.get("attention") == "classic":
        assert attention_backend_of(task.unet) == {"AttnProcessor"}
    if speed.get("channels_last"):
        assert task.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_bf16_autocast_error_is_within_twice_plain_bf16(baseline, baseline_flow):
    autocast = eps_and_images(build_with(autocast_bf16=True))
    cfg = tiny_config(frozen_dtype="bf16")
    cfg.flow.output_init_scale = 1.0
    bf16_weights = build_tiny_task(cfg)
    perturb_lora(bf16_weights)
    plain = eps_and_images(bf16_weights)
    for i, name in enumerate(("policy", "reference")):
        err_autocast = float((autocast[i] - baseline[i]).abs().max())
        err_bf16 = float((plain[i] - baseline[i]).abs().max())
        assert 0 < err_autocast <= 2 * err_bf16, (name, err_autocast, err_bf16)
    flow_err = float((autocast[2] - baseline_flow).abs().max())
    assert 0 < flow_err <= 2 * float((plain_bf16_flow(build_with()) - baseline_flow).abs().max())


def plain_bf16_flow(task):
    """The same flow network and inputs as :func:`eps_and_images`, everything cast to bf16: the error scale that
    autocast's bf16 matmuls/convolutions are held to (the flow itself always trains in fp32)."""
    net = copy.deepcopy(task.flow_net).to(torch.bfloat16)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    tau = task.flow_time[torch.tensor([1, 6])]
    embeds = task.conditions_for(PROMPTS)["prompt_embeds"]
    with torch.no_grad():
        out = net(x.bfloat16(), tau, encoder_hidden_states=embeds.bfloat16(), return_dict=False)[0]
    return out.float()


def test_bf16_frozen_weights_keep_trainables_fp32():
    task = build_tiny_task(tiny_config(frozen_dtype="bf16"))
    assert task.unet.conv_in.weight.dtype == torch.bfloat16 and task.vae.decoder.conv_out.weight.dtype == torch.bfloat16
    assert {p.dtype for p in task.policy_parameters()} == {torch.float32}
    assert {p.dtype for p in task.flow_parameters()} == {torch.float32}
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    eps = task.policy_eps(x, STEPS, task.conditions_for(PROMPTS))
    (grad,) = torch.autograd.grad(eps.square().sum(), x)
    assert eps.dtype == torch.float32 and grad.dtype == torch.float32 and torch.isfinite(grad).all()


@pytest.mark.parametrize(
    "speed,field",
    [
        pytest.param({"cuda_graphs": True}, "sd.speed.cuda_graphs", id="cuda_graphs"),
        pytest.param({"attention": "xformers"}, "sd.speed.attention='xformers'", id="xformers"),
    ],
)
def test_cuda_only_switches_fail_clearly_on_cpu(speed, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        build_with(**speed)


def test_tf32_is_a_no_op_off_cuda():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    set_tf32(not before[0], torch.device("cpu"))
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


@pytest.mark.slow
def test_compiled_unet_flow_and_decoder_match_eager(baseline, baseline_flow):
    """1-2 min on a 2-core CPU (inductor compiles the tiny UNet twice: adapters on and off)."""
    task = build_with(compile_unet=True, compile_flow=True, compile_vae_decoder=True)
    got = eps_and_images(task)
    assert_all_close(got, (*baseline[:2], baseline_flow, baseline[3]), rel=1e-4)
    assert all(k.startswith(("lora.", "flow.")) and "_orig_mod" not in k for k in task.trainable_state_dict())
