"""``docs/digits/value_guidance.py`` (docs/digits.md, "A policy-independent value as the missing signal"): its loss
learns the log of a conditional mean (against the closed form), and on the quick build it fits, guides, evaluates
and never writes into an existing directory."""

from __future__ import annotations

import json
import math

import pytest
import torch
from digits_common import SCRIPT_EVAL, docs_script, quick_build_dir

SCRIPT = docs_script("value_guidance")


@pytest.mark.parametrize("means", [(1.0, 5.0), (0.2, 90.0), (3.0, 3.0)], ids=["small", "wide", "equal"])
def test_the_loss_learns_the_log_of_the_conditional_mean(means):
    """Two groups of x with heavy-tailed y (exponential around each group's mean): the fitted u per group is
    log of the group's empirical mean, not the mean of log y."""
    gen = torch.Generator().manual_seed(0)
    group = torch.arange(2000) % 2
    y = torch.tensor(means)[group] * torch.empty(2000).exponential_(generator=gen)
    u = torch.zeros(2, requires_grad=True)
    opt = torch.optim.Adam([u], lr=0.05)
    for _ in range(2000):
        opt.zero_grad()
        loss = SCRIPT.log_mean_loss(u[group], y)
        loss.backward()
        opt.step()
    expected = torch.stack([y[group == g].mean().log() for g in (0, 1)])
    assert u.detach() == pytest.approx(expected, abs=1e-3)
    assert not torch.allclose(expected, torch.stack([y[group == g].log().mean() for g in (0, 1)]), atol=0.1)


def test_value_guidance_fits_guides_and_writes_the_evaluation(tmp_path):
    out = tmp_path / "guided"
    threads = torch.get_num_threads()  # the script runs on one thread, as every digits command
    result = SCRIPT.main([str(out), "--trajectories", "20", "--steps", "4", f"sd.model={quick_build_dir()}",
                             *SCRIPT_EVAL])
    written = json.loads((out / "value_guidance.json").read_text())
    info = written["value_guidance"]
    assert info["trajectories"] == 20 and info["steps"] == 4 and math.isfinite(info["final_loss"])
    assert set(info["held_out_loss"]) == {"0", "1", "2", "3", "5"}  # states 0, T/4, T/2, 3T/4, T of 5 steps
    assert written["evaluated"] and written["num_samples"] == 32
    assert written["policy"]["class_tv"] == pytest.approx(result["policy"]["class_tv"])
    before = (out / "value_guidance.json").read_bytes()
    with pytest.raises(FileExistsError):
        SCRIPT.main([str(out), f"sd.model={quick_build_dir()}", *SCRIPT_EVAL])
    assert (out / "value_guidance.json").read_bytes() == before
    torch.set_num_threads(threads)
