"""``python -m fastnabla.flops`` on the flow task (SD3 / FLUX): the meta-device transformer counts equal the real
tiny task's passes on a CPU, the derived pass structure equals the passes a real tiny run logs, and the real presets'
reports build from the shipped configs."""

from __future__ import annotations

import json

import pytest
import torch
from test_flow_task_common import TOKENS, build_tiny_flow_task, tiny_flow_config
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastnabla.flops.counting import CountSetup, count_flops, network_pass_flops

FAMILIES = [pytest.param("sd3", id="sd3"), pytest.param("flux", id="flux")]


def _setup(family: str) -> CountSetup:
    import dataclasses

    from fastnabla.flops.archs import load_flow_arch

    cfg = tiny_flow_config(family)
    arch = load_flow_arch(f"tiny-{family}", TOKENS)
    return CountSetup(arch=arch, resolution=32, reward="color-target", lora=dataclasses.asdict(cfg.lora),
                      flow=("ours", dataclasses.asdict(cfg.flow)), num_steps=cfg.num_steps)


@pytest.mark.parametrize("family", FAMILIES)
def test_meta_transformer_counts_equal_the_real_tiny_task_on_cpu(family):
    """One policy / pretrained call of the task (SD3: the CFG pair, 2 rows per latent; FLUX: 1) on one latent costs
    rows x the meta-device count per row; the input VJP likewise."""
    task = build_tiny_flow_task(tiny_flow_config(family))
    rows = 2 if task.guided else 1
    per_row = network_pass_flops(_setup(family), "unet_policy", {"forward", "input_vjp"}, device="meta")
    pre_row = network_pass_flops(_setup(family), "unet_pretrained", {"forward"}, device="meta")
    cond = task.conditions_for(["a cat"])
    step = torch.tensor([1])
    x = torch.randn((1, *task.latent_shape)).requires_grad_(True)
    holder = {}
    # the attention path FlopCounterMode counts on CPU (the meta device runs it too; the CPU flash kernel is not in
    # its registry), as tests/test_flops_counting.py
    with sdpa_kernel(SDPBackend.MATH):
        forward = count_flops(lambda: holder.setdefault("y", task.policy_eps(x, step, cond)))
        vjp = count_flops(lambda: torch.autograd.grad(holder["y"].sum(), x))
        pretrained = count_flops(lambda: task.pretrained_eps(x.detach(), step, cond))
    assert forward == rows * per_row["forward"] > 0
    assert vjp == rows * per_row["input_vjp"] > 0
    assert pretrained == rows * pre_row["forward"] < forward  # no LoRA matmuls


@pytest.mark.parametrize("family", FAMILIES)
def test_logged_passes_of_a_real_flow_run_equal_the_derived_structure(tmp_path, monkeypatch, family):
    from fastnabla import train
    from fastnabla.flops.cli import build_run_config
    from fastnabla.flops.structure import derive_structure

    monkeypatch.setenv("FASTNABLA_COMPILE", "off")
    out = tmp_path / "run"
    argv = ["flow.num_steps=4", "train.batch_size=4", "train.sample_batch_size=2", "train.micro_batch_size=2",
            "train.fl_batch_size=4", "train.transition_fraction=0.5", "train.iterations=3"]
    extra = ["flow.prompts.eval_seeds=[0]", "flow.prompts.eval_prompts=['a cat']", "output.progress=false",
             "output.report_to=[]", "output.figure=false", "output.export_lora=false"]
    assert train.main(["--preset", f"tiny-{family}", *argv, *extra, "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = next(r for r in records if r["iteration"] == 3)["passes_per_transition"]
    logged = {k.replace("transformer_", "unet_"): v for k, v in logged.items() if v}
    structure = derive_structure(build_run_config(f"tiny-{family}", argv), iteration=3)
    assert logged == pytest.approx(structure.counter_view(), rel=1e-12)
    assert structure.unet_rows_per_pass == (2 if family == "sd3" else 1)


@pytest.mark.parametrize(("preset", "arch", "rows"), [pytest.param("sd35-medium-aesthetic", "sd35-medium", 2,
                                                                   id="sd35"),
                                                      pytest.param("flux-dev-aesthetic", "flux-dev", 1, id="flux")])
def test_real_flow_presets_report_from_the_shipped_configs(capsys, preset, arch, rows):
    from fastnabla.flops.cli import main

    assert main(["--preset", preset, "--json", "--no-release"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["arch"]["name"] == arch and report["arch"]["family"] == arch.split("-")[0].replace("sd35", "sd3")
    assert report["resolution"] == 512 and report["unet_rows_per_pass"] == rows
    assert report["phases"]["unet_policy_forward"] > report["phases"]["vae_decoder_forward"] > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_a_saved_pipeline_directory_counts_as_its_built_in_architecture(tmp_path, family):
    from fastnabla.flops.cli import build_run_config
    from fastnabla.flops.report import flop_report
    from fastnabla.tasks.flow.tiny import tiny_pipeline_dir

    directory = tiny_pipeline_dir(tmp_path / family, family, 0)
    cfg = build_run_config(f"tiny-{family}")
    built_in = flop_report(cfg, f"tiny-{family}", release=False)
    saved = flop_report(cfg, str(directory), release=False)
    assert saved["arch"]["family"] == family and saved["gflops_per_row"] == built_in["gflops_per_row"]
    assert saved["gflops_per_row"]["unet_policy.forward"] > 0
