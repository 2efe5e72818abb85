"""The SD3.5 Medium / FLUX.1-dev memory table (``python -m fastnabla.flops.flow_params``): the docs hold the code's
table, the transformers' sizes are the published ones, and the LoRA count is what peft creates."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_flow_task_common import build_tiny_flow_task, tiny_flow_config

from fastnabla.flops.flow_params import _lora_parameters, flow_arch_parts, main, memory_markdown

# the model cards: FLUX.1 [dev] "a 12 billion parameter rectified flow transformer"; Stability AI's SD3.5 Medium
# announcement "2.5 billion parameters" (the MMDiT-X with its positional-embedding buffer; rounded figures, so 2 %)
PUBLISHED = [pytest.param("flux-dev", 12e9, id="flux-dev"), pytest.param("sd35-medium", 2.5e9, id="sd35-medium")]


@pytest.mark.parametrize(("arch", "published"), PUBLISHED)
def test_transformer_sizes_are_the_published_ones(arch, published):
    parts = flow_arch_parts(arch)
    assert abs(parts["transformer"]["values"] / published - 1) < 0.02
    assert parts["T5-XXL encoder"]["frozen"] and not parts["LoRA r 32"]["frozen"]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_lora_count_is_what_peft_creates(family):
    from fastnabla.tasks.flow.tiny import build_tiny_components

    task = build_tiny_flow_task(tiny_flow_config(family))
    created = sum(p.numel() for p in task.policy_parameters())
    bare = build_tiny_components(family).transformer  # the same architecture before peft wraps it
    counted = _lora_parameters(bare, task.cfg.lora.rank, task.cfg.lora.target_modules)
    assert created == counted > 0


def test_docs_memory_table_is_the_code_table(capsys):
    docs = (Path(__file__).resolve().parents[1] / "docs" / "flow-matching.md").read_text()
    table = memory_markdown()
    assert table in docs, "regenerate with: python -m fastnabla.flops.flow_params"
    assert main([]) == 0 and capsys.readouterr().out == table
    assert main(["--bad"]) == 2
