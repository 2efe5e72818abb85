"""A run directory someone shares cannot run code on the reader's machine: checkpoints load with
``weights_only=True`` and a pickled callable is refused with an error naming the file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fastnabla import train
from fastnabla.training.checkpoint import UnsafeCheckpointError, load_state_file

TINY = [
    "sampler.num_steps=4", "train.iterations=3", "train.batch_size=8", "gmm.network.hidden=8", "gmm.network.layers=1",
    "eval.every=0", "eval.num_samples=16", "eval.final_num_samples=16", "eval.energy_samples=8",
    "output.progress=false", "output.figure=false", "train.checkpoint_every=1",
]


class Payload:
    """Unpickling this calls ``os.getpid``: any callable would do, ``os.system`` included."""

    def __reduce__(self):
        return (os.getpid, ())


def _plant_payload(file: Path) -> None:
    state = torch.load(file, weights_only=True)
    state["payload"] = Payload()
    torch.save(state, file)


def _unfinished_run(tmp_path: Path) -> Path:
    out = tmp_path / "run"
    assert train.main([*TINY, f"output.dir={out}"]) == 0
    (out / "metrics.json").unlink()  # an unfinished run: resumable
    return out


def test_trainer_checkpoints_hold_plain_data_only(tmp_path):
    out = _unfinished_run(tmp_path)
    state = load_state_file(out / "checkpoints" / "step-0000003" / "rank0.pt")
    assert state["format"] == 2 and state["iteration"] == 3


def test_resume_refuses_a_checkpoint_carrying_a_pickled_callable(tmp_path, capsys):
    out = _unfinished_run(tmp_path)
    file = out / "checkpoints" / "step-0000003" / "rank0.pt"
    _plant_payload(file)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert train.main(["--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(file) in err and "refused to load" in err and "Traceback" not in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing written


def test_load_state_file_refuses_callables_and_names_the_file(tmp_path):
    file = tmp_path / "x.pt"
    torch.save({"ok": torch.ones(2), "payload": Payload()}, file)
    with pytest.raises(UnsafeCheckpointError, match=str(file)):
        load_state_file(file)
    torch.save({"ok": torch.ones(2), "nested": [1, "a", (2.0, None)]}, file)
    assert load_state_file(file)["nested"] == [1, "a", (2.0, None)]


def test_eval_refuses_a_checkpoint_carrying_a_pickled_callable(tmp_path):
    from fastnabla.eval.runs import Checkpoint, read_lora_state

    step = tmp_path / "step-0000001"
    step.mkdir()
    torch.save({"task": {"lora.w": torch.ones(2)}, "payload": Payload()}, step / "rank0.pt")
    with pytest.raises(UnsafeCheckpointError, match="refused to load"):
        read_lora_state(Checkpoint(1, step))
    torch.save({"task": {"lora.w": torch.ones(2)}}, step / "rank0.pt")
    assert torch.equal(read_lora_state(Checkpoint(1, step))["lora.w"], torch.ones(2))
