"""Keyed sampling, the global transition plan, micro-batch accumulation, checkpoints/resume and
``torchrun`` runs: each must reproduce the one-process, uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from gmm_common import SMALL, checkpoint_round_trip, small_config, trainable_params

from fastnabla import train
from fastnabla.run.driver import build_trainer
from fastnabla.tasks.gmm.build import build_gmm_task
from fastnabla.training.checkpoint import CheckpointManager
from fastnabla.training.distributed import DistContext
from fastnabla.training.plan import plan_transitions
from fastnabla.training.trajectories import sample_keyed


def _fake_rank(rank: int, world: int) -> DistContext:
    """A rank's view without a process group (no collectives are called by the pieces tested here)."""
    return DistContext(rank=rank, world_size=world)


# --- keyed sampling and the plan --------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [None, 1, 3], ids=["whole-share", "chunks-of-1", "chunks-of-3"])
def test_sampling_does_not_depend_on_chunks_or_ranks(chunk):
    task = build_gmm_task(small_config())
    whole = sample_keyed(task, seed=3, iteration=5, global_batch=8, chunk_size=8)
    parts = [sample_keyed(task, seed=3, iteration=5, global_batch=8, chunk_size=chunk, rank=r, world_size=2)
             for r in range(2)]
    assert torch.equal(torch.cat([p.states for p in parts]), whole.states)
    assert torch.equal(torch.cat([p.eps_old for p in parts]), whole.eps_old)
    assert torch.equal(torch.cat([p.index for p in parts]), whole.index)
    other = sample_keyed(task, seed=3, iteration=6, global_batch=8)
    assert not torch.equal(other.states, whole.states)  # a new iteration draws new noise


def test_batch_must_split_over_ranks():
    task = build_gmm_task(small_config())
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        sample_keyed(task, seed=0, iteration=1, global_batch=8, rank=0, world_size=3)


def test_plan_partitions_the_global_plan():
    kw = dict(seed=1, iteration=4, global_batch=12, num_steps=10, fraction=0.3, num_updates=3)
    whole = plan_transitions(local_start=0, local_count=12, **kw)
    assert int(whole.update_sizes.sum()) == whole.rows.numel() == 12 * 4  # 3 strata + terminal
    assert whole.update_sizes.tolist() == [16, 16, 16]
    got = []
    for start in (0, 6):
        part = plan_transitions(local_start=start, local_count=6, **kw)
        assert torch.equal(part.update_sizes, whole.update_sizes)  # every rank normalises by the global size
        got += [(int(r) + start, int(s), int(u)) for r, s, u in zip(part.rows, part.steps, part.update, strict=True)]
        # the states at both ends of every planned transition are flagged as needed
        needed = part.needed_states
        assert bool(needed[part.rows, part.steps].all() and needed[part.rows, part.steps + 1].all())
    want = [(int(r), int(s), int(u)) for r, s, u in zip(whole.rows, whole.steps, whole.update, strict=True)]
    assert sorted(got) == sorted(want)


# --- accumulation and resume (in process) -----------------------------------------------------------------


def test_micro_batches_accumulate_to_the_full_update():
    full = build_trainer(build_gmm_task(small_config()), small_config())
    micro = build_trainer(build_gmm_task(small_config()), small_config("train.micro_batch_size=3"))
    for tr in (full, micro):
        tr.fit(3)
    torch.testing.assert_close(trainable_params(micro.task), trainable_params(full.task), rtol=1e-5, atol=1e-6)
    assert float((trainable_params(full.task)).abs().max()) > 0  # training moved the zero-initialised heads


@pytest.mark.parametrize("optimizer", ["adam", "adamw8bit"])
def test_resume_from_checkpoint_is_exact(tmp_path, optimizer):
    if optimizer == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    cfg = small_config(f"optim.optimizer={optimizer}", "method.fl_noise_var=0.01", "method.fl_num_noise=2")
    straight = build_trainer(build_gmm_task(cfg), cfg)
    straight.fit(5)

    _, resumed = checkpoint_round_trip(cfg, 3, tmp_path / "ckpt")
    assert resumed.iteration == 3 and resumed.previous is not None
    resumed.fit(5)
    assert torch.equal(trainable_params(resumed.task), trainable_params(straight.task))


