"""Every method runs on both tasks through the shared trainer, checkpoints and resumes exactly, and is selected
with ``--method``."""

from __future__ import annotations

import json

import pytest
import torch

from fastnabla import train
from fastnabla.config.loader import build_config
from fastnabla.methods import OBJECTIVES
from fastnabla.methods.config import METHODS, MethodConfig
from fastnabla.methods.nabla_gfn.objective import NablaGFNObjective
from fastnabla.run.config import RunConfig
from fastnabla.run.driver import build_trainer
from fastnabla.run.presets import get_preset
from fastnabla.tasks.gmm.build import build_gmm_task
from fastnabla.training.checkpoint import CheckpointManager
from fastnabla.training.optim import OptimOptions
from fastnabla.training.trainer import Trainer

GMM = ["sampler.num_steps=6", "train.batch_size=8", "train.transition_fraction=0.4", "train.updates_per_batch=2",
       "gmm.network.hidden=16", "gmm.network.layers=2", "method.db.flow_hidden=16", "method.db.flow_layers=2"]
# tiny-sd made smaller still (as tests/test_train_sd_run.py): 4 steps, 4 trajectories
SD = ["sd.num_steps=4", "train.batch_size=4", "train.sample_batch_size=2", "train.micro_batch_size=2",
      "train.fl_batch_size=4", "train.transition_fraction=0.5", "method.db.flow_channels=[8,16]",
      "method.db.flow_hidden=16", "method.db.flow_layers=2"]


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().flatten().float() for p in params])


def test_registry_covers_every_config_method():
    assert tuple(OBJECTIVES) == METHODS


@pytest.mark.parametrize("name", METHODS)
def test_every_method_trains_on_the_analytic_task(name):
    cfg = build_config(RunConfig, None, None, [*GMM, f"method.name={name}"])
    tr = build_trainer(build_gmm_task(cfg), cfg)
    own = getattr(tr.objective, "module", None)
    before = _flat(own.parameters()) if own is not None else None
    task_flow = _flat(tr.task.flow_parameters())
    records = [tr.step() for _ in range(3)]
    trained = [r for r in records if "transitions" in r]
    assert len(trained) == (3 if getattr(tr.objective, "on_policy", False) else 2)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in trained)
    assert float(_flat(tr.task.policy_parameters()).abs().max()) > 0  # the zero-initialised residual moved
    groups = [g["name"] for g in tr.optimizer.param_groups]
    if name in ("nabla-gfn", "residual-db", "dag-db"):
        assert groups == ["policy", "flow"]
    else:
        assert groups == ["policy"]
    if own is not None:  # the DB methods' scalar flow is what the flow group trains (not the task's vector flow)
        assert not torch.equal(_flat(own.parameters()), before)
        assert torch.equal(_flat(tr.task.flow_parameters()), task_flow)


@pytest.mark.parametrize("name", ["dag-db", "ddpo", "draft-k"])
def test_resume_from_checkpoint_is_exact(tmp_path, name):
    cfg = build_config(RunConfig, None, None, [*GMM, f"method.name={name}"])

    def params(tr) -> torch.Tensor:
        own = getattr(tr.objective, "module", None)
        return torch.cat([_flat(tr.task.policy_parameters()), *([_flat(own.parameters())] if own else [])])

    straight = build_trainer(build_gmm_task(cfg), cfg)
    straight.fit(4)
    first = build_trainer(build_gmm_task(cfg), cfg)
    first.fit(2)
    manager = CheckpointManager(tmp_path, keep=1)
    manager.save(first)
    torch.manual_seed(99)
    resumed = build_trainer(build_gmm_task(cfg), cfg)
    manager.load(resumed)
    resumed.fit(4)
    assert torch.equal(params(resumed), params(straight))


def test_trainer_takes_an_objective_not_its_options():
    cfg = build_config(RunConfig, None, None, [*GMM, "method.name=ddpo"])
    with pytest.raises(TypeError, match="build_objective"):
        Trainer(build_gmm_task(cfg), cfg.method, OptimOptions(), 8)
    Trainer(build_gmm_task(cfg), NablaGFNObjective(cfg.method), OptimOptions(), 8)  # an objective is accepted
    with pytest.raises(ValueError, match="method.name: 'nope' is not one of"):
        MethodConfig(name="nope").validate()


