"""``python -m fastnabla.train --preset tiny-sd``: outputs, stop + --resume, torchrun, all on a CPU."""

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

# tiny-sd made smaller still: 4 denoising steps, 4 trajectories, one evaluation prompt and seed
FAST = [
    "--preset", "tiny-sd",
    "sd.num_steps=4",
    "train.batch_size=4",
    "train.sample_batch_size=2",
    "train.micro_batch_size=2",
    "train.fl_batch_size=4",
    "train.transition_fraction=0.5",
    "sd.prompts.eval_seeds=[0]",
    "sd.prompts.eval_prompts=['a photo of a cat']",
    "output.progress=false",
    "output.tensorboard=false",
]


def _final_task_state(run_dir: Path) -> dict:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return torch.load(run_dir / "checkpoints" / latest / "rank0.pt", weights_only=True)["task"]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_tiny_sd_run_writes_every_output(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main([*FAST, "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["iterations"] == 3 and m["world_size"] == 1
    for key in ("reward_mean", "eval_log_reward", "eval_log_reward_pretrained", "seconds_per_iteration"):
        assert key in m
    p = m["passes_per_transition"]
    assert p["unet_forward"] > 0 and p["unet_backward"] > 0 and p["vae_decoder_backward"] > 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [1, 2, 3]
    assert all("loss_forward" in r and "grad_norm_policy" in r for r in lines[1:])  # two training epochs
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "samples" / "pretrained.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "samples" / "iter-0000003.png").is_file()
    assert "UNet passes per trained transition" in capsys.readouterr().out
    # training changed the LoRA: the exported policy is not the pretrained model
    state = _final_task_state(out)
    assert max(float(v.abs().max()) for k, v in state.items() if k.startswith("lora.") and "lora_B" in k) > 0


def test_tiny_sd_stop_and_resume_matches_uninterrupted(tmp_path, monkeypatch):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert train.main([*FAST, "--out", str(straight), "output.export_lora=false"]) == 0

    stopped_argv = [*FAST, "--out", str(stopped), "output.export_lora=false"]
    assert train_stopped_during_iteration_2(monkeypatch, stopped_argv) == 130
    assert not (stopped / "metrics.json").exists()
    assert json.loads((stopped / "checkpoints" / "step-0000002" / "meta.json").read_text())["iteration"] == 2
    assert train.main(["--resume", str(stopped), "output.progress=false"]) == 0
    assert _max_diff(_final_task_state(stopped), _final_task_state(straight)) == 0.0
    lines = [json.loads(x)["iteration"] for x in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert lines == [1, 2, 3]


def _simulated_rank_gradients(rank: int, world: int) -> list[torch.Tensor]:
    """Gradients of one update of this rank, without a process group (the all-reduce left out)."""
    from fastnabla.config.loader import build_config
    from fastnabla.run.config import RunConfig
    from fastnabla.run.driver import build_trainer
    from fastnabla.run.presets import get_preset
    from fastnabla.tasks.sd.build import build_sd_task
    from fastnabla.training.distributed import DistContext
    from fastnabla.utils.profiling import PhaseTimer

    overrides = [x for x in FAST if "=" in x] + ["train.updates_per_batch=1"]
    cfg = build_config(RunConfig, get_preset("tiny-sd"), None, overrides)
    torch.manual_seed(cfg.seed)
    task = build_sd_task(cfg.sd, "cpu", seed=cfg.seed)
    trainer = build_trainer(task, cfg, DistContext(rank=rank, world_size=world), PhaseTimer())
    trainer.dist.all_reduce_gradients = lambda params: None
    trainer.dist.all_reduce_sum_ = lambda t: t
    trainer.optimizer.step = lambda *a, **k: None  # keep the parameters: the gradients are compared
    trainer.train_on(trainer.sample(1), 2)
    return [p.grad.clone() for p in trainer._policy_params + trainer._flow_params]


def test_rank_gradients_sum_to_the_one_process_gradient():
    """Each rank trains on its own trajectories and divides by the update's global size: the sum over ranks
    (what the all-reduce computes) is the one-process gradient, up to float summation order."""
    whole = _simulated_rank_gradients(0, 1)
    ranks = [_simulated_rank_gradients(r, 2) for r in range(2)]
    scale = max(float(g.abs().max()) for g in whole)
    assert scale > 0
    err = max(float((a + b - w).abs().max()) for a, b, w in zip(*ranks, whole, strict=True))
    assert err <= 1e-5 * scale, (err, scale)


@pytest.mark.slow
def test_tiny_sd_torchrun_two_processes_match_one(tmp_path):
    """End to end through torchrun (gloo): one update with an SGD-like optimizer (Adam with eps = 1), so the
    final parameters compare the gradients; over many Adam steps elements whose gradient is ~0 get a +-lr
    step whose sign follows float summation order, so bitwise equality is not a meaningful target there."""
    one, two = tmp_path / "one", tmp_path / "two"
    case = [*FAST, "train.iterations=2", "train.updates_per_batch=1", "optim.eps=1.0", "optim.lr_policy=1.0",
            "optim.lr_flow=1.0", "output.export_lora=false", "output.figure=false"]
    assert train.main([*case, "--out", str(one)]) == 0
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "fastnabla.train", *case, "--out", str(two)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((two / "metrics.json").read_text())["world_size"] == 2
    a, b = _final_task_state(one), _final_task_state(two)
    moved = max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k)  # LoRA B starts at 0
    assert moved > 1e-4
    assert _max_diff(a, b) <= 1e-4 * moved