def test_checkpoint_manager_keeps_only_complete_checkpoints(tmp_path):
    cfg = small_config()
    tr = build_trainer(build_gmm_task(cfg), cfg)
    manager = CheckpointManager(tmp_path, keep=2)
    assert manager.latest() is None
    for _ in range(3):
        tr.step()
        manager.save(tr, {"note": "x"})
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-0000002", "step-0000003"]
    assert manager.latest().name == "step-0000003"
    (tmp_path / "step-0000004.tmp").mkdir()  # a write that died half way is ignored
    assert manager.latest().name == "step-0000003"
    with pytest.raises(ValueError, match="written by 1 process"):
        CheckpointManager(tmp_path, dist=_fake_rank(0, 2)).load(tr)


# --- the CLI: SIGTERM, --resume, torchrun ------------------------------------------------------------------

CLI_CASE = [*SMALL, "train.iterations=6", "seed=2"]


def _final_params(run_dir: Path) -> dict:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return torch.load(run_dir / "checkpoints" / latest / "rank0.pt", weights_only=True)["task"]


def _assert_same_params(a: dict, b: dict, exact: bool) -> None:
    for net in a:
        for k in a[net]:
            if exact:
                assert torch.equal(a[net][k], b[net][k]), f"{net}.{k}"
            else:
                torch.testing.assert_close(a[net][k], b[net][k], rtol=1e-5, atol=1e-6, msg=f"{net}.{k}")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_matches_uninterrupted(tmp_path):
    run = tmp_path / "stopped"
    # long enough to be stopped mid-way; a constant learning rate, because the cosine schedule depends on
    # train.iterations, which the resumed and the reference runs set to where the stop happened
    case = [*CLI_CASE, "optim.lr_schedule=constant"]
    slow = [*case, "train.iterations=5000", f"output.dir={run}"]
    proc = subprocess.Popen([sys.executable, "-m", "fastnabla.train", *slow], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "stopped by SIGTERM" in err and "--resume" in err
    assert not (run / "metrics.json").exists()
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    stopped_at = json.loads((latest / "meta.json").read_text())["iteration"]
    assert 3 <= stopped_at < 5000
    assert len(log.read_text().splitlines()) >= stopped_at

    total = stopped_at + 3
    assert train.main(["--resume", str(run), f"train.iterations={total}"]) == 0
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [rec["iteration"] for rec in lines] == list(range(1, total + 1))  # none lost, none duplicated
    ref = tmp_path / "straight"
    assert train.main([*case, f"train.iterations={total}", f"output.dir={ref}"]) == 0
    _assert_same_params(_final_params(run), _final_params(ref), exact=True)


def test_resume_errors(tmp_path, capsys):
    assert train.main(["--resume", str(tmp_path / "nope")]) == 2
    assert "no config.yaml" in capsys.readouterr().err
    done = tmp_path / "done"
    assert train.main([*CLI_CASE, f"output.dir={done}"]) == 0
    assert train.main(["--resume", str(done)]) == 2
    assert "finished" in capsys.readouterr().err
    assert train.main(["--resume", str(done), "--preset", "gmm-paper"]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("replay", [["train.replay_batches=1"], ["train.replay_batches=2"],
                                    ["train.replay_batches=2", "train.replay_subsample=kept"],
                                    ["train.replay_batches=1", "method.flow_ema_decay=0.9"]],
                         ids=["previous-batch", "replay-2-batches", "replay-2-kept", "averaged-flow"])
def test_torchrun_two_processes_match_one(tmp_path, replay):
    one, two = tmp_path / "one", tmp_path / "two"
    case = [*CLI_CASE, "train.micro_batch_size=3", *replay]
    assert train.main([*case, f"output.dir={one}"]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "fastnabla.train", *case, f"output.dir={two}"]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (two / "metrics.json").exists() and (two / "checkpoints" / "latest").exists()
    latest = (two / "checkpoints" / "latest").read_text().strip()
    assert (two / "checkpoints" / latest / "rank1.pt").exists()
    _assert_same_params(_final_params(two), _final_params(one), exact=False)
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert abs(m1["tv_to_target"] - m2["tv_to_target"]) < 1e-3


def test_stored_trajectories_move_to_the_run_device():
    """A checkpoint is loaded on the CPU; D_prev must go back to the device the run samples on."""
    from fastnabla.training.trajectories import Trajectories

    traj = Trajectories(
        torch.zeros(2, 4, 3), torch.zeros(2, 3, 3), {"prompts": ["a", "b"], "prompt_embeds": torch.zeros(2, 5, 7)},
        torch.zeros(2),
    )
    moved = traj.to("meta")
    assert moved.states.is_meta and moved.eps_old.is_meta and moved.log_reward.is_meta
    assert moved.cond["prompt_embeds"].is_meta and moved.cond["prompts"] == ["a", "b"]
    assert moved.index.device.type == "cpu"  # global ids index CPU-side bookkeeping
