"""``docs/digits/target_distillation.py`` (docs/digits.md, "Can the LoRA policy represent the target?") on the quick
build: it fits the LoRA, scores it with the digits evaluation, records what it did, and never writes into an
existing directory."""

from __future__ import annotations

import json
import math

import pytest
import torch
from digits_common import SCRIPT_EVAL, docs_script, quick_build_dir

SCRIPT = docs_script("target_distillation")


def test_distillation_trains_the_lora_and_writes_the_evaluation(tmp_path):
    out = tmp_path / "fit"
    threads = torch.get_num_threads()  # the script runs on one thread, as every digits command
    result = SCRIPT.main([str(out), "--steps", "3", "--batch", "8", f"sd.model={quick_build_dir()}", *SCRIPT_EVAL])
    written = json.loads((out / "distillation.json").read_text())
    assert written["distillation"]["steps"] == 3 and not written["distillation"]["uniform"]
    assert math.isfinite(written["distillation"]["final_loss"])
    assert written["evaluated"] and written["num_samples"] == 32 and written["target"]["num_samples"] == 64
    assert written["policy"]["class_tv"] == pytest.approx(result["policy"]["class_tv"])
    assert sum(written["policy"]["histogram"]) == pytest.approx(1.0)
    before = (out / "distillation.json").read_bytes()
    with pytest.raises(FileExistsError):
        SCRIPT.main([str(out), "--steps", "1", f"sd.model={quick_build_dir()}", *SCRIPT_EVAL])
    assert (out / "distillation.json").read_bytes() == before
    torch.set_num_threads(threads)
