"""SDConfig validation (errors name the field), dtype helpers and prompt sets."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from fastnabla.tasks.sd.build import frozen_dtype_for
from fastnabla.tasks.sd.config import SDConfig
from fastnabla.tasks.sd.prompts import ANIMALS, draw_prompts, load_prompts
from fastnabla.utils.dtypes import torch_dtype


def _with(path: str, value) -> SDConfig:
    cfg = SDConfig()
    *parents, leaf = path.split(".")
    node = cfg
    for p in parents:
        node = getattr(node, p)
    setattr(node, leaf, value)
    return cfg


def test_defaults_are_the_release_settings():
    cfg = SDConfig()
    cfg.validate()
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules) == (8, 8.0, ["to_q", "to_k", "to_v", "to_out.0"])
    assert (cfg.guidance_scale, cfg.negative_prompt, cfg.sampler, cfg.num_steps, cfg.eta) == (5.0, "", "ddim", 50, 1.0)
    assert cfg.flow.block_out_channels == [64, 128, 256, 256] and cfg.flow.layers_per_block == 1
    assert cfg.speed.attention == "sdpa" and not cfg.speed.compile_unet and not cfg.speed.cuda_graphs


def test_every_field_has_help_text():
    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                yield from walk(value, f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}", f.metadata.get("help", "")

    missing = [name for name, text in walk(SDConfig(), "") if not text]
    assert not missing, f"fields without help text: {missing}"


BAD_VALUES = [
    pytest.param("model", "  ", id="model-empty"),
    pytest.param("frozen_dtype", "fp64", id="frozen_dtype"),
    pytest.param("sampler", "euler", id="sampler"),
    pytest.param("num_steps", 0, id="num_steps"),
    pytest.param("eta", -0.5, id="eta"),
    pytest.param("guidance_scale", -1.0, id="guidance_scale"),
    pytest.param("resolution", -8, id="resolution"),
    pytest.param("trajectory_dtype", "int8", id="trajectory_dtype"),
    pytest.param("lora.rank", 0, id="lora.rank"),
    pytest.param("lora.alpha", 0.0, id="lora.alpha"),
    pytest.param("lora.target_modules", [], id="lora.target_modules"),
    pytest.param("lora.dropout", 1.0, id="lora.dropout"),
    pytest.param("flow.block_out_channels", [], id="flow.block_out_channels"),
    pytest.param("flow.norm_num_groups", 48, id="flow.norm_num_groups"),
    pytest.param("flow.output_init_scale", -1.0, id="flow.output_init_scale"),
    pytest.param("prompts.source", "", id="prompts.source"),
    pytest.param("prompts.eval_seeds", [], id="prompts.eval_seeds"),
    pytest.param("reward.name", "", id="reward.name"),
    pytest.param("reward.transform", "sqrt", id="reward.transform"),
    pytest.param("reward.chunk_size", -1, id="reward.chunk_size"),
    pytest.param("speed.attention", "flash", id="speed.attention"),
    pytest.param("speed.compile_mode", "fast", id="speed.compile_mode"),
]


@pytest.mark.parametrize("path,value", BAD_VALUES)
def test_validate_names_the_field(path, value):
    with pytest.raises(ValueError, match=re.escape(f"sd.{path}")):
        _with(path, value).validate()


def test_dtype_helpers():
    assert torch_dtype("bf16") is torch.bfloat16 and torch_dtype("fp32") is torch.float32
    with pytest.raises(ValueError, match="sd.trajectory_dtype"):
        torch_dtype("fp8", "sd.trajectory_dtype")
    assert frozen_dtype_for("auto", torch.device("cpu")) is torch.float32
    assert frozen_dtype_for("auto", torch.device("cuda")) is torch.bfloat16
    assert frozen_dtype_for("fp16", torch.device("cpu")) is torch.float16


def test_builtin_animals_prompt_set():
    prompts = load_prompts("animals")
    assert prompts == list(ANIMALS) and len(prompts) == 45 == len(set(prompts))
    assert prompts[:3] == ["cat", "dog", "horse"] and prompts[-1] == "kangaroo"


def test_prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red fox\n\n  a blue whale  \n\na bee\n", encoding="utf-8")
    assert load_prompts(str(path)) == ["a red fox", "a blue whale", "a bee"]


def test_prompt_file_errors(tmp_path):
    with pytest.raises(ValueError, match=r"sd\.prompts\.source.*nope\.txt"):
        load_prompts(str(tmp_path / "nope.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(ValueError, match="holds no prompt"):
        load_prompts(str(empty))


def test_draw_prompts_is_reproducible_and_covers_the_set():
    prompts = ["a", "b", "c"]
    first = draw_prompts(prompts, 300, torch.Generator().manual_seed(3))
    again = draw_prompts(prompts, 300, torch.Generator().manual_seed(3))
    other = draw_prompts(prompts, 300, torch.Generator().manual_seed(4))
    assert first == again and first != other and set(first) == set(prompts)
