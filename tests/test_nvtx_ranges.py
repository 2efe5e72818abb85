"""Every pass of a trained transition is a named NVTX range for Nsight (and a profiler range): policy, pretrained,
next_state, decode, reward, flow, and the trainer's phases."""

from __future__ import annotations

from flops_common import build_tiny_trainer, tiny_run_config

import fastnabla.utils.profiling as profiling

PASSES = {"policy", "pretrained", "next_state", "decode", "reward", "flow", "sample", "train", "loss", "backward",
          "optimizer_step"}


class RecordingNVTX:
    """Stands in for the ``nvtx`` package: records the ranges pushed in the fastnabla domain."""

    def __init__(self):
        self.names: list[str] = []
        self.depth = 0

    def push_range(self, name, color=None, domain=None):
        assert domain == profiling.NVTX_DOMAIN
        self.names.append(name)
        self.depth += 1

    def pop_range(self, domain=None):
        self.depth -= 1


def test_a_training_step_names_every_pass(monkeypatch):
    monkeypatch.setenv("FASTNABLA_COMPILE", "off")  # the fused ops' compiled forms cost seconds to build here
    recorder = RecordingNVTX()
    monkeypatch.setattr(profiling, "_nvtx", recorder)
    monkeypatch.setenv("FASTNABLA_NVTX", "1")
    _, trainer = build_tiny_trainer(tiny_run_config("train.iterations=2"))
    trainer.step()  # fills D_prev
    recorder.names.clear()
    trainer.step()
    assert set(recorder.names) >= PASSES, f"missing ranges: {sorted(PASSES - set(recorder.names))}"
    assert recorder.depth == 0  # every range closed
