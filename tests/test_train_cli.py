"""`python -m fastnabla.train` end to end on a tiny case: outputs, exit codes, interruption."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fastnabla import train
from fastnabla.utils.io import CONFIG_HEADER, RunDirError, prepare_run_dir

TINY = [
    "sampler.num_steps=6",
    "train.iterations=7",
    "train.batch_size=16",
    "gmm.network.hidden=16",
    "eval.every=3",
    "eval.num_samples=50",
    "eval.final_num_samples=64",
    "eval.energy_samples=32",
    "output.progress=false",
]


def test_cli_writes_every_output(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main([*TINY, f"output.dir={out}"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("tv_to_target", "tv_prior_to_target", "mean_log_reward", "energy_distance", "tv_curve"):
        assert key in metrics
    assert 0 <= metrics["tv_to_target"] <= 1
    samples = np.load(out / "samples.npy")
    assert samples.shape == (64, 2) and np.isfinite(samples).all()
    lines = (out / "metrics.jsonl").read_text().strip().splitlines()
    assert len(lines) == 7
    assert json.loads(lines[-1])["iteration"] == 7
    assert sum("tv_to_target" in json.loads(line) for line in lines) == 2  # iterations 3 and 6
    png = (out / "figure.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "config.yaml").exists()
    assert "mode-weight TV to target" in capsys.readouterr().out


def test_second_run_does_not_clobber_a_finished_one(tmp_path):
    out = tmp_path / "run"
    assert train.main([*TINY, f"output.dir={out}", "output.figure=false"]) == 0
    # overrides may follow options (intermixed), as users type them
    assert train.main(["--out", str(out), *TINY, "output.figure=false"]) == 0
    assert (tmp_path / "run-1" / "metrics.json").exists()


def test_bad_config_exits_2_and_creates_nothing(tmp_path, capsys):
    out = tmp_path / "never"
    assert train.main([f"output.dir={out}", "gmm.reward.center=[1,2,3]"]) == 2
    assert "gmm.reward.center" in capsys.readouterr().err
    assert not out.exists()
    assert train.main([f"output.dir={out}", "train.iteratons=3"]) == 2
    assert not out.exists()


def test_interrupted_run_is_not_marked_finished(tmp_path, monkeypatch):
    from fastnabla.training import trainer as trainer_mod

    calls = {"n": 0}
    real_step = trainer_mod.Trainer.step

    def flaky_step(self):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(trainer_mod.Trainer, "step", flaky_step)
    out = tmp_path / "run"
    assert train.main([*TINY, f"output.dir={out}"]) == 130
    assert not (out / "metrics.json").exists()
    assert len((out / "metrics.jsonl").read_text().strip().splitlines()) == 3


def test_info_flags(capsys):
    assert train.main(["--list-presets"]) == 0
    assert "gmm-paper" in capsys.readouterr().out
    assert train.main(["--help-config"]) == 0
    assert "method.td_lambda" in capsys.readouterr().out
    assert train.main(["--print-config", "seed=5"]) == 0
    assert "seed: 5" in capsys.readouterr().out


def _run_dir(path, finished: bool):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(f"{CONFIG_HEADER}\nseed: 0\n")
    (path / "metrics.jsonl").write_text("{}\n")
    if finished:
        (path / "metrics.json").write_text("{}")
    return path


def test_prepare_run_dir_never_loses_a_run(tmp_path):
    assert prepare_run_dir(tmp_path / "new", overwrite=False) == tmp_path / "new"  # created
    assert prepare_run_dir(tmp_path / "new", overwrite=False) == tmp_path / "new"  # empty: reused
    done = _run_dir(tmp_path / "done", finished=True)
    assert prepare_run_dir(done, overwrite=False) == tmp_path / "done-1"  # a finished run is kept
    assert (done / "metrics.json").exists()
    unfinished = _run_dir(tmp_path / "unfinished", finished=False)
    with pytest.raises(RunDirError, match=f"holds an unfinished run.*--resume {unfinished}"):
        prepare_run_dir(unfinished, overwrite=False)
    assert (unfinished / "metrics.jsonl").exists()
    assert prepare_run_dir(unfinished, overwrite=True) == unfinished  # overwrite: the old run's files go
    assert list(unfinished.iterdir()) == []
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"x")
    for overwrite in (False, True):
        with pytest.raises(RunDirError, match="holds no fastnabla run"):
            prepare_run_dir(foreign, overwrite=overwrite)
    assert (foreign / "cat.jpg").exists()


@pytest.mark.parametrize("argv", [["--preset", "nope"], ["--config", "/nonexistent.yaml"]], ids=["preset", "config"])
def test_cli_rejects_missing_inputs(argv, capsys):
    assert train.main(argv) == 2
    assert "error:" in capsys.readouterr().err
