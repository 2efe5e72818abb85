"""Runs that fail safely: bad input is a clear error that writes nothing, a shared run directory cannot run code
on the reader's machine (checkpoints load with ``weights_only=True``), divergence is loud, work is never lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import train_stopped_during_iteration_2

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


# ---------------------------------------------------------------- bad input: exit 2, the field named, nothing written

SD_FAST = ["--preset", "tiny-sd", "sd.num_steps=4", "train.batch_size=4", "train.sample_batch_size=2",
           "train.micro_batch_size=2", "train.fl_batch_size=4", "train.transition_fraction=0.5",
           "sd.prompts.eval_seeds=[0]", "sd.prompts.eval_prompts=['a photo of a cat']", "output.progress=false",
           "output.tensorboard=false"]


def _case_out_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("mine")
    return ["--out", str(tmp_path / "taken")]


def _case_parent_is_a_file(tmp_path):
    (tmp_path / "file").write_text("mine")
    return ["--out", str(tmp_path / "file" / "run")]


def _case_unwritable(tmp_path, monkeypatch):
    import fastnabla.utils.io as io_module

    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(io_module.os, "access", lambda p, mode: False if Path(p) == locked else real(p, mode))
    return ["--out", str(locked / "run")]


def _case_unfinished_run(tmp_path):
    out = tmp_path / "busy"
    assert train.main([*TINY, f"output.dir={out}"]) == 0
    (out / "metrics.json").unlink()
    return ["--out", str(out)]


BAD_INPUTS = [
    pytest.param(lambda tmp, mp: ["method.beta=nan"], "method.beta: must be a finite number", id="beta-nan"),
    pytest.param(lambda tmp, mp: ["method.beta=inf"], "method.beta: must be a finite number", id="beta-inf"),
    pytest.param(lambda tmp, mp: ["optim.lr_policy=inf"], "optim.lr_policy: must be a finite number", id="lr-inf"),
    pytest.param(lambda tmp, mp: ["optim.lr_policy=-1"], "optim.lr_policy: must be > 0", id="lr-negative"),
    pytest.param(lambda tmp, mp: ["gmm.mixture.weights=[0.5,.nan,0.2,0.1]"], "gmm.mixture.weights[1]: must be a "
                 "finite number", id="nan-in-list"),
    pytest.param(lambda tmp, mp: _case_out_is_a_file(tmp), "is a file, not a directory", id="out-is-a-file"),
    pytest.param(lambda tmp, mp: _case_parent_is_a_file(tmp), "cannot be created", id="out-cannot-be-created"),
    pytest.param(lambda tmp, mp: _case_unwritable(tmp, mp), "is not writable", id="out-unwritable"),
    pytest.param(lambda tmp, mp: _case_unfinished_run(tmp), "holds an unfinished run", id="unfinished-run"),
    pytest.param(lambda tmp, mp: ["sampler.eta=0"], "sampler.eta=0 makes every DDIM step deterministic",
                 id="gmm-ddim-eta0"),
    pytest.param(lambda tmp, mp: [*SD_FAST, "sd.eta=0"], "sd.eta=0 makes every DDIM step deterministic",
                 id="sd-ddim-eta0"),
    pytest.param(lambda tmp, mp: [*SD_FAST, "sd.sampler=ddpm"], "step(s) [3] of 4 have sigma = 0", id="sd-ddpm"),
    pytest.param(lambda tmp, mp: ["method.fl_decoder=surrogate"], "task 'gmm' has none", id="gmm-fl-surrogate"),
    pytest.param(lambda tmp, mp: [*SD_FAST, "method.fl_decoder=surrogate"], "set sd.fl_surrogate_decoder",
                 id="sd-fl-surrogate-unset"),
    pytest.param(lambda tmp, mp: ["--preset", "sd15-aesthetic", "--model", str(tmp / "missing")],
                 "no such model directory", id="sd15-missing-model"),
]


@pytest.mark.parametrize("make_argv, message", BAD_INPUTS)
def test_bad_input_exits_2_names_it_and_writes_nothing(make_argv, message, tmp_path, monkeypatch, capsys):
    argv = make_argv(tmp_path, monkeypatch)
    if "--out" not in argv:
        argv = [*argv, "--out", str(tmp_path / "new")]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    capsys.readouterr()
    assert train.main([*TINY, *argv] if "--preset" not in argv else argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and "Traceback" not in err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing created, nothing removed


def test_sd15_missing_model_is_named_before_the_reward_weights(tmp_path, capsys):
    assert train.main(["--preset", "sd15-aesthetic", "--model", str(tmp_path / "missing"),
                       "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"sd.model='{tmp_path / 'missing'}'" in err and "aesthetic" not in err


def test_resume_refuses_a_shape_changing_override(tmp_path, capsys):
    out = _unfinished_run(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert train.main(["--resume", str(out), "gmm.network.hidden=64"]) == 2
    err = capsys.readouterr().err
    assert "gmm.network.hidden cannot change when a run is resumed" in err and "train.iterations" in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_the_cli_answers_bad_input_without_a_traceback(tmp_path):
    """The module as users run it: a separate process, exit status 2, one line naming the field."""
    done = subprocess.run([sys.executable, "-m", "fastnabla.train", "method.beta=nan", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2 and done.stderr == "error: method.beta: must be a finite number, got 'nan'\n"
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- divergence is loud


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else []
    return [t for v in values for t in _tensors(v)]


def _poison_losses(monkeypatch, from_iteration: int, until_iteration: int = 10**9) -> None:
    """The nabla-GFlowNet loss turns NaN for the passes of iterations [from, until)."""
    from fastnabla.methods.nabla_gfn.objective import NablaGFNObjective

    real = NablaGFNObjective.loss

    def loss(self, task, batch, key):
        value, info = real(self, task, batch, key)
        return (value * float("nan") if from_iteration <= key[1] < until_iteration else value), info

    monkeypatch.setattr(NablaGFNObjective, "loss", loss)


def test_non_finite_loss_skips_the_update_and_training_goes_on(tmp_path, monkeypatch, capsys):
    _poison_losses(monkeypatch, 3, 4)  # one pass of NaN losses
    out = tmp_path / "run"
    assert train.main([*TINY, "train.iterations=5", f"output.dir={out}"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_updates"] for r in records[1:]] == [0, 1, 0, 0]
    assert records[2]["skip_reasons"] == ["update 1: non-finite loss"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["skipped_updates"] == 1 and not metrics["diverged"]
    assert "iteration 3: skipped update 1: non-finite loss" in capsys.readouterr().err
    state = load_state_file(out / "checkpoints" / "step-0000005" / "rank0.pt")
    assert _tensors(state["task"]) and all(bool(torch.isfinite(t).all()) for t in _tensors(state["task"]))


def test_consecutive_skips_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    _poison_losses(monkeypatch, 3)  # every pass from iteration 3 on
    out = tmp_path / "run"
    argv = [*TINY, "train.iterations=8", "train.updates_per_batch=2", "train.max_skipped_updates=3",
            f"output.dir={out}"]
    assert train.main(argv) == 3
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["diverged"] and metrics["stopped_at_iteration"] == 4  # skips: 2 at iteration 3, the 3rd at 4
    assert "3 consecutive updates skipped" in metrics["stopped_because"] and "update 1: non-finite loss" in metrics[
        "stopped_because"]
    assert metrics["last_good_checkpoint"].endswith("step-0000003")
    assert "diverged and stopped" in capsys.readouterr().err
    state = load_state_file(out / "checkpoints" / "step-0000003" / "rank0.pt")
    assert _tensors(state["task"]) and all(bool(torch.isfinite(t).all()) for t in _tensors(state["task"]))


def test_non_finite_rewards_skip_the_pass(tmp_path, monkeypatch):
    from fastnabla.tasks.gmm.model import GMMTask

    real = GMMTask.log_reward

    def log_reward(self, decoded, cond):
        out = real(self, decoded, cond)
        return out.index_fill(0, torch.tensor([0]), float("nan")) if decoded.shape[0] == 8 else out

    monkeypatch.setattr(GMMTask, "log_reward", log_reward)  # every sampled training batch has one NaN reward
    out = tmp_path / "run"
    assert train.main([*TINY, "train.iterations=4", "train.max_skipped_updates=2", f"output.dir={out}"]) == 3
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[1]["skip_reasons"] == ["update 1: 1 sampled trajectories have a non-finite reward"]


def test_a_run_with_non_finite_final_metrics_never_exits_0(tmp_path, monkeypatch):
    from fastnabla.tasks.gmm.run import GMMRun

    real = GMMRun.finish

    def finish(self, out_dir, records, train_seconds):
        return {**real(self, out_dir, records, train_seconds), "mean_log_reward": float("nan")}

    monkeypatch.setattr(GMMRun, "finish", finish)
    out = tmp_path / "run"
    assert train.main([*TINY, f"output.dir={out}"]) == 3
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["diverged"] and metrics["mean_log_reward"] is None


# ---------------------------------------------------------------- names, resume, file modes


def test_print_config_then_config_keeps_the_run_name(tmp_path, capsys):
    assert train.main(["--preset", "tiny-sd", "--print-config"]) == 0
    (tmp_path / "f.yaml").write_text(capsys.readouterr().out)
    assert train.main(["--config", str(tmp_path / "f.yaml"), "--print-config"]) == 0
    assert "name: tiny-sd\n" in capsys.readouterr().out


def test_resumed_sd_run_keeps_its_name_and_pretrained_metrics_and_says_where_it_continues(tmp_path, monkeypatch,
                                                                                          capsys):
    out = tmp_path / "renamed-dir"
    assert train_stopped_during_iteration_2(monkeypatch, [*SD_FAST, "--out", str(out)]) == 130
    pretrained = json.loads((out / "eval_pretrained.json").read_text())["eval_log_reward_pretrained"]
    capsys.readouterr()
    assert train.main(["--resume", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"resuming tiny-sd in {out} from step-0000002 (iteration 2 of 3)" in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["name"] == "tiny-sd" and metrics["eval_log_reward_pretrained"] == pretrained


def test_outputs_follow_the_users_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        out = tmp_path / "run"
        assert train.main([*SD_FAST, "train.iterations=2", "--out", str(out)]) == 0
    finally:
        os.umask(previous)
    files = [out / "config.yaml", out / "metrics.json", out / "metrics.jsonl", out / "samples" / "pretrained.png",
             out / "lora" / "pytorch_lora_weights.safetensors", *out.glob("checkpoints/step-*/rank0.pt"),
             out / "checkpoints" / "latest"]
    assert all(f.is_file() for f in files) and len(files) == 8
    assert {oct(f.stat().st_mode & 0o777) for f in files} == {oct(0o640)}
    dirs = [out / "lora", out / "checkpoints", *out.glob("checkpoints/step-*")]
    assert {oct(d.stat().st_mode & 0o777) for d in dirs} == {oct(0o750)}
