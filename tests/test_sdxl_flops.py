"""``fastnabla.flops`` on SDXL: per-pass FLOPs counted on the meta device for the tiny SDXL architecture equal
FlopCounterMode counts of the tiny-sdxl task's real CPU passes (UNet with the pooled embedding and time ids, both
text encoders, SDXL's VAE), the derived pass structure equals what a real tiny-sdxl training step counts, and
``--preset sdxl-aesthetic`` reports SDXL base at 1024 px."""

from __future__ import annotations

import json

import pytest
import torch
from flops_common import FAST, counted_per_item
from test_flops_counting import B, _real_db_flow, _real_decoder, _real_flow, _real_unet
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastnabla.flops.archs import arch_for_model, load_arch
from fastnabla.flops.cli import build_run_config, main
from fastnabla.flops.counting import count_flops, flop_counter, network_pass_flops
from fastnabla.flops.report import count_setup, flop_report
from fastnabla.flops.structure import derive_structure
from fastnabla.tasks.sd.counters import count_task_passes


def _config(*overrides: str):
    return build_run_config("tiny-sdxl", [*FAST, *overrides])


@pytest.fixture(scope="module")
def tiny_xl():
    from fastnabla.tasks.sd.build import build_sd_task

    cfg = _config()
    task = build_sd_task(cfg.sd, "cpu", seed=0)
    return cfg, task, count_setup(cfg, load_arch(arch_for_model(cfg.sd.model)), task.resolution)


def test_tiny_sdxl_architecture_is_the_tasks(tiny_xl):
    _, task, setup = tiny_xl
    arch = setup.arch
    assert arch.name == "tiny-sdxl" and arch.unet["addition_embed_type"] == "text_time"
    assert [e["architectures"] for e in arch.text_encoders] == [["CLIPTextModel"], ["CLIPTextModelWithProjection"]]
    assert arch.text_width == task.flow_net.config.cross_attention_dim == 32 + 48  # both encoders' widths
    assert arch.latent_shape(task.resolution) == task.latent_shape


def _real_text(task) -> dict[str, int]:
    """One prompt through both encoders, as the task encodes it (a prompt not in the task's cache)."""
    return {"forward": count_flops(lambda: task.conditions_for(["a prompt never encoded before"]))}


# (network, rows of the network per latent row of the real pass): the UNet runs the CFG pair
NETWORK_CASES = [("unet_policy", 2), ("unet_pretrained", 2), ("vae_decoder", 1), ("flow", 1), ("db_flow", 1),
                 ("text_encoder", 1)]


@pytest.mark.parametrize(("network", "rows"), NETWORK_CASES, ids=[c[0] for c in NETWORK_CASES])
def test_meta_counts_equal_real_cpu_passes_of_the_tiny_sdxl_task(tiny_xl, network, rows):
    cfg, task, setup = tiny_xl
    run = {
        "unet_policy": lambda: _real_unet(task, pretrained=False),
        "unet_pretrained": lambda: _real_unet(task, pretrained=True),
        "vae_decoder": lambda: _real_decoder(task),
        "flow": lambda: _real_flow(task),
        "db_flow": lambda: _real_db_flow(task, cfg),
        "text_encoder": lambda: _real_text(task),
    }[network]
    with sdpa_kernel(SDPBackend.MATH):
        real = run()
    meta = network_pass_flops(setup, network, set(real))
    assert all(v > 0 for v in real.values()), real
    per_call = 1 if network == "text_encoder" else B * rows  # one prompt; B latents (x2 for the CFG pair)
    assert {k: per_call * v for k, v in meta.items()} == real


STRUCTURE_CASES = [("default", []), ("no-cfg", ["sd.guidance_scale=1"])]


@pytest.mark.parametrize("overrides", [c[1] for c in STRUCTURE_CASES], ids=[c[0] for c in STRUCTURE_CASES])
def test_derived_structure_equals_counted_passes_and_flops_on_tiny_sdxl(monkeypatch, overrides):
    from flops_common import build_tiny_trainer

    monkeypatch.setenv("FASTNABLA_COMPILE", "off")
    monkeypatch.setenv("FASTNABLA_BACKEND", "reference")
    cfg = _config(*overrides)
    task, trainer = build_tiny_trainer(cfg)
    assert task.family == "sdxl"
    traj = trainer.sample(1)
    with sdpa_kernel(SDPBackend.MATH), count_task_passes(task) as counter, flop_counter() as flops:
        stats = trainer.train_on(traj, 2)
    items = stats["transitions"]
    structure = derive_structure(cfg, iteration=2)
    counted = counted_per_item(counter, items, cfg.sd.guidance_scale)
    assert {k: v for k, v in structure.counter_view().items() if v} == pytest.approx(counted, rel=1e-12)
    report = flop_report(cfg, release=False)  # the architecture from sd.model: tiny-sdxl
    assert report["arch"]["name"] == "tiny-sdxl"
    predicted = report["tflops_per_trained_transition"] * 1e12 * items
    assert predicted == pytest.approx(flops.get_total_flops(), rel=1e-9)


@pytest.mark.slow
def test_sdxl_aesthetic_preset_reports_sdxl_base_at_1024_px(capsys):
    assert main(["--preset", "sdxl-aesthetic", "--no-release", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["arch"]["name"] == "sdxl" and report["resolution"] == 1024
    assert report["arch"]["cross_attention_dim"] == 2048  # 768 (CLIP ViT-L) + 1280 (OpenCLIP bigG)
    assert 5e3 < report["gflops_per_row"]["unet_policy.forward"] < 9e3  # ~6.8 TF per latent row at 128 x 128
    assert report["text_encoder_gflops_per_prompt"] > 100


def test_memory_estimate_graphs_equal_the_real_tiny_sdxl_passes(tiny_xl):
    """The meta-device estimate's saved-tensor bytes of the UNet CFG pair (policy and pretrained) and the flow network
    equal those of the real tiny-sdxl task's networks on CPU tensors, counted the same way."""
    import dataclasses

    from fastnabla.flops.memory_estimate import estimate, saved_bytes
    from fastnabla.tasks.sd.lora import adapters_disabled

    cfg, task, setup = tiny_xl
    est = estimate(setup.arch, task.resolution, torch.float32, cfg.sd.reward.name, dataclasses.asdict(cfg.sd.lora),
                   dataclasses.asdict(cfg.sd.flow), "sdxl")
    cond = task.conditions_for(["a cat", "a dog"])
    added = {"text_embeds": cond["pooled_embeds"], "time_ids": task.time_ids.expand(2, -1)}

    def unet_pass():
        x = torch.randn(2, *task.latent_shape, requires_grad=True)
        task.unet(x, torch.full((2,), 500.0), encoder_hidden_states=cond["prompt_embeds"], added_cond_kwargs=added)

    def pretrained_pass():
        with adapters_disabled(task._lora_layers):
            unet_pass()

    def flow_pass():
        task.flow_net(torch.randn(1, *task.latent_shape), torch.full((1,), 500.0),
                      encoder_hidden_states=cond["prompt_embeds"][:1])

    real = {"unet_policy": saved_bytes(unet_pass), "unet_pretrained": saved_bytes(pretrained_pass),
            "flow": saved_bytes(flow_pass)}
    assert {k: est.graphs[k] for k in real} == real
    assert real["unet_policy"] > real["unet_pretrained"] > 0  # the LoRA branches save their inputs too
    assert est.peak(2, 1) == sum(est.weights.values()) + max(
        2 * (real["unet_policy"] + real["unet_pretrained"] + 2 * real["flow"]), est.graphs["vae_decoder+reward"])
