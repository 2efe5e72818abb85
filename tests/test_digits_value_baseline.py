"""``docs/digits/value_baseline.py`` (docs/digits.md, "The off-policy value as the forward-looking baseline"): the
patched forward-looking function reads ``grad u`` at the right point and state on non-terminal rows and keeps the
exact reward gradient at ``x_T``, through the real per-state table of a digits run; the patch is undone on exit; the
script trains, writes its summary and never writes into an existing directory."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from digits_common import SCRIPT_EVAL, QuadraticValue, docs_script, quick_build_dir

SCRIPT = docs_script("value_baseline")


def _exact_fn(task, opts, fl_model=None):
    """A stand-in for the exact FL function: each row's conditioning times 10 plus its step, so the rows and the
    conditioning handed to it show."""

    def fl(x, step, alpha_bar, terminal, cond, noise=None):
        assert bool(terminal.all()) and noise is None
        return (cond * 10 + step.float()).reshape(-1, 1, 1, 1).expand_as(x).clone()

    return fl


@pytest.mark.parametrize("terminal_rows", [[], [0], [1, 4], [0, 1, 2, 3, 4]], ids=["none", "first", "two", "all"])
def test_value_rows_read_grad_u_and_terminal_rows_the_exact_gradient(terminal_rows):
    gen = torch.Generator().manual_seed(1)
    x, c = torch.randn(5, 2, 3, 3, generator=gen), torch.randn(2, 3, 3, generator=gen)
    step = torch.tensor([3, 0, 7, 2, 5])
    terminal = torch.zeros(5, dtype=torch.bool)
    terminal[terminal_rows] = True
    cond = torch.arange(5.0) + 1
    fl = SCRIPT.value_forward_looking_fn(_exact_fn, QuadraticValue(c))(None, SimpleNamespace(fl_noise_var=0.0))
    got = fl(x, step, torch.rand(5, 1, 1, 1), terminal, cond)
    s = step.float().reshape(-1, 1, 1, 1)
    expected = torch.where(terminal.reshape(-1, 1, 1, 1), (cond * 10).reshape(-1, 1, 1, 1) + s, (s + 1) * (c - x))
    torch.testing.assert_close(got, expected)


def test_reward_smoothing_is_refused():
    with pytest.raises(ValueError, match="fl_noise_var=0"):
        make = SCRIPT.value_forward_looking_fn(_exact_fn, QuadraticValue(torch.zeros(1)))
        make(None, SimpleNamespace(fl_noise_var=0.5))


def test_the_patch_reaches_the_digits_state_table_and_is_undone(tmp_path):
    """On the quick build, the table of forward-looking gradients that training reads holds ``grad u(x_s, s)`` at
    every non-terminal state and, at ``x_T``, what the unpatched function gives (the exact reward gradient)."""
    from fastnabla.config.loader import build_config
    from fastnabla.methods.nabla_gfn import fl_states
    from fastnabla.methods.nabla_gfn import loss as nabla_loss
    from fastnabla.run.config import RunConfig
    from fastnabla.run.driver import build_task_run, build_trainer
    from fastnabla.run.presets import get_preset
    from fastnabla.training.distributed import DistContext

    cfg = build_config(RunConfig, get_preset("digits"), None, [
        f"sd.model={quick_build_dir()}", *SCRIPT_EVAL, f"output.dir={tmp_path / 'run'}", "train.batch_size=3",
        "train.sample_batch_size=3"])
    dist = DistContext()
    run = build_task_run(cfg, dist)
    traj = build_trainer(run.task, cfg, dist).sample(0)
    T = traj.num_steps
    value = QuadraticValue(torch.randn(traj.states.shape[2:], generator=torch.Generator().manual_seed(2)))
    exact = fl_states.forward_looking_table(run.task, traj, cfg.method).dense()
    originals = fl_states.forward_looking_fn, nabla_loss.forward_looking_fn
    with SCRIPT.value_baseline(value):
        assert nabla_loss.forward_looking_fn is fl_states.forward_looking_fn is not originals[0]
        patched = fl_states.forward_looking_table(run.task, traj, cfg.method).dense()
    assert (fl_states.forward_looking_fn, nabla_loss.forward_looking_fn) == originals
    run.close()
    state = torch.arange(T).float().reshape(1, T, 1, 1, 1)
    torch.testing.assert_close(patched[:, :T], ((state + 1) * (value.c - traj.states[:, :T])).to(patched.dtype))
    torch.testing.assert_close(patched[:, T], exact[:, T])
    assert exact[:, T].abs().sum() > 0 and not torch.allclose(exact[:, :T], patched[:, :T])


def test_the_patch_is_undone_when_the_block_raises():
    from fastnabla.methods.nabla_gfn import fl_states

    original = fl_states.forward_looking_fn
    with pytest.raises(RuntimeError), SCRIPT.value_baseline(QuadraticValue(torch.zeros(1))):
        raise RuntimeError
    assert fl_states.forward_looking_fn is original


def test_the_script_fits_trains_and_refuses_an_existing_directory(tmp_path):
    out = tmp_path / "vb"
    threads = torch.get_num_threads()  # the script runs on one thread, as every digits command
    result = SCRIPT.main([str(out), "--trajectories", "12", "--steps", "3", f"sd.model={quick_build_dir()}",
                          *SCRIPT_EVAL, "train.iterations=2"])
    written = json.loads((out / "value_baseline.json").read_text())
    assert written["value_baseline"]["trajectories"] == 12 and written["value_baseline"]["steps"] == 3
    assert math.isfinite(written["value_baseline"]["final_loss"])
    assert written["digits"]["evaluated"] and math.isfinite(written["digits"]["policy"]["class_tv"])
    assert written["digits"] == result["digits"] == json.loads((out / "run" / "metrics.json").read_text())["digits"]
    config = (out / "run" / "config.yaml").read_text()
    assert "fold_fl_vjp: false" in config and "iterations: 2" in config
    before = (out / "value_baseline.json").read_bytes()
    with pytest.raises(FileExistsError):
        SCRIPT.main([str(out), f"sd.model={quick_build_dir()}", *SCRIPT_EVAL])
    assert (out / "value_baseline.json").read_bytes() == before
    torch.set_num_threads(threads)


@pytest.mark.parametrize("args", [["--trajectories", "1"], ["--steps", "0"], ["method.name=refl"]],
                         ids=["trajectories", "steps", "method"])
def test_the_script_refuses_what_it_cannot_run(tmp_path, args):
    with pytest.raises(SystemExit):
        SCRIPT.main([str(tmp_path / "out"), f"sd.model={quick_build_dir()}", *SCRIPT_EVAL, *args])
    assert not (tmp_path / "out").exists()
