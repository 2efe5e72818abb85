"""Memory switches (``sd.memory.*_gradient_checkpointing``): each recomputes activations in the backward pass --
checked by counting a block's calls (forward pre-hooks: torch's recomputation stops once it has what the backward
needs, so a forward hook may never fire) -- and leaves every loss, gradient norm and trained weight equal to the
run without it, including the UNet's adapter state when the pretrained model's VJP is recomputed."""

from __future__ import annotations

import pytest
import torch

from fastnabla.config.loader import build_config
from fastnabla.rewards.base import Reward
from fastnabla.rewards.checkpointing import checkpoint_reward_blocks
from fastnabla.rewards.tiny import tiny_aesthetic
from fastnabla.run.config import RunConfig
from fastnabla.run.presets import get_preset

SD = ["sd.num_steps=4", "train.batch_size=4", "train.sample_batch_size=2", "train.micro_batch_size=2",
      "train.fl_batch_size=4", "train.transition_fraction=0.5", "sd.reward.transform=auto", "optim.lr_policy=0.01"]
KEYS = ("loss", "loss_forward", "loss_reverse", "grad_norm_policy", "grad_norm_flow")


def _train(overrides: list[str]):
    """Two trainer steps (the second trains) with a tiny aesthetic reward (CLIP blocks to checkpoint); returns the
    second step's record, the LoRA weights after it and the forward calls of one block of each network."""
    from fastnabla.run.driver import build_trainer
    from fastnabla.tasks.sd.build import build_sd_task
    from fastnabla.training.distributed import DistContext
    from fastnabla.utils.profiling import PhaseTimer

    cfg = build_config(RunConfig, get_preset("tiny-sd"), None, [*SD, *overrides])
    torch.manual_seed(0)
    task = build_sd_task(cfg.sd, "cpu", reward=Reward(tiny_aesthetic()), seed=0)
    calls = {"unet": 0, "vae": 0, "reward": 0}
    # blocks whose inputs depend on trained weights (a block before the first LoRA layer saves nothing to recompute)
    blocks = {"unet": task.unet.up_blocks[-1].resnets[0], "vae": task.vae.decoder.up_blocks[0],
              # the first child of the first encoder layer: the layer's patched forward is what is recomputed
              "reward": next(next(m for m in task.reward.modules() if isinstance(getattr(m, "layers", None),
                                                                             torch.nn.ModuleList)).layers[0].children())}

    def counter(name):
        def hook(*_):
            calls[name] += 1
        return hook

    for name, block in blocks.items():
        block.register_forward_pre_hook(counter(name))  # a pre-hook: recomputation stops early
    tr = build_trainer(task, cfg, DistContext(), PhaseTimer())
    tr.step()
    before = dict(calls)
    record = tr.step()
    lora = torch.cat([p.detach().flatten() for p in task.policy_parameters()])
    return record, lora, {k: calls[k] - before[k] for k in calls}


@pytest.fixture(scope="module")
def baselines():
    return {fl: _train([f"method.fl_model={fl}"]) for fl in ("policy", "pretrained")}


@pytest.mark.parametrize(("switches", "fl_model"), [
    pytest.param(["unet"], "policy", id="unet"),
    pytest.param(["unet"], "pretrained", id="unet-pretrained-vjp"),
    pytest.param(["vae"], "policy", id="vae"),
    pytest.param(["reward"], "policy", id="reward"),
    pytest.param(["unet", "vae", "reward"], "pretrained", id="all"),
])
def test_checkpointing_recomputes_and_changes_nothing(baselines, switches, fl_model):
    record, lora, calls = _train([f"method.fl_model={fl_model}",
                                  *(f"sd.memory.{s}_gradient_checkpointing=true" for s in switches)])
    base_record, base_lora, base_calls = baselines[fl_model]
    for name in calls:  # a checkpointed block runs again in the backward pass; the others as often as before
        assert (calls[name] > base_calls[name]) == (name in switches), (name, calls, base_calls)
    for key in KEYS:
        assert record[key] == pytest.approx(base_record[key], rel=1e-5, abs=1e-7), key
    torch.testing.assert_close(lora, base_lora, rtol=1e-5, atol=1e-7)


def test_reward_without_blocks_is_refused():
    from fastnabla.rewards import build_reward

    with pytest.raises(ValueError, match="has no transformer blocks"):
        checkpoint_reward_blocks(build_reward("color-target").model)


def test_reward_checkpointing_keeps_scores_and_pixel_gradients():
    torch.manual_seed(0)
    plain = Reward(tiny_aesthetic())
    torch.manual_seed(0)
    checkpointed = Reward(tiny_aesthetic())
    assert checkpoint_reward_blocks(checkpointed.model) == 2  # the tiny CLIP's two encoder layers
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    a, ga = plain.log_reward_and_grad(images, ["a"] * 3)
    b, gb = checkpointed.log_reward_and_grad(images, ["a"] * 3)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(("device", "enabled", "before", "after"), [
    pytest.param("cuda", True, False, True, id="cuda-on"),
    pytest.param("cuda", False, True, False, id="cuda-off"),
    pytest.param("cpu", True, False, False, id="cpu-untouched"),
])
def test_cudnn_benchmark_switch(device, enabled, before, after):
    from fastnabla.tasks.sd.switches import set_cudnn_benchmark

    saved = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = before
        set_cudnn_benchmark(enabled, torch.device(device))  # a device object: no GPU needed to set the flag
        assert torch.backends.cudnn.benchmark is after
    finally:
        torch.backends.cudnn.benchmark = saved
