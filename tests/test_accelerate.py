"""``accelerate launch -m fastnabla.train`` works: accelerate's launcher sets the torchrun environment (RANK,
WORLD_SIZE, MASTER_ADDR, ...) that ``fastnabla.training.distributed`` reads, so one process reproduces the plain run
exactly and two processes reproduce it as ``torchrun`` does (tests/test_resume_and_distributed.py), on a CPU.

The launcher is run as ``python -m accelerate.commands.launch`` (the same code as the ``accelerate launch``
console script): the console script imports ``accelerate.commands.estimate`` -> timm -> torchvision before anything
of ours, and on this CPU test machine PyPI's only torchvision wheel for torch 2.13 is a CUDA build that fails to
import (``fastnabla.compat`` works around it for our own imports). Multi-process CPU runs use ``--multi_gpu``:
accelerate's ``--cpu`` with several processes needs MPI, while ``--multi_gpu`` starts torchrun's workers, and
``train.device=cpu`` makes them use the gloo backend."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_resume_and_distributed import CLI_CASE, _assert_same_params, _env, _final_params

from fastnabla import train

pytest.importorskip("accelerate")
CASE = [*CLI_CASE, "train.micro_batch_size=3", "output.progress=false", "output.figure=false"]


def _accelerate(processes: int, out, port: int) -> subprocess.CompletedProcess:
    launcher = ["--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_port", str(port)]
    if processes > 1:
        launcher.insert(0, "--multi_gpu")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "-m", "fastnabla.train", *CASE,
           f"output.dir={out}"]
    return subprocess.run(cmd, env={**_env(), "HF_HOME": str(out.parent / "hf")}, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "run"
    assert train.main([*CASE, f"output.dir={out}"]) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("processes", "port"), [pytest.param(1, 29611, id="one-process"),
                                                 pytest.param(2, 29612, id="two-processes")])
def test_accelerate_launch_matches_the_plain_run(plain, tmp_path, processes, port):
    out = tmp_path / "run"
    done = _accelerate(processes, out, port)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == processes
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert sorted(p.name for p in (out / "checkpoints" / latest).glob("rank*.pt")) == [
        f"rank{r}.pt" for r in range(processes)]
    # one process: the same arithmetic, bit for bit; two: the all-reduced sums in another order
    _assert_same_params(_final_params(out), _final_params(plain), exact=processes == 1)
    reference = json.loads((plain / "metrics.json").read_text())
    assert abs(metrics["tv_to_target"] - reference["tv_to_target"]) < 1e-3