def test_method_option_errors_name_the_field():
    for override, field in (("method.refl.stop_min=1.2", "method.refl"), ("method.draft.k=0", "method.draft.k"),
                            ("method.ddpo.clip_range=0", "method.ddpo.clip_range"),
                            ("method.db.gamma=cubic", "method.db.gamma")):
        with pytest.raises(ValueError, match=field):
            build_config(RunConfig, None, None, [override])


def test_baseline_presets_carry_the_papers_settings():
    for name in METHODS[1:]:
        for preset in (f"gmm-{name}", f"sd15-aesthetic-{name}"):
            cfg = build_config(RunConfig, get_preset(preset))
            assert cfg.method.name == name and cfg.optim.lr_schedule == "constant"
    db = build_config(RunConfig, get_preset("gmm-dag-db"))
    assert db.optim.lr_policy == db.optim.lr_flow == 3e-4 and db.method.db.output_reg == 1.0
    assert build_config(RunConfig, get_preset("sd15-aesthetic-refl")).method.refl.relu


@pytest.mark.parametrize("name", METHODS[1:])
def test_every_baseline_trains_tiny_stable_diffusion(name):
    from fastnabla.run.driver import build_trainer
    from fastnabla.tasks.sd.build import build_sd_task
    from fastnabla.training.distributed import DistContext
    from fastnabla.utils.profiling import PhaseTimer

    cfg = build_config(RunConfig, get_preset("tiny-sd"), None, [*SD, f"method.name={name}"])
    task = build_sd_task(cfg.sd, "cpu", seed=0)
    tr = build_trainer(task, cfg, DistContext(), PhaseTimer())
    lora_b = [p for n, p in task.unet.named_parameters() if "lora_B" in n]
    records = [tr.step() for _ in range(2)]
    trained = [r for r in records if "transitions" in r]
    assert trained and all(torch.isfinite(torch.tensor(r["loss"])) for r in trained)
    assert float(_flat(lora_b).abs().max()) > 0  # LoRA B starts at zero: training moved it
    if name in ("residual-db", "dag-db"):
        assert [g["name"] for g in tr.optimizer.param_groups] == ["policy", "flow"]
        assert tr.objective.module(torch.zeros(2, *task.latent_shape), torch.tensor([0, 4]),
                                   task.conditions_for(["a cat", "a dog"])).shape == (2,)
    else:
        assert [g["name"] for g in tr.optimizer.param_groups] == ["policy"]


def test_cli_method_flag_runs_a_baseline_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--preset", "tiny-sd", *SD, "--method", "dag-db", "sd.prompts.eval_seeds=[0]",
            "sd.prompts.eval_prompts=['a photo of a cat']", "output.progress=false", "output.tensorboard=false",
            "output.figure=false", "--out", str(out)]
    assert train.main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["iterations"] == 3 and (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    latest = (out / "checkpoints" / "latest").read_text().strip()
    state = torch.load(out / "checkpoints" / latest / "rank0.pt", weights_only=True)
    assert state["objective"] is not None and "head.weight" in state["objective"]  # the scalar flow is saved
    assert train.main(["--method", "bogus", "--out", str(tmp_path / "x")]) == 2
    assert "method.name: 'bogus' is not one of" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddpo", "refl", "dag-db"])
def test_torchrun_two_processes_match_one(tmp_path, name):
    """Advantages gathered over ranks (DDPO), the per-trajectory plan (ReFL) and the objective's own flow
    (DAG-DB) give a two-process run the parameters of the one-process run."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    case = [*GMM, f"method.name={name}", "train.iterations=3", "train.micro_batch_size=3", "eval.every=0",
            "eval.num_samples=32", "eval.final_num_samples=32", "eval.energy_samples=16", "output.progress=false",
            "output.figure=false"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert train.main([*case, f"output.dir={one}"]) == 0
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "fastnabla.train", *case, f"output.dir={two}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    def final(run_dir):
        latest = (run_dir / "checkpoints" / "latest").read_text().strip()
        return torch.load(run_dir / "checkpoints" / latest / "rank0.pt", weights_only=True)

    a, b = final(one), final(two)
    for net in a["task"]:
        for k in a["task"][net]:
            torch.testing.assert_close(b["task"][net][k], a["task"][net][k], rtol=1e-5, atol=1e-6)
    if a["objective"] is not None:
        for k in a["objective"]:
            torch.testing.assert_close(b["objective"][k], a["objective"][k], rtol=1e-5, atol=1e-6)
